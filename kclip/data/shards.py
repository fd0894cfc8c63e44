"""Webdataset tar shards in img2dataset's layout: finding them, reading samples, writing them, checking samples.

A shard is a POSIX tar of samples; the files of one sample are consecutive and share a basename, the sample key
(``000012345.jpg``, ``000012345.txt``, ``000012345.json``). A path names shards as open_clip's ``--train-data``
does: a directory of ``*.tar``, one ``.tar`` file, or brace-expanded patterns (``data/{00000..00041}.tar``), several
joined with ``::``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kclip.errors import KclipError

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"


class DataError(KclipError, ValueError):
    """A data path or file that kclip cannot use, with a message saying why and what to do."""


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---- naming shards ----------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as braceexpand (and so open_clip's --train-data) does it: ``{a,b}`` alternatives and
    ``{000..012}`` numeric ranges, zero padding kept, nested left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # not an expansion: keep it literally
        return [pattern[: m.end()] + rest for rest in expand_braces(pattern[m.end() :])]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [e for item in items for e in expand_braces(head + item + tail)]


def resolve_shards(path: str | os.PathLike) -> list[Path]:
    """The tar shards a path names, in order.

    Args:
        path: a directory (its ``*.tar``; where it has none, those of its subdirectories, sorted), a ``.tar`` file,
            or brace patterns joined by ``::``.

    Raises:
        DataError: the path does not exist, names no shard, or names a file that is not a tar archive.
    """
    text = os.fspath(path)
    shards: list[Path] = []
    for part in text.split("::"):
        for item in expand_braces(part):
            p = Path(item).expanduser()
            if p.is_dir():
                found = sorted(p.glob("*.tar")) or sorted(p.rglob("*.tar"))
                if not found:
                    raise DataError(f"{p}: a directory without .tar shards (expected img2dataset's webdataset layout)")
                shards += found
            elif p.is_file():
                if not tarfile.is_tarfile(p):
                    raise DataError(f"{p}: not a tar archive (expected a webdataset shard)")
                shards.append(p)
            else:
                raise DataError(f"{p}: no such file or directory" + (f" (from {text!r})" if item != text else ""))
    if not shards:
        raise DataError(f"{text!r} names no shard")
    return shards


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member as webdataset and DALI split it: at the first dot of the last path part."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


# ---- reading ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Component:
    ext: str
    offset: int  # of the data in the tar, bytes (a multiple of 512)
    size: int
    name: str


@dataclasses.dataclass
class RawSample:
    """The files of one sample as stored: key, components, their bytes, and why the sample cannot be read
    (`problem`, None when whole)."""

    key: str
    components: list[Component]
    data: dict[str, bytes]
    problem: str | None = None

    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.data), None)


def iter_tar(path: str | os.PathLike, *, read_data: bool = True) -> Iterator[RawSample]:
    """Samples of a tar shard in stored order, members grouped by key as DALI groups them.

    A member cut short by the end of the file, or a tar that stops being readable, ends the iteration with one
    last sample whose `problem` says so; hidden files (a basename starting with a dot) and non-file entries are
    skipped, as DALI skips them.
    """
    size = os.path.getsize(path)
    current: RawSample | None = None
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                if current is not None:
                    yield current
                    current = None
                yield RawSample(key=f"<after {size}-byte read>", components=[], data={}, problem=f"unreadable tar: {e}")
                return
            if member is None:
                break
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            if not key or key.endswith("/") or key.rsplit("/", 1)[-1].startswith("."):
                continue
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = RawSample(key=key, components=[], data={})
            comp = Component(ext, member.offset_data, member.size, member.name)
            current.components.append(comp)
            if member.offset_data + member.size > size:
                current.problem = (
                    f"{member.name}: truncated tar member ({size - member.offset_data} of {member.size} bytes)"
                )
                continue
            if read_data:
                f.seek(member.offset_data)
                current.data[ext] = f.read(member.size)
    if current is not None:
        yield current


def read_indexed(path: str | os.PathLike, samples: list[list[Component]]) -> Iterator[RawSample]:
    """Samples of a shard read at the offsets of its index (see kclip.data.index), in index order."""
    with open(path, "rb") as f:
        for comps in samples:
            data = {}
            for c in comps:
                f.seek(c.offset)
                data[c.ext] = f.read(c.size)
            yield RawSample(key=split_name(comps[0].name)[0], components=comps, data=data)


# ---- checking ---------------------------------------------------------------------------------------------------


def decode_image(data: bytes):
    """Decode image bytes fully with PIL (a truncated file raises), converted to RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img.copy()


def load_sample(sample: RawSample) -> tuple[str | None, object | None, str | None]:
    """(caption, PIL RGB image, None) for a usable sample, (None, None, why) otherwise.

    Usable: an image that decodes completely, a non-empty UTF-8 caption, and member names that DALI's index
    format and source info can carry (no whitespace, no ':').
    """
    if sample.problem is not None:
        return None, None, sample.problem
    if any(any(ch.isspace() or ch == ":" for ch in c.name) for c in sample.components):
        return None, None, "member name contains whitespace or ':' (DALI's index cannot carry it)"
    ext = sample.image_ext()
    if ext is None:
        return None, None, f"no image ({'/'.join('.' + e for e in IMAGE_EXTS)})"
    if CAPTION_EXT not in sample.data:
        return None, None, "no caption (.txt)"
    try:
        caption = sample.data[CAPTION_EXT].decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, None, "caption is not UTF-8"
    if not caption:
        return None, None, "empty caption"
    try:
        img = decode_image(sample.data[ext])
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad data
        return None, None, f"image does not decode: {type(e).__name__}: {e}"
    if min(img.size) < 1:
        return None, None, "empty image"
    return caption, img, None


def check_sample(sample: RawSample) -> tuple[str | None, str | None]:
    """(caption, None) for a usable sample (see `load_sample`), (None, why) otherwise."""
    caption, _, why = load_sample(sample)
    return caption, why


# ---- writing ----------------------------------------------------------------------------------------------------


class ShardWriter:
    """Write one tar shard deterministically (fixed mtime, owner and mode), to a temporary name renamed on close.

    Usage::

        with ShardWriter("out/00000.tar") as w:
            w.write("000000000", {"jpg": jpeg_bytes, "txt": b"a red circle", "json": b"{...}"})
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._tar.close()
            self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
