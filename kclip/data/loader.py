"""The sample order both loaders follow, and the CPU twin of the DALI pipeline: a torch DataLoader that decodes with
PIL and applies the same transforms.

The twin serves where DALI or a GPU is absent. It reads the same shards through their DALI indexes (shards without
a fresh index through a scan of their tar headers) and CSV files, yields the very batches DALI yields, and skips and
counts bad samples on its own: a truncated JPEG or a missing caption costs one sample, never the epoch.

Batches from both pipelines are dicts::

    {"image": float32 [B, 3, S, S] (CLIP-normalised), "tokens": int64 [B, 77], "key": list[str], "caption": list[str],
     "label": int64 [B], "attributes": uint8 [B, A], "tags": list[list[str]], "split": list[str]}

The last four are the fields of the samples' ``.json`` (`META_FIELDS`; kclip's synthetic set has them all) and are
in a batch only where every sample of the batch has them: a field is absent, never zeros, where the data lacks it
(img2dataset's shards and CSV files have none).

Order (`epoch_batches`). The N samples of a data set are its rows (`ShardRows`, `CsvRows`); the batches of an
epoch are a pure function of (seed, epoch, rank, world size, batch size, drop_last), whatever the number of workers:

- training (shuffle): the permutation of the N rows drawn by ``np.random.default_rng([seed, epoch])``;
  evaluation: the rows sorted by key;
- rank r of W takes a contiguous part of that order: with drop_last the slice [r n, (r + 1) n), n = N // W, so
  that every rank has as many batches and DDP steps stay in lockstep (the N - W n < W samples left over sit out
  this epoch only: the next permutation leaves out others); without drop_last the range [N r / W, N (r + 1) / W),
  so that each sample comes once in the epoch over all ranks;
- that part is cut into batches of B samples; drop_last leaves out its last n % B samples.

Random crops and flips are drawn from a generator seeded by (seed, epoch, key) (`sample_rng`), so a batch's pixels
depend neither on the worker nor on the pipeline that read it.

Resuming. `set_epoch(epoch, start_batch)` or `load_state_dict({"epoch", "batch"})` makes the next pass start at
that batch of that epoch and yield exactly what an uninterrupted pass yields from there; `state_dict()` gives the
batches of the epoch passed so far. The twin hands batch j of a pass to worker j mod W, and torch's DataLoader takes
the workers' results round-robin, so the batches come out in order.

Bad samples. A sample that cannot be used is skipped and counted where its batch is read: that batch comes out one
short, and batch boundaries stay where the order puts them, so a resumed pass matches an uninterrupted one; a batch
with no usable sample at all is passed over (counted as passed, not yielded). Indexed shards hold no bad sample
(`kclip data index` leaves them out); shards without an index and CSV files may.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from kclip.data.csvfile import CsvSpec, iter_csv
from kclip.data.index import index_paths, read_dali_index, read_report
from kclip.data.shards import (
    CAPTION_EXT,
    IMAGE_EXTS,
    DataError,
    RawSample,
    decode_image,
    iter_tar,
    load_sample,
    process_context,
    resolve_shards,
    split_name,
)
from kclip.data.tokenize import Tokenizer, clip_tokenizer
from kclip.data.transforms import TransformConfig, normalize, pil_eval, pil_train

log = logging.getLogger(__name__)

META_EXT = "json"
# The fields of a sample's .json that batches carry: what each must be, and the check.
_META_CHECKS: dict[str, tuple[str, Any]] = {
    "label": ("an integer", lambda v: type(v) is int),
    "attributes": ("a list of 0/1", lambda v: isinstance(v, list) and all(type(x) is int and x in (0, 1) for x in v)),
    "tags": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "split": ("a string", lambda v: isinstance(v, str)),
}
META_FIELDS: tuple[str, ...] = tuple(_META_CHECKS)


# ---- rows: where each sample lies ------------------------------------------------------------------------------


def _key_array(keys: list[str]) -> np.ndarray:
    """Keys as numpy fixed-width UTF-8 bytes [N] (compact, sortable in code point order)."""
    return np.array([k.encode() for k in keys], dtype=bytes) if keys else np.empty(0, dtype="S1")


@dataclasses.dataclass(frozen=True)
class ShardRows:
    """Where each sample of a set of tar shards lies, in compact arrays (cheap to hold and to send to workers).

    Attributes:
        shards: the tar files.
        keys: bytes [N] (numpy ``S``), the sample keys in stored order (shard by shard, then as the tar holds them).
        shard: int32 [N], each sample's shard (an index into `shards`).
        image_ext: int8 [N], the image member's extension (an index into IMAGE_EXTS), -1 where there is none.
        spans: int64 [N, 3, 2], (offset, size) in its shard of the image, the caption (.txt) and the metadata (.json)
            of each sample, -1 where the sample has no such member.
        problems: {row: why} of the samples a header scan found unreadable (a member cut short, a tar that stops
            being readable); empty for indexed shards.
        indexed: every shard was read through its DALI index (the good samples only).
    """

    shards: tuple[str, ...]
    keys: np.ndarray
    shard: np.ndarray
    image_ext: np.ndarray
    spans: np.ndarray
    problems: dict[int, str]
    indexed: bool

    @classmethod
    def build(cls, sources: Sequence[tuple[str | os.PathLike, str | os.PathLike | None]]) -> ShardRows:
        """Rows of (shard, DALI index) pairs: from the index where there is one (its samples only), from a scan of
        the tar headers where the index is None (every sample; bad ones are found when read).

        Raises:
            DataError: an index without member names (formats before v1.2), from which no key can be read.
        """
        keys: list[str] = []
        shard_ids, exts, spans = [], [], []
        problems: dict[int, str] = {}
        for s, (shard, idx) in enumerate(sources):
            if idx is not None:
                found = ((_indexed_key(comps, idx), comps, None) for comps in read_dali_index(idx))
            else:
                found = ((r.key, r.components, r.problem) for r in iter_tar(shard, read_data=False))
            first = len(keys)
            for key, comps, problem in found:
                by_ext = {c.ext: c for c in comps}
                ext = next((e for e in IMAGE_EXTS if e in by_ext), None)
                row = [by_ext.get(e) for e in (ext, CAPTION_EXT, META_EXT)]
                spans.append([(c.offset, c.size) if c is not None else (-1, -1) for c in row])
                exts.append(IMAGE_EXTS.index(ext) if ext is not None else -1)
                if problem is not None:
                    problems[len(keys)] = problem
                keys.append(key)
            shard_ids.append(np.full(len(keys) - first, s, dtype=np.int32))
        return cls(
            shards=tuple(os.fspath(shard) for shard, _ in sources),
            keys=_key_array(keys),
            shard=np.concatenate(shard_ids) if shard_ids else np.empty(0, np.int32),
            image_ext=np.asarray(exts, dtype=np.int8),
            spans=np.asarray(spans, dtype=np.int64).reshape(-1, 3, 2),
            problems=problems,
            indexed=all(idx is not None for _, idx in sources),
        )

    @property
    def kind(self) -> str:
        """ "indexed" or "scanned" (some shard had no fresh index)."""
        return "indexed" if self.indexed else "scanned"

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, rows: Sequence[int], *, image: bool = True) -> list[RawSample]:
        """The samples at `rows`, in that order, with their members' bytes (each shard opened once per call).

        Args:
            rows: indices into this table.
            image: False leaves the image bytes unread (captions and metadata only).
        """
        out: dict[int, RawSample] = {}
        by_shard: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_shard.setdefault(int(self.shard[r]), []).append(i)
        for s, positions in by_shard.items():
            with open(self.shards[s], "rb") as f:
                for i in positions:
                    r = int(rows[i])
                    ext = IMAGE_EXTS[self.image_ext[r]] if image and self.image_ext[r] >= 0 else None
                    data = {}
                    for name, (offset, size) in zip((ext, CAPTION_EXT, META_EXT), self.spans[r].tolist(), strict=True):
                        if name is not None and offset >= 0:
                            f.seek(offset)
                            data[name] = f.read(size)
                    out[i] = RawSample(self.keys[r].decode(), [], data, self.problems.get(r))
        return [out[i] for i in range(len(rows))]


def _indexed_key(comps, idx) -> str:
    if not comps or not comps[0].name:
        raise DataError(f"{idx}: a DALI index without member names; re-run `kclip data index` to rewrite it")
    return split_name(comps[0].name)[0]


@dataclasses.dataclass(frozen=True)
class CsvRows:
    """The rows of an open_clip-style CSV file (kclip.data.csvfile).

    Attributes:
        keys: bytes [N] (numpy ``S``), the sample keys in file order.
        images: the image file of each row.
        captions: the caption of each row (stripped; empty ones are skipped as bad when read).
    """

    keys: np.ndarray
    images: tuple[str, ...]
    captions: tuple[str, ...]

    @property
    def kind(self) -> str:
        return "csv"

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, rows: Sequence[int]) -> list[RawSample]:
        """The samples at `rows`, in that order: the image file's bytes and the caption."""
        out = []
        for r in rows:
            key, image = self.keys[r].decode(), self.images[r]
            try:
                data = {"jpg": Path(image).read_bytes(), CAPTION_EXT: self.captions[r].encode()}
            except OSError as e:
                out.append(RawSample(key, [], {}, problem=f"image file unreadable: {e.strerror or e}: {image}"))
                continue
            out.append(RawSample(key, [], data))
        return out


