"""`kclip teacher embed`: every caption of a dataset through the teacher, once, into a resumable store.

Captions stream from the dataset (kclip.teacher.captions) into parts of `part_size` captions; each part is sorted
by token length inside itself (so batches hold captions of similar length and little compute goes to padding),
embedded, and written whole (kclip.teacher.store). A resumed run skips the keys of the parts already written.
Under torchrun every rank embeds its share of the shards into the same store's parts/; the ranks then meet at a
barrier (gloo, whatever the device) and rank 0 finalises: sorts all rows by key and writes the stats.

Several splits of a dataset go into one store (``--data DIR:train,heldout,compositional``), each split read on its
own: a part holds the rows of one split, and the store records the split of every row and each split's statistics
(kclip.teacher.store). Everything a run checks that needs no model (the data paths, a CSV's columns, the device,
the options of a store it resumes) is checked before the model loads.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from kclip.data.csvfile import CsvSpec
from kclip.data.shards import SPLIT_SEP, named_splits, split_path
from kclip.teacher.captions import CaptionSource, caption_source, iter_captions
from kclip.teacher.model import DEFAULT_MODEL, DTYPES, Embedder, Teacher, TeacherError, load_teacher
from kclip.teacher.store import (
    META,
    StoreError,
    TeacherStore,
    done_keys,
    finalize,
    new_meta,
    next_part_index,
    read_meta,
    write_json,
    write_part,
)

log = logging.getLogger(__name__)

# Options that must agree between the run that started a store and the one that resumes it.
_RESUME_FIELDS = ("model", "pooling", "max_length", "data", "teacher_dtype")


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised torch.distributed) from torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    # gloo only for the barrier and one all-reduce: the embedding itself never communicates. A rank may wait
    # for the slowest one for hours, hence the long timeout.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return dist.get_rank(), dist.get_world_size(), True


def resolve_device(device: str, local_rank: int) -> torch.device:
    """The torch device of --device for this rank ("auto": its GPU where torch sees one, else the CPU).

    Raises:
        TeacherError: a device torch does not know, or a CUDA device where none is usable.
    """
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TeacherError(f"--device {device}: not a device (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TeacherError(f"--device {device}: torch sees no usable CUDA device here; use --device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


_FLAGS = {
    "model": "--model",
    "pooling": "--pooling",
    "max_length": "--max-length",
    "data": "--data",
    "teacher_dtype": "--dtype",
}


def _check_resume(out: Path, meta: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to add rows to a store made with other options (naming each option, as it was and as asked)."""
    recorded = dict(meta)
    if "teacher_dtype" not in recorded:  # stores written before the field: their compute dtype says the same
        names = {str(v).removeprefix("torch."): k for k, v in DTYPES.items()}
        recorded["teacher_dtype"] = names.get(meta.get("compute_dtype"))
    differ = [f for f in _RESUME_FIELDS if recorded.get(f) != wanted[f]]
    if differ:
        was = ", ".join(f"{_FLAGS[f]} {recorded.get(f)}" for f in differ)
        now = ", ".join(f"{_FLAGS[f]} {wanted[f]}" for f in differ)
        state = "complete" if meta.get("complete") else "partly written"
        raise StoreError(
            f"{out}: a {state} store made with {was}; this run asks for {now}. Resume with the same options, or "
            "choose another --out (or remove this store)"
        )


