"""The teacher embedding store (docs/contracts.md): fp16 rows memory-mapped, sorted by sample key, with stats.

Layout of a store directory::

    meta.json        {"format": "kclip.teacher_store", "version": 1, "model", "pooling", "max_length",
                      "dtype": "float16", "width", "count", "complete", "created", ...}
    embeddings.f16   raw little-endian float16 [count, width], row i belongs to keys[i]
    keys.npy         fixed-width ASCII keys "S{L}" [count], strictly increasing
    stats.npz        mean, std: float32 [width], over all rows, accumulated in float64
    parts/           only while incomplete: part-{rank:03d}-{index:06d}.{f16,keys.npy,json}

A part is written as its rows and keys under temporary names, renamed, and then its ``.json`` (renamed last), so
a part whose ``.json`` exists is whole. Finalising sorts every part's rows by key into ``embeddings.f16`` in chunks
(the store never has to fit in memory), accumulates the stats in float64, writes ``meta.json`` with
``complete: true`` last (the commit point) and only then removes ``parts/``: a crash at any moment leaves a store
that the next ``kclip teacher embed`` resumes or finalises again.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kclip._atomic import atomic_path
from kclip.errors import KclipError

log = logging.getLogger(__name__)

FORMAT = "kclip.teacher_store"
VERSION = 1
META, EMBEDDINGS, KEYS, STATS, PARTS = "meta.json", "embeddings.f16", "keys.npy", "stats.npz", "parts"
STD_FLOOR = 1e-6  # a dimension constant over the store standardises to 0 instead of NaN
_PART = re.compile(r"part-(\d{3})-(\d{6})\.json")
_CHUNK_BYTES = 64 << 20  # float16 bytes of rows gathered at once while finalising


class StoreError(KclipError, ValueError):
    """A teacher store that cannot be used as asked; the message names the store and what to run."""


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def read_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The store's meta.json, or None where there is none; raises StoreError where it is not a teacher store."""
    path = Path(root) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise StoreError(f"{path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise StoreError(f"{root}: not a teacher embedding store ({META} has format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise StoreError(f"{root}: store version {meta.get('version')}, this kclip reads version {VERSION}")
    return meta


def new_meta(**fields: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "float16",
        "count": 0,
        "complete": False,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **fields,
    }


def keys_array(keys: Sequence[str]) -> np.ndarray:
    """Keys as a fixed-width ASCII array S{L} (L the longest key); raises StoreError for a non-ASCII key."""
    try:
        encoded = [k.encode("ascii") for k in keys]
    except UnicodeEncodeError as e:
        raise StoreError(f"sample key {e.object!r} is not ASCII") from None
    width = max((len(k) for k in encoded), default=1) or 1
    return np.array(encoded, dtype=f"S{width}")


# ---- parts ----------------------------------------------------------------------------------------------------


def parts_dir(root: str | os.PathLike) -> Path:
    return Path(root) / PARTS


def list_parts(root: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """(rank, index, stem path) of the whole parts of a store, sorted."""
    folder = parts_dir(root)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _PART.fullmatch(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p.with_suffix("")))
    return sorted(out)


def part_keys(stem: Path) -> np.ndarray:
    return np.load(f"{stem}.keys.npy")


def done_keys(root: str | os.PathLike) -> set[bytes]:
    """Keys of every whole part (any rank): the samples a resumed run skips."""
    done: set[bytes] = set()
    for _, _, stem in list_parts(root):
        done.update(part_keys(stem).tolist())
    return done


def next_part_index(root: str | os.PathLike, rank: int) -> int:
    """1 + the largest index of this rank's parts (whole or not), so a new part never overwrites an old one."""
    folder = parts_dir(root)
    taken = [-1]
    if folder.is_dir():
        prefix = f"part-{rank:03d}-"
        taken += [int(p.name[len(prefix) : len(prefix) + 6]) for p in folder.iterdir() if p.name.startswith(prefix)]
    return max(taken) + 1


def write_part(root: str | os.PathLike, rank: int, index: int, keys: Sequence[str], rows: np.ndarray) -> Path:
    """Write one finished part: rows (float32 or float16 [n, D], finite, within the float16 range) and their keys.

    Returns:
        the part's stem path (parts/part-RRR-IIIIII).
    """
    folder = parts_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"part-{rank:03d}-{index:06d}"
    rows16 = np.ascontiguousarray(rows, dtype="<f2")
    with atomic_path(f"{stem}.f16") as tmp:
        rows16.tofile(tmp)
    _save_npy(Path(f"{stem}.keys.npy"), keys_array(keys))
    write_json(Path(f"{stem}.json"), {"rank": rank, "index": index, "count": len(keys), "width": rows.shape[1]})
    return stem


# ---- finalising -----------------------------------------------------------------------------------------------


def finalize(root: str | os.PathLike, *, expected_count: int | None = None) -> dict[str, Any]:
    """Sort every part into the store's files, write the stats, mark the store complete, remove parts/.

    Args:
        root: the store directory (its meta.json written by `embed`, complete false).
        expected_count: the number of samples of the dataset (all ranks); a different number of rows is an error.

    Returns:
        the final meta.json record.

    Raises:
        StoreError: no parts, a key in two parts, or a count that does not match.
    """
    root = Path(root)
    meta = read_meta(root)
    if meta is None:
        raise StoreError(f"{root}: no {META}; not a teacher store")
    width = int(meta["width"])
    parts = list_parts(root)
    if not parts:
        raise StoreError(f"{root}: no finished parts to finalise")
    keys_per_part = [part_keys(stem) for _, _, stem in parts]
    counts = np.array([len(k) for k in keys_per_part], dtype=np.int64)
    n = int(counts.sum())
    if expected_count is not None and n != expected_count:
        raise StoreError(
            f"{root}: its parts hold {n} rows but the dataset has {expected_count} samples; the parts come from "
            "another dataset or run: remove the store (or choose another --out) and embed again"
        )
    width_k = max(k.dtype.itemsize for k in keys_per_part)
    all_keys = np.concatenate([k.astype(f"S{width_k}") for k in keys_per_part])  # [N]
    order = np.argsort(all_keys, kind="stable")  # [N] sorted position -> global row
    sorted_keys = all_keys[order]
    dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if dup.size:
        raise StoreError(
            f"{root}: sample key {sorted_keys[dup[0]].decode()!r} is in two parts ({dup.size} duplicates): the "
            "dataset repeats keys, or parts of two runs were mixed; remove the store and embed again"
        )
    part_of = np.repeat(np.arange(len(parts)), counts)[order]  # [N] part of each sorted row
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    row_of = order - starts[part_of]  # [N] row inside its part
    sources = [
        np.memmap(f"{stem}.f16", dtype="<f2", mode="r", shape=(int(c), width))
        for (_, _, stem), c in zip(parts, counts, strict=True)
    ]
    total = np.zeros(width, dtype=np.float64)
    total_sq = np.zeros(width, dtype=np.float64)
    step = max(1, _CHUNK_BYTES // (2 * width))
    with atomic_path(root / EMBEDDINGS) as tmp:
        out = np.memmap(tmp, dtype="<f2", mode="w+", shape=(n, width))
        for s in range(0, n, step):
            e = min(n, s + step)
            chunk = np.empty((e - s, width), dtype="<f2")
            for p in np.unique(part_of[s:e]):
                sel = np.flatnonzero(part_of[s:e] == p)
                chunk[sel] = sources[p][row_of[s:e][sel]]
            c64 = chunk.astype(np.float64)
            if not np.isfinite(c64).all():
                bad = s + int(np.flatnonzero(~np.isfinite(c64).all(axis=1))[0])
                raise StoreError(f"{root}: the row of key {sorted_keys[bad].decode()!r} is not finite")
            total += c64.sum(0)
            total_sq += np.square(c64).sum(0)
            out[s:e] = chunk
        out.flush()
        del out
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - np.square(mean), 0.0))
    _save_npy(root / KEYS, sorted_keys)
    with atomic_path(root / STATS) as tmp, open(tmp, "wb") as f:
        np.savez(f, mean=mean.astype(np.float32), std=np.maximum(std, STD_FLOOR).astype(np.float32))
    meta.update(count=n, complete=True)
    write_json(root / META, meta)
    del sources
    shutil.rmtree(parts_dir(root), ignore_errors=True)
    log.info("teacher store %s: %d rows of width %d, finalised from %d parts", root, n, width, len(parts))
    return meta


# ---- reading --------------------------------------------------------------------------------------------------


class TeacherStore:
    """A complete teacher embedding store, memory-mapped.

    Args:
        root: the store directory.

    Attributes:
        meta: meta.json.
        keys: S{L} [N] sorted sample keys (memory-mapped).
        embeddings: float16 [N, D] rows (memory-mapped, read-only).
        mean, std: float32 [D].

    Raises:
        StoreError: no store there, an incomplete one (the message names the command that resumes it), or files
            whose sizes disagree with meta.json.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such teacher store (make one with `kclip teacher embed`)")
        meta = read_meta(self.root)
        if meta is None:
            raise StoreError(f"{self.root}: not a teacher store (no {META}); make one with `kclip teacher embed`")
        if not meta.get("complete"):
            data = meta.get("data", "DATA")
            raise StoreError(
                f"{self.root}: the store is incomplete (an interrupted `kclip teacher embed`); resume it with "
                f"`kclip teacher embed --data {data} --out {self.root} --model {meta.get('model', 'MODEL')}`"
            )
        self.meta = meta
        self.count, self.width = int(meta["count"]), int(meta["width"])
        expected = self.count * self.width * 2
        size = (self.root / EMBEDDINGS).stat().st_size if (self.root / EMBEDDINGS).is_file() else -1
        if size != expected:
            raise StoreError(f"{self.root / EMBEDDINGS}: {size} bytes, meta.json says {expected} ({self.count} rows)")
        self.keys = np.load(self.root / KEYS, mmap_mode="r")
        if self.keys.shape != (self.count,):
            raise StoreError(f"{self.root / KEYS}: {self.keys.shape[0]} keys, meta.json says {self.count}")
        self.embeddings = np.memmap(self.root / EMBEDDINGS, dtype="<f2", mode="r", shape=(self.count, self.width))
        with np.load(self.root / STATS) as stats:
            self.mean, self.std = stats["mean"], stats["std"]

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"TeacherStore({str(self.root)!r}, count={self.count}, width={self.width}, model={self.meta['model']!r})"

    def index_of(self, keys: Sequence[str] | np.ndarray, *, what: str = "the batch") -> np.ndarray:
        """Row of each key, by binary search in the sorted keys.

        Raises:
            StoreError: a key the store does not hold (naming the first few and `what` they come from).
        """
        q = np.asarray(keys)
        if q.dtype.kind != "S":
            q = keys_array([str(k) for k in q.tolist()])
        too_long = np.char.str_len(q) > self.keys.dtype.itemsize  # cannot be in the store; astype would cut them
        named = q
        q = q.astype(self.keys.dtype)
        idx = np.searchsorted(self.keys, q)
        found = (idx < self.count) & ~too_long
        found[found] = self.keys[idx[found]] == q[found]
        if not found.all():
            missing = [k.decode() for k in named[~found][:5]]
            raise StoreError(
                f"{self.root}: {int((~found).sum())} keys of {what} are not in the store (e.g. {', '.join(missing)}); "
                "the store was made from another dataset: embed this one with `kclip teacher embed`"
            )
        return idx

    def rows(self, keys: Sequence[str] | np.ndarray, *, standardize: bool = False) -> np.ndarray:
        """float32 [B, D] rows of `keys`; standardised as (e - mean) / std when asked."""
        idx = self.index_of(keys)
        order = np.argsort(idx)  # sorted reads from the memory map
        out = np.empty((len(idx), self.width), dtype=np.float32)
        out[order] = self.embeddings[idx[order]]
        return (out - self.mean) / self.std if standardize else out

    def check_finite(self) -> None:
        """Raise StoreError naming the first row (by key) holding NaN or inf; reads the store once in chunks."""
        step = max(1, _CHUNK_BYTES // (2 * self.width))
        for s in range(0, self.count, step):
            ok = np.isfinite(self.embeddings[s : s + step]).all(axis=1)
            if not ok.all():
                i = s + int(np.flatnonzero(~ok)[0])
                raise StoreError(
                    f"{self.root}: the row of key {self.keys[i].decode()!r} (row {i}) holds NaN or inf; "
                    "the store is damaged: embed again"
                )

    def check_keys(self, keys: Sequence[str] | np.ndarray, *, what: str) -> None:
        """Raise StoreError unless every key of a dataset (`what` names it) is in the store."""
        self.index_of(keys, what=what)
