"""`kclip data index`: check every sample of a set of shards once and write DALI index files without the bad ones.

DALI cannot skip a corrupt sample: a truncated JPEG stops the pipeline ("Critical error in pipeline"), and
``missing_component_behavior="skip"`` drops samples without counting them. So each shard ``S.tar`` gets, beside it
(or in ``index_dir``):

- ``S.idx``: DALI's webdataset index (the format of DALI's ``tools/wds2idx.py``, version ``v1.2``: a line
  ``v1.2 <samples>``, then per sample ``<ext> <offset> <size> <name>`` for each of its files) listing only the
  samples whose image decodes and whose caption exists;
- ``S_index.json``: what was left out and why, with the tar's size and modification time, so that an index older
  than its shard is seen as stale.

DALI only ever reads indexed shards: `indexed_shards` refuses shards without a fresh index, naming the command.
A shard with no good sample gets no ``.idx`` (DALI rejects an index of zero samples) and is left out of training.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from kclip._atomic import atomic_write_text
from kclip.data.shards import (
    Component,
    DataError,
    check_sample,
    cpu_count,
    iter_tar,
    resolve_shards,
)

log = logging.getLogger(__name__)

FORMAT = "kclip.wds_index"
VERSION = 1
DALI_INDEX_VERSION = "v1.2"


def index_paths(shard: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(DALI index, report) paths of a shard: ``S.idx`` and ``S_index.json`` beside it or in `index_dir`."""
    shard = Path(shard)
    folder = Path(index_dir) if index_dir is not None else shard.parent
    stem = shard.name[: -len(".tar")] if shard.name.endswith(".tar") else shard.name
    return folder / f"{stem}.idx", folder / f"{stem}_index.json"


def _tar_identity(shard: Path) -> dict[str, int]:
    st = shard.stat()
    return {"tar_size": st.st_size, "tar_mtime_ns": st.st_mtime_ns}


def scan_shard(shard: str | os.PathLike) -> dict[str, Any]:
    """Check every sample of one shard. Returns the report record (see `index_shard`) plus ``good``: the
    components of each usable sample, in stored order."""
    shard = Path(shard)
    good: list[list[Component]] = []
    bad: list[dict[str, str]] = []
    total = 0
    for sample in iter_tar(shard):
        total += 1
        _, why = check_sample(sample)
        if why is None:
            good.append(sample.components)
        else:
            bad.append({"key": sample.key, "reason": why})
    return {
        "format": FORMAT,
        "version": VERSION,
        "shard": shard.name,
        **_tar_identity(shard),
        "samples": total,
        "good_samples": len(good),
        "bad": bad,
        "good": good,
    }