Plan = ShardRows | CsvRows


def shard_sources(
    shards: Sequence[str | os.PathLike], index_dir: str | os.PathLike | None = None
) -> list[tuple[Path, Path | None]]:
    """(shard, its DALI index or None) for `ShardRows.build`: the index where a fresh one exists, None where the
    shard has no index or an index older than the shard; a shard whose fresh index holds no good sample is left out.
    """
    out = []
    for shard in map(Path, shards):
        report = read_report(shard, index_dir)
        if report is None:
            out.append((shard, None))
        elif report["idx"] is not None:
            out.append((shard, index_paths(shard, index_dir)[0]))
    return out


def plan_shards(path: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> ShardRows:
    """The rows of the shards a path names (see `shard_sources`)."""
    return ShardRows.build(shard_sources(resolve_shards(path), index_dir))


def plan_csv(path: str | os.PathLike, spec: CsvSpec | None = None) -> CsvRows:
    """The rows of an open_clip-style CSV file.

    Raises:
        DataError: the file is missing or lacks its columns.
    """
    keys, images, captions = [], [], []
    for row in iter_csv(path, spec or CsvSpec()):
        keys.append(row.key)
        images.append(str(row.image))
        captions.append(row.caption)
    return CsvRows(_key_array(keys), tuple(images), tuple(captions))


# ---- the order ---------------------------------------------------------------------------------------------------


def _rank_range(n: int, rank: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    if drop_last:
        per = n // world_size
        return rank * per, (rank + 1) * per
    return n * rank // world_size, n * (rank + 1) // world_size


def num_batches(n: int, *, batch_size: int, rank: int, world_size: int, drop_last: bool) -> int:
    """Batches of one rank's epoch over n samples (the length of `epoch_batches`)."""
    lo, hi = _rank_range(n, rank, world_size, drop_last)
    return (hi - lo) // batch_size if drop_last else -(-(hi - lo) // batch_size)


def epoch_batches(
    keys: np.ndarray,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    drop_last: bool,
) -> list[np.ndarray]:
    """The rows of each batch of one rank's epoch, the order both loaders follow (see the module docstring).

    Args:
        keys: the sample keys of the rows, [N] (evaluation order sorts them).
        batch_size: samples per batch.
        epoch, seed: pick the permutation when shuffling.
        shuffle: a permutation of the rows; False: key order.
        rank, world_size: this process's part.
        drop_last: equal parts per rank and full batches only.

    Returns:
        int64 row indices of each batch, in order.
    """
    n = len(keys)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.argsort(keys, kind="stable")
    lo, hi = _rank_range(n, rank, world_size, drop_last)
    part = order[lo:hi]
    count = num_batches(n, batch_size=batch_size, rank=rank, world_size=world_size, drop_last=drop_last)
    return [part[j * batch_size : (j + 1) * batch_size] for j in range(count)]


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The generator of one sample's random crop and flip in one epoch, the same whatever worker or pipeline reads
    it."""
    return random.Random(f"{seed}/{epoch}/{key}")


def check_order_args(*, batch_size: int, rank: int, world_size: int, seed: int) -> None:
    """Raise ValueError for arguments `epoch_batches` cannot use."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


@dataclasses.dataclass(frozen=True)
class EpochOrder:
    """The arguments of `epoch_batches` but the keys and the epoch, checked once: what both loaders hold."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    shuffle: bool
    drop_last: bool

    def __post_init__(self):
        check_order_args(batch_size=self.batch_size, rank=self.rank, world_size=self.world_size, seed=self.seed)

    def batches(self, keys: np.ndarray, epoch: int) -> list[np.ndarray]:
        """The rows of each batch of this rank's epoch `epoch` over rows with these keys (`epoch_batches`)."""
        return epoch_batches(keys, epoch=epoch, **dataclasses.asdict(self))

    def count(self, n: int) -> int:
        """Batches of this rank's epoch over n samples (`num_batches`)."""
        return num_batches(
            n, batch_size=self.batch_size, rank=self.rank, world_size=self.world_size, drop_last=self.drop_last
        )


# ---- sample metadata ---------------------------------------------------------------------------------------------


def sample_metadata(data: bytes | None) -> tuple[dict[str, Any], str | None]:
    """(the META_FIELDS a sample's .json holds, None), or ({}, why) for a .json that cannot be used; ({}, None)
    without one."""
    if data is None:
        return {}, None
    try:
        record = json.loads(data)
    except ValueError:  # UnicodeDecodeError is one
        return {}, "metadata .json does not parse"
    if not isinstance(record, dict):
        return {}, "metadata .json is not an object"
    meta = {name: record[name] for name in META_FIELDS if record.get(name) is not None}
    for name, value in meta.items():
        want, check = _META_CHECKS[name]
        if not check(value):
            return {}, f"metadata .json: {name} is not {want}"
    return meta, None


def usable_sample(sample: RawSample, load) -> tuple[dict[str, Any], str | None, Any, str | None]:
    """(metadata, caption, image, None) of a usable sample, or ({}, None, None, why): its .json checked first
    (`sample_metadata`), then `load(sample)` -> (caption, image or its size, why) as each pipeline reads images."""
    meta, why = sample_metadata(sample.data.get(META_EXT))
    if why is not None:
        return {}, None, None, why
    caption, image, why = load(sample)
    return meta, caption, image, why


def collate_metadata(metas: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """The batch fields of the samples' metadata: "label" int64 [B], "attributes" uint8 [B, A], "tags" and "split"
    lists, each only where every sample has it.

    Raises:
        DataError: attribute vectors of different lengths in one batch.
    """
    out: dict[str, Any] = {}
    if not metas:
        return out
    for name in META_FIELDS:
        if not all(name in m for m in metas):
            continue
        values = [m[name] for m in metas]
        if name == "label":
            out[name] = torch.tensor(values, dtype=torch.long)  # [B]
        elif name == "attributes":
            if len({len(v) for v in values}) > 1:
                lengths = {k: len(v) for k, v in zip(keys, values, strict=True)}
                raise DataError(f"attribute vectors of different lengths in one batch: {lengths}")
            out[name] = torch.from_numpy(np.asarray(values, dtype=np.uint8).reshape(len(values), -1))  # [B, A]
        else:
            out[name] = values
    return out


# ---- the CPU twin ------------------------------------------------------------------------------------------------


class TwinDataset(IterableDataset):
    """The batches of one pass (see the module docstring), built inside the DataLoader workers: worker w of W builds
    batches start_batch + w, start_batch + w + W, ... of the epoch.

    Each batch also carries ``"bad"``: [(key, reason)] of its samples skipped, which `CpuLoader` pops and counts.

    Attributes:
        epoch, start_batch: the pass to build (`CpuLoader` sets them on a copy for each pass).
    """

    def __init__(
        self,
        plan: Plan,
        cfg: TransformConfig,
        *,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
        tokenizer: Tokenizer | None = None,
    ):
        self.plan, self.cfg, self.train, self.tokenizer = plan, cfg, train, tokenizer
        self.order = EpochOrder(batch_size, rank, world_size, seed, train if shuffle is None else shuffle, drop_last)
        self.epoch = 0
        self.start_batch = 0

    def num_batches(self) -> int:
        """Batches of this rank's epoch."""
        return self.order.count(len(self.plan))

    def batches(self) -> list[np.ndarray]:
        """The rows of each batch of this rank's epoch (`epoch_batches`)."""
        return self.order.batches(self.plan.keys, self.epoch)

    def load_batch(self, rows: np.ndarray) -> dict[str, Any]:
        """Read, decode and transform the samples at `rows` into a batch (bad ones skipped into "bad")."""
        images, keys, captions, metas, bad = [], [], [], [], []
        for sample in self.plan.read(rows):
            meta, caption, img, why = usable_sample(sample, load_sample)
            if why is not None:
                bad.append((sample.key, why))
                continue
            if self.train:
                images.append(pil_train(img, self.cfg, sample_rng(self.order.seed, self.epoch, sample.key)))
            else:
                images.append(pil_eval(img, self.cfg))
            keys.append(sample.key)
            captions.append(caption)
            metas.append(meta)
        if images:
            image = normalize(np.stack(images), self.cfg)  # [B, 3, S, S]
            tokens = (self.tokenizer or clip_tokenizer())(captions)  # [B, 77]
        else:
            s = self.cfg.image_size
            image, tokens = torch.empty(0, 3, s, s), torch.empty(0, 0, dtype=torch.long)
        batch = {"image": image, "tokens": tokens, "key": keys, "caption": captions}
        return {**batch, **collate_metadata(metas, keys), "bad": bad}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        batches = self.batches()
        for j in range(self.start_batch + worker, len(batches), workers):
            yield self.load_batch(batches[j])


class EpochPosition:
    """Where a loader stands in its epochs, for `set_epoch`, `state_dict` and `load_state_dict` (both loaders): the
    epoch of the next (or current) pass, the batch it starts at, and the batches of the epoch passed so far."""

    epoch: int = 0
    _start: int = 0  # the batch the next pass starts at
    _position: int = 0  # batches of the epoch passed

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next pass epoch `epoch` (its own permutation), from its batch `start_batch`."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside the epoch's {len(self)} batches")
        self.epoch, self._start, self._position = epoch, start_batch, start_batch

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "batch"}: the epoch and its batches passed so far (yielded, or passed over for want of a usable
        sample); `load_state_dict` of it makes the next pass resume with the batch after them."""
        return {"epoch": self.epoch, "batch": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume where `state_dict()` was taken (see `set_epoch`)."""
        self.set_epoch(int(state["epoch"]), int(state["batch"]))


class CpuLoader(EpochPosition):
    """Iterate the batches of a TwinDataset through a torch DataLoader, resumably; counts the samples skipped as bad.

    Attributes:
        epoch: the epoch of the next (or current) pass.
        bad: [(key, reason)] of every sample skipped so far.
        skipped: Counter of reasons (details such as file names stripped).
    """

    def __init__(self, dataset: TwinDataset, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2):
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.bad: list[tuple[str, str]] = []
        self.skipped: Counter[str] = Counter()
        self.epoch = 0
        self._start = 0  # the batch the next pass starts at
        self._position = 0  # batches of the epoch passed

    def __len__(self) -> int:
        return self.dataset.num_batches()

    def sample_keys(self) -> np.ndarray:
        """The keys (bytes [N]) of every sample of the data set, all ranks', in stored order."""
        return self.dataset.plan.keys

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = copy.copy(self.dataset)
        dataset.epoch, dataset.start_batch = self.epoch, self._start
        self._position, self._start = self._start, 0  # a later pass without set_epoch replays the epoch whole
        return self._pass(dataset)

    def _pass(self, dataset: TwinDataset) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
            multiprocessing_context=process_context() if self.num_workers > 0 else None,
        )
        skipped = 0
        for batch in loader:
            self._position += 1
            bad = batch.pop("bad")
            if bad:
                skipped += len(bad)
                self.bad.extend((k, r) for k, r in bad)
                self.skipped.update(r.split(":", 1)[0] for _, r in bad)
            if batch["key"]:
                yield batch
        if skipped:
            log.warning("skipped %d bad samples this epoch (%s)", skipped, dict(self.skipped))