def embed(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    teacher: Teacher | None = None,
    pooling: str = "mean",
    max_length: int = 128,
    batch_size: int | None = None,
    dtype: str = "bf16",
    device: str = "auto",
    part_size: int = 16384,
    index_dir: str | os.PathLike | None = None,
    csv_spec: CsvSpec | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    finalize_store: bool = True,
    sort_by_length: bool = True,
    dedup: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every caption of `data` into the teacher store `out` (created, resumed, or found complete).

    Args:
        data: webdataset shards (a directory, a split DIR/train or DIR:train, a .tar, brace patterns joined by
            "::"), an open_clip-style CSV, or several splits of a dataset root, DIR:train,heldout (one store).
        out: the store directory.
        model: the teacher (kclip.teacher.model.load_teacher: "smollm2", a .gguf, a directory, a hub id).
        teacher: an already loaded Teacher, used instead of loading `model` (benchmarks, tests).
        pooling: "mean" or "last".
        max_length: tokens per caption at most.
        batch_size: captions per forward pass; None: 64 on the CPU (smaller batches keep the elementwise work in
            cache: 64 ran ~10% faster than 128 and ~20% faster than 256 with SmolLM2 on 2 cores), 256 on a GPU.
        dtype: "bf16", "fp16" or "fp32" for the model's weights and compute.
        device: "auto" (this rank's GPU where there is one, else the CPU), "cpu", "cuda", "cuda:N".
        part_size: captions per part: the unit of resumption and of length sorting.
        index_dir, csv_spec: where the shard indexes are; the columns of a CSV.
        rank, world_size: this process's share (default: torchrun's environment, else 0 of 1).
        finalize_store: finalise after the last part (with several ranks, rank 0 does it after a barrier).
        sort_by_length: False batches captions in dataset order (the benchmark's naive baseline).
        dedup: embed each distinct caption of a part once.
        progress: a tqdm bar with captions/s on rank 0.

    Returns:
        {"store", "count" (rows in the finished store, or None), "embedded" (captions embedded by this call on
        this rank), "skipped" (already in parts), "bad" (samples without a caption, skipped, on this rank),
        "seconds", "captions_per_s", "complete"}.

    Raises:
        StoreError: `out` holds a store of other options (--dtype included) or data; TeacherError: the device is
        unusable, the model cannot be loaded or a caption cannot be embedded; DataError: the data path is unusable
        (a dataset root, a CSV without its columns): all checked before the model loads.
    """
    own_group = False
    if rank is None or world_size is None:
        rank, world_size, own_group = _distributed()
    try:
        return _embed_rank(
            data,
            Path(out),
            model=model,
            teacher=teacher,
            pooling=pooling,
            max_length=max_length,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            part_size=part_size,
            index_dir=index_dir,
            csv_spec=csv_spec,
            rank=rank,
            world_size=world_size,
            finalize_store=finalize_store,
            sort_by_length=sort_by_length,
            dedup=dedup,
            progress=progress,
        )
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _data_id(data: str | os.PathLike) -> str:
    """The dataset as recorded in the store: an existing path made absolute (``DIR:SPLITS`` with DIR absolute, one
    split as its folder), anything else (patterns) as given."""
    text = os.fspath(data)
    if Path(text).exists():
        return str(Path(text).resolve())
    base, sep, names = text.rpartition(SPLIT_SEP)
    if sep and "::" not in text and Path(base).expanduser().is_dir():
        if "," not in names:
            return str(split_path(text)[0].resolve())
        return f"{Path(base).expanduser().resolve()}{SPLIT_SEP}{names}"
    return text


def _embed_rank(
    data,
    out: Path,
    *,
    model,
    teacher,
    pooling,
    max_length,
    batch_size,
    dtype,
    device,
    part_size,
    index_dir,
    csv_spec,
    rank,
    world_size,
    finalize_store,
    sort_by_length,
    dedup,
    progress,
):
    """`embed` for one rank, its process group (if any) set up."""
    from tqdm.auto import tqdm

    if part_size < 1:
        raise ValueError(f"part_size: must be positive, got {part_size}")
    data_text = _data_id(data)
    sources = {
        name: caption_source(path, rank=rank, world_size=world_size, index_dir=index_dir, csv_spec=csv_spec)
        for name, path in named_splits(data)
    }
    wanted = {
        "model": teacher.name if teacher is not None else model,
        "pooling": pooling,
        "max_length": max_length,
        "data": data_text,
        "teacher_dtype": teacher.dtype_name if teacher is not None else dtype,
    }
    meta = read_meta(out) if out.is_dir() else None
    if meta is not None:
        _check_resume(out, meta, wanted)
        if meta.get("complete"):
            return _already_complete(out, sources, world_size)
    t0 = time.perf_counter()
    if teacher is None:
        target = resolve_device(device, int(os.environ.get("LOCAL_RANK", rank)))
        teacher = load_teacher(model, dtype=dtype, device=target)
    log.info(
        "teacher %s loaded in %.1f s: width %d on %s",
        teacher.name,
        time.perf_counter() - t0,
        teacher.width,
        teacher.device,
    )
    if meta is None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        meta = new_meta(
            **wanted,
            width=teacher.width,
            source=teacher.source,
            compute_dtype=str(teacher.dtype).removeprefix("torch."),
        )
        meta["pool_skips_bos"] = pooling == "mean" and teacher.prepends_bos
        write_json(out / META, meta)
    _barrier(world_size)

    if batch_size is None:
        batch_size = 64 if teacher.device.type == "cpu" else 256
    embedder = Embedder(teacher, pooling=pooling, max_length=max_length, batch_size=batch_size)
    done = done_keys(out)
    index = next_part_index(out, rank)
    counts = [src.count for src in sources.values()]
    total_count = None if None in counts else sum(counts)
    bar = tqdm(total=total_count, unit="cap", desc=f"teacher embed [{rank}]", disable=not progress or rank != 0)
    seen = dict.fromkeys(sources, 0)
    bad: dict[str, list[tuple[str, str]]] = {name: [] for name in sources}
    skipped = embedded = 0
    keys: list[str] = []
    captions: list[str] = []
    t_embed = time.perf_counter()

    def flush(split: str) -> None:
        nonlocal index, embedded
        rows = embedder.embed(captions, sort_by_length=sort_by_length, dedup=dedup, progress=bar)
        write_part(out, rank, index, keys, rows, split=split)
        index += 1
        embedded += len(keys)
        keys.clear()
        captions.clear()

    try:
        for name, src in sources.items():
            for key, caption in iter_captions(src, bad[name]):
                seen[name] += 1
                if key.encode("ascii", "replace") in done:
                    skipped += 1
                    if bar.total is not None:
                        bar.total -= 1
                    continue
                keys.append(key)
                captions.append(caption)
                if len(keys) == part_size:
                    flush(name)
            if keys:  # a part never spans two splits
                flush(name)
            if bad[name]:
                n_bad, (where, why) = len(bad[name]), bad[name][0]
                log.warning("%s: %d samples without a caption skipped (first: %s, %s)", name, n_bad, where, why)
    finally:
        bar.close()
    seconds = time.perf_counter() - t_embed
    names = list(sources)
    sums = _all_reduce_sum([seen[n] for n in names] + [len(bad[n]) for n in names], world_size)
    _barrier(world_size)
    count = None
    if finalize_store and rank == 0:
        total = None if sums is None else sum(sums[: len(names)])
        if total == 0:
            raise StoreError(f"{data_text}: the dataset holds no sample to embed")
        splits = {
            name: {
                "data": _data_id(src.path),
                "count": None if sums is None else sums[i],
                "skipped": None if sums is None else sums[len(names) + i],
            }
            for i, (name, src) in enumerate(sources.items())
        }
        count = finalize(out, expected_count=total, splits=splits)["count"]
    _barrier(world_size)
    rate = embedded / seconds if seconds > 0 else 0.0
    log.info("teacher embed: %d captions embedded, %d already done, %.1f captions/s", embedded, skipped, rate)
    return {
        "store": str(out),
        "count": count,
        "embedded": embedded,
        "skipped": skipped,
        "bad": sum(len(b) for b in bad.values()),
        "seconds": seconds,
        "captions_per_s": rate,
        "complete": count is not None,
    }


def _already_complete(out: Path, sources: dict[str, CaptionSource], world_size: int) -> dict[str, Any]:
    """A complete store of the same options: check that it covers this dataset exactly, and do nothing."""
    store = TeacherStore(out)
    keys = [k for src in sources.values() for k, _ in iter_captions(src)]
    store.check_keys(keys, what=f"the dataset {', '.join(src.path for src in sources.values())}")
    total = _all_reduce_sum([len(keys)], world_size)
    if total is not None and total[0] != store.count:
        raise StoreError(
            f"{out}: a complete store of {store.count} rows, but the dataset has {total[0]} samples; it was made "
            "from other data: choose another --out (or remove this store)"
        )
    log.info("%s: complete already (%d rows), nothing to do", out, store.count)
    return {
        "store": str(out),
        "count": store.count,
        "embedded": 0,
        "skipped": len(keys),
        "bad": 0,
        "seconds": 0.0,
        "captions_per_s": 0.0,
        "complete": True,
    }


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def _all_reduce_sum(values: list[int], world_size: int) -> list[int] | None:
    """The sums over ranks; None where ranks were given by hand without a process group (nothing to sum over)."""
    if world_size <= 1:
        return values
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()
