"""Webdataset tar shards in img2dataset's layout: finding them, reading samples, writing them, checking samples.

A shard is a POSIX tar of samples; the files of one sample are consecutive and share a basename, the sample key
(``000012345.jpg``, ``000012345.txt``, ``000012345.json``). A path names shards as open_clip's ``--train-data``
does: a directory of ``*.tar``, one ``.tar`` file, or brace-expanded patterns (``data/{00000..00041}.tar``), several
joined with ``::``.

Splits. A *dataset root* keeps each split's shards in a folder of its own (``DIR/train``, ``DIR/heldout``, ...), as
``kclip data synth`` writes it. A split is named as ``DIR/train`` or ``DIR:train``; the root itself is refused with
a message listing its splits, so no command reads several splits as one. The commands that handle several splits,
each on its own (``kclip data index|inspect``, ``kclip teacher embed``), take ``DIR:train,heldout`` (`named_splits`).
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


def process_context():
    """The start method of every process kclip starts for data work (the CPU loader's workers, `data synth` and
    `data index` pools): a fork server, started once from a clean process with kclip's data modules and the CLIP
    tokenizer already imported (kclip.data._worker_preload), so a process costs a fork, not imports. Processes forked
    from the calling process itself may hang: one of its threads (DALI's, a progress bar's, an OpenMP pool) can hold
    a lock at the moment of the fork that the child then waits on forever; spawn where there is no fork server."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kclip.data._worker_preload"])
    return ctx


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


SPLIT_SEP = ":"  # DIR:SPLIT names the split folder DIR/SPLIT of a dataset root
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.tar") if p.is_file())


def dataset_splits(root: str | os.PathLike) -> list[str]:
    """Names of the split folders of a dataset root: its subdirectories that hold ``*.tar`` shards, sorted, as
    ``kclip data synth`` writes them (train/, heldout/, compositional/); [] for a folder of shards or a file."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _shard_files(p))


def _several_splits_error(root: Path, splits: list[str], given: str) -> DataError:
    listed = ", ".join(splits)
    return DataError(
        f"{given}: a dataset root with the splits {listed}; name one split, as {root / splits[0]} or "
        f"{root}{SPLIT_SEP}{splits[0]} (splits are never read together)"
    )


def split_path(item: str) -> tuple[Path, str | None]:
    """(path, split name) of one path item: ``DIR:SPLIT`` gives (DIR/SPLIT, SPLIT) where DIR is a directory;
    anything else is a path as it is, with no split named.

    Raises:
        DataError: DIR:SPLIT where DIR has no split of that name (the message lists those it has).
    """
    p = Path(item).expanduser()
    if SPLIT_SEP in item and not p.exists():
        base, name = item.rsplit(SPLIT_SEP, 1)
        root = Path(base).expanduser()
        if root.is_dir():
            if "," in name:
                raise DataError(
                    f"{item}: names several splits ({name}); this command reads one split (only `kclip data "
                    "index|inspect` and `kclip teacher embed` take a list of splits)"
                )
            if not _SPLIT_NAME.fullmatch(name) or not (root / name).is_dir():
                have = dataset_splits(root)
                raise DataError(
                    f"{item}: {root} has no split {name!r}"
                    + (f" (its splits: {', '.join(have)})" if have else " (it is not a dataset root with splits)")
                )
            return root / name, name
    return p, None


def resolve_shards(path: str | os.PathLike) -> list[Path]:
    """The tar shards a path names, in order.

    Args:
        path: a directory of ``*.tar`` shards, a split of a dataset root (``DIR/train`` or ``DIR:train``), a
            ``.tar`` file, or brace patterns joined by ``::``. A dataset root itself (a folder whose shards sit in
            split subfolders) is refused: splits are never read as one.

    Raises:
        DataError: the path does not exist, names no shard, names a dataset root with several splits (the
            message lists them and shows how to name one), or names a file that is not a tar archive.
    """
    text = os.fspath(path)
    shards: list[Path] = []
    for part in text.split("::"):
        for item in expand_braces(part):
            p, _ = split_path(item)
            if p.is_dir():
                found = _shard_files(p)
                if not found:
                    splits = dataset_splits(p)
                    if splits:
                        raise _several_splits_error(p, splits, item)
                    raise DataError(f"{p}: a directory without .tar shards (expected img2dataset's webdataset layout)")
                for f in found:
                    if not tarfile.is_tarfile(f):
                        raise DataError(f"{f}: named .tar but not a tar archive (in the shard directory {p})")
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


def named_splits(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(split name, path of that split alone) for each split a path names, for the commands that take several:
    ``DIR:train,heldout`` gives [("train", "DIR/train"), ("heldout", "DIR/heldout")]; any other path is one
    split, named after its last folder or file (``data/cc3m`` -> "cc3m", ``train.csv`` -> "train",
    ``DIR:train`` and ``DIR/train`` -> "train"). A dataset root is refused as by `resolve_shards`.

    Raises:
        DataError: a split that does not exist, a dataset root, or a split named twice.
    """
    text = os.fspath(path)
    out: list[tuple[str, str]] = []
    if "::" not in text and SPLIT_SEP in text and not Path(text).exists():
        base, names = text.rsplit(SPLIT_SEP, 1)
        if Path(base).expanduser().is_dir() and "," in names:
            for name in names.split(","):
                p, _ = split_path(f"{base}{SPLIT_SEP}{name}")
                out.append((name, str(p)))
    if not out:
        first, name = split_path(expand_braces(text.split("::")[0])[0])
        if name is None:
            plain = Path(text.split("::")[0])
            named = plain.parent if "{" in plain.name or not (first.is_dir() or first.is_file()) else first
            name = named.name.removesuffix(".tar")
            for suffix in (".csv", ".tsv"):
                name = name.removesuffix(suffix)
        out.append((name or "data", text))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise DataError(f"{text}: a split is named twice ({', '.join(names)})")
    return out


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


def sample_caption(sample: RawSample) -> tuple[str | None, str | None]:
    """(caption, None) for a sample with a non-empty UTF-8 caption (stripped), (None, why) otherwise."""
    if CAPTION_EXT not in sample.data:
        return None, "no caption (.txt)"
    try:
        caption = sample.data[CAPTION_EXT].decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "caption is not UTF-8"
    return (caption, None) if caption else (None, "empty caption")


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
    caption, why = sample_caption(sample)
    if why is not None:
        return None, None, why
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
