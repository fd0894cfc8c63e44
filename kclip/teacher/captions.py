"""(key, caption) pairs of a dataset, read without touching the images.

kclip.data's readers decode images; the teacher needs only the captions. For webdataset shards with a fresh
`kclip data index`, the samples are those the index keeps (exactly the ones training reads) and only their ``.txt``
members are read, at the offsets the index gives. Unindexed shards are walked through their tar headers, again
reading only the ``.txt`` members. CSV rows come from kclip.data.csvfile.

A sample without a caption, or with an empty one, is skipped and counted, as the loaders of training skip it:
nothing downstream ever asks the teacher for such a key.

Sharding for torchrun: with at least as many shards as ranks, rank r takes shards r, r + W, ...; otherwise (or for
a CSV) samples are dealt round-robin by their position in the dataset.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from kclip.data.csvfile import CsvSpec, check_csv, iter_csv
from kclip.data.index import read_dali_index, read_report
from kclip.data.pipeline import detect_format
from kclip.data.shards import CAPTION_EXT, DataError, iter_tar, resolve_shards, split_name


@dataclasses.dataclass(frozen=True)
class CaptionSource:
    """What a rank reads: the dataset path, its format, this rank's shards and how to split samples."""

    path: str
    kind: str  # "indexed", "stream" or "csv"
    shards: tuple[str, ...] = ()
    index_files: tuple[str | None, ...] = ()
    counts: tuple[int | None, ...] = ()
    rank: int = 0
    world_size: int = 1
    by_sample: bool = False  # deal samples round-robin (fewer shards than ranks, or a CSV)
    csv_spec: CsvSpec | None = None

    @property
    def count(self) -> int | None:
        """Samples this rank reads, where the indexes say (None otherwise)."""
        if self.kind != "indexed":
            return None
        n = sum(c or 0 for c in self.counts)
        return len(range(self.rank, n, self.world_size)) if self.by_sample else n


def caption_source(
    path: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    index_dir: str | os.PathLike | None = None,
    csv_spec: CsvSpec | None = None,
) -> CaptionSource:
    """Resolve a dataset path for one rank (see the module docstring); a CSV's columns are checked here, before
    anything slow (a model load) starts.

    Raises:
        DataError: the path does not exist, is not a dataset kclip reads, or is a CSV without its columns.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    text = os.fspath(path)
    if detect_format(text) == "csv":
        check_csv(text, csv_spec)
        return CaptionSource(text, "csv", rank=rank, world_size=world_size, by_sample=True, csv_spec=csv_spec)
    shards = resolve_shards(text)
    reports = [read_report(s, index_dir) for s in shards]
    by_sample = len(shards) < world_size
    if all(r is not None for r in reports):
        folder = (lambda s: Path(index_dir)) if index_dir is not None else (lambda s: s.parent)
        kept = [(s, r) for s, r in zip(shards, reports, strict=True) if r["idx"] is not None]
        if not by_sample:
            kept = kept[rank::world_size]
        return CaptionSource(
            text,
            "indexed",
            tuple(str(s) for s, _ in kept),
            tuple(str(folder(s) / r["idx"]) for s, r in kept),
            tuple(r["good_samples"] for _, r in kept),
            rank,
            world_size,
            by_sample,
        )
    if not by_sample:
        shards = shards[rank::world_size]
    return CaptionSource(
        text, "stream", tuple(str(s) for s in shards), rank=rank, world_size=world_size, by_sample=by_sample
    )


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{where}: caption is not UTF-8") from None


def _samples(src: CaptionSource) -> Iterator[tuple[str, str | None, str]]:
    """(key, caption or None when missing, where) of every sample of the source's shards, in dataset order."""
    if src.kind == "csv":
        for row in iter_csv(src.path, src.csv_spec):
            yield row.key, row.caption, f"{src.path} row {row.row}"
        return
    if src.kind == "indexed":
        for shard, idx in zip(src.shards, src.index_files, strict=True):
            with open(shard, "rb") as f:
                for comps in read_dali_index(idx):
                    if not comps[0].name:
                        raise DataError(
                            f"{idx}: an index without member names (older than v1.2); rerun `kclip data index`"
                        )
                    key = split_name(comps[0].name)[0]
                    txt = next((c for c in comps if c.ext == CAPTION_EXT), None)
                    where = f"{shard} sample {key}"
                    if txt is None:
                        yield key, None, where
                        continue
                    f.seek(txt.offset)
                    yield key, _decode(f.read(txt.size), where), where
        return
    for shard in src.shards:
        with open(shard, "rb") as f:
            for sample in iter_tar(shard, read_data=False):
                where = f"{shard} sample {sample.key}"
                if sample.problem is not None:
                    raise DataError(f"{where}: {sample.problem}; run `kclip data index` to leave bad samples out")
                txt = next((c for c in sample.components if c.ext == CAPTION_EXT), None)
                if txt is None:
                    yield sample.key, None, where
                    continue
                f.seek(txt.offset)
                yield sample.key, _decode(f.read(txt.size), where), where


def iter_captions(src: CaptionSource, bad: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, str]]:
    """(key, caption) of this rank's samples, in dataset order; a sample without a caption or with an empty one
    is skipped, and (where, reason) of it appended to `bad` when given.

    Raises:
        DataError: a caption that is not UTF-8, or an unreadable sample of an unindexed shard.
    """
    for i, (key, caption, where) in enumerate(_samples(src)):
        if src.by_sample and i % src.world_size != src.rank:
            continue
        if not caption:
            if bad is not None:
                bad.append((where, "empty caption" if caption == "" else "no caption (.txt)"))
            continue
        yield key, caption
