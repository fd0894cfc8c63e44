"""The CPU twin of the DALI pipeline: a torch DataLoader that decodes with PIL and applies the same transforms.

It serves where DALI or a GPU is absent, reads the same shards (through their DALI index where one is fresh, so it
yields the very samples DALI yields, in the same order without shuffling), and skips and counts bad samples on its
own: a truncated JPEG or a missing caption costs one sample, never the epoch.

Batches from both pipelines are dicts::

    {"image": float32 [B, 3, S, S] (CLIP-normalised), "tokens": int64 [B, 77], "key": list[str], "caption": list[str]}

Sharding by rank follows DALI's rule where the shards are indexed (rank r of W reads the contiguous range
[N r / W, N (r + 1) / W) of the N samples); otherwise shards are dealt to (rank, worker) pairs, or samples when
there are fewer shards than readers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from kclip.data.csvfile import CsvSpec, iter_csv
from kclip.data.index import read_dali_index, read_report
from kclip.data.shards import RawSample, decode_image, iter_tar, load_sample, read_indexed, resolve_shards
from kclip.data.tokenize import Tokenizer, clip_tokenizer
from kclip.data.transforms import TransformConfig, normalize, pil_eval, pil_train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What to read, resolved once in the main process (picklable, sent to the workers)."""

    kind: str  # "indexed" (every shard has a fresh index), "stream" (tar files read through) or "csv"
    shards: tuple[str, ...] = ()
    index_files: tuple[str | None, ...] = ()
    counts: tuple[int, ...] = ()
    csv: str | None = None
    csv_spec: CsvSpec | None = None


