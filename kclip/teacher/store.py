"""The teacher embedding store (docs/contracts.md): fp16 rows memory-mapped, sorted by sample key, with stats.

Layout of a store directory::

    meta.json        {"format": "kclip.teacher_store", "version": 2, "model", "pooling", "max_length",
                      "dtype": "float16", "width", "count", "complete", "created",
                      "splits": {name: {"count", "data"}}, ...}
    embeddings.f16   raw little-endian float16 [count, width], row i belongs to keys[i]
    keys.npy         fixed-width ASCII keys "S{L}" [count], strictly increasing
    split.npy        uint8 [count]: the split of each row, as its position in meta.json's "splits"
    stats.npz        mean, std: float32 [width] over all rows; split_mean, split_std: float32 [splits, width],
                     each split's own, in the order of "splits"; all accumulated in float64
    parts/           only while incomplete: part-{rank:03d}-{index:06d}.{f16,keys.npy,json}; each part holds
                     the rows of one split, named in its .json

A part is written as its rows and keys under temporary names, renamed, and then its ``.json`` (renamed last), so
a part whose ``.json`` exists is whole. Finalising sorts every part's rows by key into ``embeddings.f16`` in chunks
(the store never has to fit in memory), accumulates the stats in float64, writes ``meta.json`` with
``complete: true`` last (the commit point) and only then removes ``parts/``: a crash at any moment leaves a store
that the next ``kclip teacher embed`` resumes or finalises again.

A store may cover several splits of a dataset (``kclip teacher embed --data DIR:train,heldout``): the evaluation
needs teacher rows for held-out captions too, while the concepts and the standardisation of training must come from
the training split alone. ``TeacherStore(root, split="train")`` is the view of one split (its keys, rows and
statistics); ``stats="train"`` standardises any view with the training split's statistics. Version 1 stores (no
splits) are read as they are.
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
VERSION = 2  # 2: splits (meta "splits", split.npy, split_mean/split_std)
READABLE_VERSIONS = (1, 2)
META, EMBEDDINGS, KEYS, STATS, PARTS = "meta.json", "embeddings.f16", "keys.npy", "stats.npz", "parts"
SPLIT = "split.npy"
MAX_SPLITS = 255  # split codes are uint8
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
    if meta.get("version") not in READABLE_VERSIONS:
        raise StoreError(
            f"{root}: store version {meta.get('version')}, this kclip reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
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


def write_part(
    root: str | os.PathLike, rank: int, index: int, keys: Sequence[str], rows: np.ndarray, *, split: str | None = None
) -> Path:
    """Write one finished part: rows (float32 or float16 [n, D], finite, within the float16 range) and their keys,
    all of one split (recorded in the part's .json).

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
    record = {"rank": rank, "index": index, "count": len(keys), "width": rows.shape[1], "split": split}
    write_json(Path(f"{stem}.json"), record)
    return stem


# ---- finalising -----------------------------------------------------------------------------------------------


def finalize(
    root: str | os.PathLike,
    *,
    expected_count: int | None = None,
    splits: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Sort every part into the store's files, write the stats, mark the store complete, remove parts/.

    Args:
        root: the store directory (its meta.json written by `embed`, complete false).
        expected_count: the number of samples of the dataset (all ranks); a different number of rows is an error.
        splits: {name: {"data": path, "count": samples or None}} in order, the splits the parts belong to (each
            part's .json names its split); a count that differs from the parts' rows of that split is an error.
            None: the splits the parts name, in order of first appearance.

    Returns:
        the final meta.json record.

    Raises:
        StoreError: no parts, a key in two parts, a part of a split not asked for, or a count that does not match.
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
    part_splits = [json.loads(Path(f"{stem}.json").read_text()).get("split") or "data" for _, _, stem in parts]
    if splits is None:
        splits = {name: {"data": meta.get("data"), "count": None} for name in dict.fromkeys(part_splits)}
    names = list(splits)
    if len(names) > MAX_SPLITS:
        raise StoreError(f"{root}: {len(names)} splits; a store holds at most {MAX_SPLITS}")
    stray = sorted(set(part_splits) - set(names))
    if stray:
        raise StoreError(
            f"{root}: parts of the split(s) {', '.join(stray)}, not among {', '.join(names)}: the parts come from "
            "another run; remove the store (or choose another --out) and embed again"
        )
    code_of_part = np.array([names.index(p) for p in part_splits], dtype=np.uint8)
    split_counts = {name: int(counts[code_of_part == c].sum()) for c, name in enumerate(names)}
    for name, info in splits.items():
        if info.get("count") is not None and split_counts[name] != info["count"]:
            raise StoreError(
                f"{root}: its parts hold {split_counts[name]} rows of the split {name} but it has {info['count']} "
                "samples; remove the store (or choose another --out) and embed again"
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
    codes = code_of_part[part_of]  # [N] split of each sorted row
    total = np.zeros((len(names), width), dtype=np.float64)
    total_sq = np.zeros((len(names), width), dtype=np.float64)
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
            for c in np.unique(codes[s:e]):
                rows_c = c64[codes[s:e] == c]
                total[c] += rows_c.sum(0)
                total_sq[c] += np.square(rows_c).sum(0)
            out[s:e] = chunk
        out.flush()
        del out
    sizes = np.array([split_counts[name] for name in names], dtype=np.float64)[:, None]
    mean, std = _mean_std(total.sum(0), total_sq.sum(0), float(n))
    split_mean, split_std = _mean_std(total, total_sq, np.maximum(sizes, 1.0))
    _save_npy(root / KEYS, sorted_keys)
    _save_npy(root / SPLIT, codes)
    with atomic_path(root / STATS) as tmp, open(tmp, "wb") as f:
        np.savez(f, mean=mean, std=std, split_mean=split_mean, split_std=split_std)
    meta.update(
        count=n,
        complete=True,
        version=VERSION,
        splits={name: {**splits[name], "count": split_counts[name]} for name in names},
    )
    write_json(root / META, meta)
    del sources
    shutil.rmtree(parts_dir(root), ignore_errors=True)
    log.info("teacher store %s: %d rows of width %d, finalised from %d parts", root, n, width, len(parts))
    return meta


def _mean_std(total: np.ndarray, total_sq: np.ndarray, n) -> tuple[np.ndarray, np.ndarray]:
    """float32 mean and std (floored at STD_FLOOR) from float64 sums of rows and of their squares over n rows."""
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - np.square(mean), 0.0))
    return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)


# ---- reading --------------------------------------------------------------------------------------------------


class _RowView:
    """Rows of a memory-mapped [N, D] array at sorted positions [n], indexed like an array of n rows."""

    def __init__(self, base: np.memmap, positions: np.ndarray):
        self.base, self.positions = base, positions
        self.shape, self.dtype = (len(positions), base.shape[1]), base.dtype

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item):
        return self.base[self.positions[item]]

    def __array__(self, dtype=None, copy=None):
        rows = self.base[self.positions]
        return rows if dtype is None else rows.astype(dtype)