def cpu_loader(
    plan: Plan,
    cfg: TransformConfig,
    *,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool | None = None,
    drop_last: bool = False,
    tokenizer: Tokenizer | None = None,
    pin_memory: bool = False,
) -> CpuLoader:
    """The CPU twin over a plan (`plan_shards`, or `plan_csv`)."""
    dataset = TwinDataset(
        plan,
        cfg,
        batch_size=batch_size,
        train=train,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        tokenizer=tokenizer,
    )
    return CpuLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)


# ---- image lists (evaluation sets: AWA2, CUB, the synthetic set) ----------------------------------------------


class ImageListDataset(Dataset):
    """Images named by file, or by their span inside a tar shard, with the deterministic evaluation transform; an
    image that fails to load yields None (dropped and reported by `collate_images`).

    Item: (image float32 [3, S, S] or None, index, why).
    """

    def __init__(self, paths: list[Path], cfg: TransformConfig, spans: np.ndarray | None = None):
        self.paths, self.cfg, self.spans = paths, cfg, spans

    def __len__(self) -> int:
        return len(self.paths)

    def _where(self, i: int) -> str:
        return str(self.paths[i]) if self.spans is None else f"{self.paths[i]} at byte {int(self.spans[i, 0])}"

    def __getitem__(self, i: int):
        try:
            if self.spans is None:
                data = Path(self.paths[i]).read_bytes()
            else:
                with open(self.paths[i], "rb") as f:
                    f.seek(int(self.spans[i, 0]))
                    data = f.read(int(self.spans[i, 1]))
            img = decode_image(data)
        except Exception as e:  # unreadable or undecodable image: one sample lost, not the epoch
            return None, i, f"{self._where(i)}: {type(e).__name__}: {e}"
        return normalize(pil_eval(img, self.cfg)[None], self.cfg)[0], i, None