def _dali_index_text(good: list[list[Component]]) -> str:
    lines = [f"{DALI_INDEX_VERSION} {len(good)}"]
    lines += [" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in comps) for comps in good]
    return "\n".join(lines) + "\n"


def index_shard(shard: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check one shard and write its ``.idx`` and ``_index.json`` (both written to a temporary name and renamed).

    Returns:
        the report: shard name, tar size and mtime, ``samples`` (all), ``good_samples``, ``bad`` ([{key, reason}]),
        ``idx`` (the index file's name, None when no sample is good), ``created``.
    """
    shard = Path(shard)
    idx, report_path = index_paths(shard, index_dir)
    idx.parent.mkdir(parents=True, exist_ok=True)
    record = scan_shard(shard)
    good = record.pop("good")
    if good:
        atomic_write_text(idx, _dali_index_text(good))
    elif idx.exists():
        idx.unlink()
    record["idx"] = idx.name if good else None
    record["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    # The report goes last: a report that exists vouches for the .idx written before it.
    atomic_write_text(report_path, json.dumps(record, indent=1))
    return record


def _pool(workers: int):
    from kclip.data.shards import process_context

    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=process_context())


def _map(fn, items: list, workers: int | None, desc: str, progress: bool) -> list:
    from tqdm.auto import tqdm

    workers = max(1, min(workers or cpu_count(), len(items)))
    with tqdm(total=len(items), unit="shard", desc=desc, disable=not progress) as bar:
        if workers == 1:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        with _pool(workers) as pool:
            out = []
            for r in pool.map(fn, items):
                out.append(r)
                bar.update()
            return out


def _index_one(args: tuple) -> dict[str, Any]:
    return index_shard(*args)


def index_dataset(
    path: str | os.PathLike,
    *,
    index_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Index every shard a path names (see `resolve_shards`), shards in parallel processes.

    Returns:
        {"shards": [report per shard], "samples", "good_samples", "bad_samples", "reasons": {reason: count}}.
    """
    shards = resolve_shards(path)
    reports = _map(_index_one, [(s, index_dir) for s in shards], workers, "index", progress)
    return summarise(reports)


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    reasons = Counter(_reason_class(b["reason"]) for r in reports for b in r["bad"])
    return {
        "shards": reports,
        "samples": sum(r["samples"] for r in reports),
        "good_samples": sum(r["good_samples"] for r in reports),
        "bad_samples": sum(len(r["bad"]) for r in reports),
        "reasons": dict(reasons.most_common()),
    }


def _reason_class(reason: str) -> str:
    """The reason without its details (file names, byte counts), for the counts of a summary."""
    return reason.split(":", 1)[0] if reason.startswith("image does not decode") else reason.split(" (", 1)[0]


def read_report(shard: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The index report of a shard when it exists and matches the shard's current size and mtime, else None."""
    shard = Path(shard)
    idx, report_path = index_paths(shard, index_dir)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None
    if report.get("format") != FORMAT or {k: report.get(k) for k in ("tar_size", "tar_mtime_ns")} != _tar_identity(
        shard
    ):
        return None
    if report.get("idx") is not None and not idx.exists():
        return None
    return report


@dataclasses.dataclass
class IndexedShards:
    """Shards with fresh DALI indexes, as training reads them.

    Attributes:
        paths: tar shards holding at least one good sample.
        index_paths: their ``.idx`` files, in the same order.
        counts: good samples per shard.
        skipped: shards left out because none of their samples is good.
        bad_samples: samples the index leaves out, over all shards.
    """

    paths: list[Path]
    index_paths: list[Path]
    counts: list[int]
    skipped: list[Path]
    bad_samples: int

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def indexed_shards(path: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> IndexedShards:
    """The shards a path names, each with its fresh index; refuses shards without one.

    Raises:
        DataError: a shard has no index, or one older than the shard (the message names `kclip data index`), or
            no shard holds a good sample.
    """
    shards = resolve_shards(path)
    paths, idxs, counts, skipped, missing = [], [], [], [], []
    bad = 0
    for shard in shards:
        report = read_report(shard, index_dir)
        if report is None:
            missing.append(shard)
            continue
        bad += len(report["bad"])
        if report["idx"] is None:
            skipped.append(shard)
            continue
        paths.append(shard)
        idxs.append(index_paths(shard, index_dir)[0])
        counts.append(report["good_samples"])
    if missing:
        where = f" --index-dir {index_dir}" if index_dir is not None else ""
        names = ", ".join(str(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(
            f"{len(missing)} of {len(shards)} shards have no index, or one older than the shard ({names}); "
            f"DALI only reads indexed shards: run `kclip data index {os.fspath(path)}{where}` first"
        )
    if not paths:
        raise DataError(f"{os.fspath(path)}: no shard holds a usable sample (see `kclip data inspect`)")
    if skipped:
        log.warning("%d shards hold no usable sample and are left out", len(skipped))
    return IndexedShards(paths, idxs, counts, skipped, bad)


def read_dali_index(idx: str | os.PathLike) -> list[list[Component]]:
    """The samples of a ``v1.2`` (or ``v1.1``/``v1.0``, without names) DALI index file, as component lists."""
    with open(idx) as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1."):
            raise DataError(f"{idx}: not a DALI webdataset index (header {' '.join(header)!r})")
        with_names = header[0] == DALI_INDEX_VERSION
        samples = []
        for line in f:
            fields = line.split()
            step = 4 if with_names else 3
            comps = [
                Component(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3] if with_names else "")
                for i in range(0, len(fields), step)
            ]
            samples.append(comps)
    if len(samples) != int(header[1]):
        raise DataError(f"{idx}: header says {header[1]} samples, file has {len(samples)}")
    return samples


def _inspect_one(args: tuple) -> dict[str, Any]:
    shard, index_dir = args
    report = read_report(shard, index_dir)
    if report is not None:
        return {**report, "indexed": True}
    record = scan_shard(shard)
    record.pop("good")
    return {**record, "indexed": False}


def inspect_dataset(
    path: str | os.PathLike,
    *,
    index_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Samples, bad samples and why, for every shard a path names: from fresh index reports where they exist,
    by reading the shard otherwise (nothing is written)."""
    shards = resolve_shards(path)
    reports = _map(_inspect_one, [(s, index_dir) for s in shards], workers, "inspect", progress)
    out = summarise(reports)
    out["indexed_shards"] = sum(r["indexed"] for r in reports)
    return out


__all__ = [
    "DataError",
    "IndexedShards",
    "index_dataset",
    "index_paths",
    "index_shard",
    "indexed_shards",
    "inspect_dataset",
    "read_dali_index",
    "read_report",
    "scan_shard",
]