def plan_shards(path: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> _Plan:
    """Resolve a shard path; use the DALI indexes when every shard has a fresh one."""
    shards = resolve_shards(path)
    reports = [read_report(s, index_dir) for s in shards]
    if all(r is not None for r in reports):
        folder = (lambda s: Path(index_dir)) if index_dir is not None else (lambda s: s.parent)
        keep = [(s, r) for s, r in zip(shards, reports, strict=True) if r["idx"] is not None]
        return _Plan(
            "indexed",
            tuple(str(s) for s, _ in keep),
            tuple(str(folder(s) / r["idx"]) for s, r in keep),
            tuple(r["good_samples"] for _, r in keep),
        )
    return _Plan("stream", tuple(str(s) for s in shards))


def _csv_sample(row) -> RawSample:
    try:
        data = {"jpg": row.image.read_bytes(), "txt": row.caption.encode()}
    except OSError as e:
        return RawSample(row.key, [], {}, problem=f"image file unreadable: {e.strerror or e}: {row.image}")
    return RawSample(row.key, [], data)


class TwinDataset(IterableDataset):
    """Batches of decoded, transformed samples (see the module docstring), built inside the DataLoader workers.

    Each batch also carries ``"bad"``: [(key, reason)] of the samples skipped since the previous batch, which
    `CpuLoader` pops and counts.
    """

    def __init__(
        self,
        plan: _Plan,
        cfg: TransformConfig,
        *,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool | None = None,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        tokenizer: Tokenizer | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.plan, self.cfg, self.batch_size, self.train = plan, cfg, batch_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = train if shuffle is None else shuffle
        self.shuffle_buffer, self.drop_last, self.tokenizer = shuffle_buffer, drop_last, tokenizer
        self.epoch = 0

    def num_samples(self) -> int | None:
        """Samples this rank reads per epoch, where the plan knows it (indexed shards)."""
        if self.plan.kind != "indexed":
            return None
        n = sum(self.plan.counts)
        return n * (self.rank + 1) // self.world_size - n * self.rank // self.world_size

    # -- which raw samples this reader gets --

    def _raw(self, reader: int, readers: int) -> Iterator[RawSample]:
        plan = self.plan
        if plan.kind == "indexed":
            # DALI's split by rank: a contiguous range of the global sample order, then split again by worker.
            n = sum(plan.counts)
            lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
            workers = readers // self.world_size
            w = reader - self.rank * workers
            lo, hi = lo + (hi - lo) * w // workers, lo + (hi - lo) * (w + 1) // workers
            start = 0
            for shard, idx, count in zip(plan.shards, plan.index_files, plan.counts, strict=True):
                if start < hi and start + count > lo:
                    entries = read_dali_index(idx)[max(0, lo - start) : hi - start]
                    yield from read_indexed(shard, entries)
                start += count
        elif plan.kind == "stream":
            shards = list(plan.shards)
            if self.shuffle:
                random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
            if len(shards) >= readers:
                for shard in shards[reader::readers]:
                    yield from iter_tar(shard)
            else:
                j = 0
                for shard in shards:
                    for sample in iter_tar(shard):
                        if j % readers == reader:
                            yield sample
                        j += 1
        else:
            for row in iter_csv(plan.csv, plan.csv_spec):
                if row.row % readers == reader:
                    yield _csv_sample(row)

    def _shuffled(self, samples: Iterator[RawSample], rng: random.Random) -> Iterator[RawSample]:
        buf: list[RawSample] = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    # -- batches --

    def _batch(self, images: list[np.ndarray], keys: list[str], captions: list[str], bad: list) -> dict[str, Any]:
        tokenizer = self.tokenizer or clip_tokenizer()
        if images:
            image = normalize(np.stack(images), self.cfg)  # [B, 3, S, S]
            tokens = tokenizer(captions)  # [B, 77]
        else:
            s = self.cfg.image_size
            image, tokens = torch.empty(0, 3, s, s), torch.empty(0, 0, dtype=torch.long)
        return {"image": image, "tokens": tokens, "key": keys, "caption": captions, "bad": bad}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.seed}/{self.epoch}/{reader}")
        samples = self._raw(reader, readers)
        if self.shuffle:
            samples = self._shuffled(samples, rng)
        images, keys, captions, bad = [], [], [], []
        for sample in samples:
            caption, img, why = load_sample(sample)
            if why is not None:
                bad.append((sample.key, why))
                continue
            images.append(pil_train(img, self.cfg, rng) if self.train else pil_eval(img, self.cfg))
            keys.append(sample.key)
            captions.append(caption)
            if len(images) == self.batch_size:
                yield self._batch(images, keys, captions, bad)
                images, keys, captions, bad = [], [], [], []
        if images and not self.drop_last:
            yield self._batch(images, keys, captions, bad)
        elif bad:
            yield self._batch([], [], [], bad)


class CpuLoader:
    """Iterate batches of a TwinDataset through a torch DataLoader; counts the samples skipped as bad.

    Attributes:
        bad: [(key, reason)] of every sample skipped so far.
        skipped: Counter of reasons (details such as file names stripped).
    """

    def __init__(self, dataset: TwinDataset, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2):
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.bad: list[tuple[str, str]] = []
        self.skipped: Counter[str] = Counter()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (the workers get a fresh copy of the dataset each epoch)."""
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        n = self.dataset.num_samples()
        if n is None:
            raise TypeError("the number of batches is unknown for unindexed shards and CSV files")
        b = self.dataset.batch_size
        return n // b if self.dataset.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
        )
        skipped = 0
        for batch in loader:
            bad = batch.pop("bad")
            if bad:
                skipped += len(bad)
                self.bad.extend((k, r) for k, r in bad)
                self.skipped.update(r.split(":", 1)[0] for _, r in bad)
            if batch["key"]:
                yield batch
        if skipped:
            log.warning("skipped %d bad samples this epoch (%s)", skipped, dict(self.skipped))


# ---- image lists (evaluation sets: AWA2, CUB) ----------------------------------------------------------------


class ImageListDataset(Dataset):
    """Images named by path, with the deterministic evaluation transform; a file that fails to load yields None
    (dropped and reported by `collate_images`).

    Item: (image float32 [3, S, S] or None, index, path).
    """

    def __init__(self, paths: list[Path], cfg: TransformConfig):
        self.paths, self.cfg = paths, cfg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = decode_image(Path(self.paths[i]).read_bytes())
        except Exception as e:  # unreadable or undecodable file: one sample lost, not the epoch
            return None, i, f"{self.paths[i]}: {type(e).__name__}: {e}"
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


def image_list_loader(
    paths: list[Path], cfg: TransformConfig, batch_size: int = 64, num_workers: int = 0
) -> DataLoader:
    """DataLoader over image files for evaluation (see ImageListDataset and collate_images)."""
    return DataLoader(
        ImageListDataset(paths, cfg),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
    )


def cpu_loader(
    plan: _Plan,
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


def plan_csv(path: str | os.PathLike, spec: CsvSpec | None = None) -> _Plan:
    from kclip.data.csvfile import check_csv

    spec = spec or CsvSpec()
    check_csv(path, spec)
    return _Plan("csv", csv=str(path), csv_spec=spec)