class TeacherStore:
    """A complete teacher embedding store, memory-mapped; or the view of one of its splits.

    Args:
        root: the store directory.
        split: the view of this split alone (its keys, rows and statistics); None: every row.
        stats: the split whose mean and std `rows(standardize=True)` uses (default: `split`'s own, or those of
            all rows): training and evaluation both standardise with the training split's.

    Attributes:
        meta: meta.json.
        splits: names of the store's splits, in store order ([] for a version 1 store).
        split: the split of this view, or None.
        keys: S{L} [N] sorted sample keys (memory-mapped; the split's, in memory, for a split view).
        embeddings: float16 [N, D] rows, read-only (memory-mapped; for a split view, an array-like of its rows).
        mean, std: float32 [D].

    Raises:
        StoreError: no store there, an incomplete one (the message names the command that resumes it), files
            whose sizes disagree with meta.json, or a split the store does not have (the message lists its splits).
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, *, stats: str | None = None):
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
        self.splits = list(meta.get("splits") or {})
        self.split = split
        self.count, self.width = int(meta["count"]), int(meta["width"])
        expected = self.count * self.width * 2
        size = (self.root / EMBEDDINGS).stat().st_size if (self.root / EMBEDDINGS).is_file() else -1
        if size != expected:
            raise StoreError(f"{self.root / EMBEDDINGS}: {size} bytes, meta.json says {expected} ({self.count} rows)")
        self.keys = np.load(self.root / KEYS, mmap_mode="r")
        if self.keys.shape != (self.count,):
            raise StoreError(f"{self.root / KEYS}: {self.keys.shape[0]} keys, meta.json says {self.count}")
        self.embeddings = np.memmap(self.root / EMBEDDINGS, dtype="<f2", mode="r", shape=(self.count, self.width))
        self._all_keys = self.keys
        self._positions: np.ndarray | None = None  # rows of the view in the whole store (None: every row)
        with np.load(self.root / STATS) as f:
            self.mean, self.std = f["mean"], f["std"]
            if self.splits:
                split_mean, split_std = f["split_mean"], f["split_std"]
        if split is not None:
            code = self._code(split)
            self._positions = np.flatnonzero(self._split_codes() == code)
            self.keys = np.asarray(self._all_keys[self._positions])
            self.embeddings = _RowView(self.embeddings, self._positions)
            self.count = len(self._positions)
        stats = split if stats is None else stats
        if stats is not None:
            c = self._code(stats)
            self.mean, self.std = split_mean[c], split_std[c]
        self.stats = stats

    def _split_codes(self) -> np.ndarray:
        codes = np.load(self.root / SPLIT, mmap_mode="r")
        if codes.shape != (self.count,):
            raise StoreError(f"{self.root / SPLIT}: {codes.shape[0]} rows, meta.json says {self.count}")
        return codes

    def _code(self, split: str) -> int:
        if not self.splits:
            raise StoreError(
                f"{self.root}: a store without splits (version {self.meta.get('version')}, made before kclip "
                f"recorded them), asked for the split {split!r}; embed it again with `kclip teacher embed`"
            )
        if split not in self.splits:
            raise StoreError(f"{self.root}: no split {split!r} in the store (its splits: {', '.join(self.splits)})")
        return self.splits.index(split)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        view = f", split={self.split!r}" if self.split is not None else ""
        return (
            f"TeacherStore({str(self.root)!r}{view}, count={self.count}, width={self.width}, "
            f"model={self.meta['model']!r})"
        )

    def index_of(self, keys: Sequence[str] | np.ndarray, *, what: str = "the batch") -> np.ndarray:
        """Row of each key (in this view: a split view counts its own rows), by binary search in the sorted keys.

        Raises:
            StoreError: a key the store (or this split of it) does not hold, naming the first few and `what` they
                come from.
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
            if self.split is not None and self._in_whole_store(q[~found][0]):
                raise StoreError(
                    f"{self.root}: {int((~found).sum())} keys of {what} are not in its split {self.split!r} (e.g. "
                    f"{', '.join(missing)}): they belong to another split of the store"
                )
            raise StoreError(
                f"{self.root}: {int((~found).sum())} keys of {what} are not in the store (e.g. {', '.join(missing)}); "
                "the store was made from another dataset: embed this one with `kclip teacher embed`"
            )
        return idx

    def _in_whole_store(self, key: bytes) -> bool:
        i = int(np.searchsorted(self._all_keys, key))
        return i < len(self._all_keys) and self._all_keys[i] == key

    def rows(self, keys: Sequence[str] | np.ndarray, *, standardize: bool = False) -> np.ndarray:
        """float32 [B, D] rows of `keys`; standardised as (e - mean) / std when asked (the statistics of `stats`)."""
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