def collate_images(items) -> dict[str, Any]:
    """{"image": [B, 3, S, S], "index": int64 [B], "bad": [(index, reason)]} of ImageListDataset items."""
    good = [(x, i) for x, i, why in items if why is None]
    image = torch.stack([x for x, _ in good]) if good else torch.empty(0)
    return {
        "image": image,
        "index": torch.tensor([i for _, i in good], dtype=torch.long),
        "bad": [(i, why) for _, i, why in items if why is not None],
    }


def image_spans(
    shards: Sequence[str | os.PathLike], keys: Sequence[str], index_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """int64 [N, 2]: (offset, size) of the image of sample keys[i] inside the tar shard shards[i].

    Raises:
        DataError: a shard that holds no image for its key.
    """
    rows = ShardRows.build(shard_sources(sorted(set(map(os.fspath, shards))), index_dir))
    where = {}
    for r in range(len(rows)):
        if rows.image_ext[r] >= 0:
            where[(rows.shards[rows.shard[r]], rows.keys[r].decode())] = rows.spans[r, 0]  # the image's
    out = np.empty((len(keys), 2), dtype=np.int64)
    for i, (shard, key) in enumerate(zip(map(os.fspath, shards), keys, strict=True)):
        if (shard, key) not in where:
            raise DataError(f"{shard}: no image of sample {key}")
        out[i] = where[(shard, key)]
    return out


def image_list_loader(
    paths: list[Path],
    cfg: TransformConfig,
    batch_size: int = 64,
    num_workers: int = 0,
    spans: np.ndarray | None = None,
) -> DataLoader:
    """DataLoader over images in list order for evaluation (see ImageListDataset and collate_images).

    Args:
        paths: image files, or the tar shards holding the images.
        spans: None for image files; int64 [N, 2], (offset, size) of each image in its tar (`image_spans`).
    """
    return DataLoader(
        ImageListDataset(paths, cfg, spans),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        multiprocessing_context=process_context() if num_workers > 0 else None,
    )
