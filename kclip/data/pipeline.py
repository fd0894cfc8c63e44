"""The training- and evaluation-facing entry: check a data path, then build the DALI pipeline or its CPU twin.

`build_loader` raises before any training starts when the path does not exist, its format is not recognised, a
CSV lacks its columns, or webdataset shards are not indexed (the message names `kclip data index`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kclip.data.csvfile import CSV_SUFFIXES, CsvSpec
from kclip.data.shards import DataError, resolve_shards
from kclip.data.tokenize import Tokenizer
from kclip.data.transforms import TransformConfig

log = logging.getLogger(__name__)


def detect_format(path: str | os.PathLike) -> str:
    """ "csv" for a .csv / .tsv file, "webdataset" for shards (a directory of .tar, a .tar, brace patterns).

    Raises:
        DataError: the path does not exist or is neither.
    """
    text = os.fspath(path)
    if Path(text).suffix.lower() in CSV_SUFFIXES and "::" not in text and "{" not in text:
        if not Path(text).is_file():
            raise DataError(f"{text}: no such CSV file")
        return "csv"
    if Path(text).is_file() and Path(text).suffix.lower() != ".tar":
        import tarfile

        if not tarfile.is_tarfile(text):
            raise DataError(
                f"{text}: unrecognised data format (expected webdataset .tar shards, a directory of them, or an "
                f"open_clip-style {'/'.join(CSV_SUFFIXES)} file)"
            )
    resolve_shards(text)  # raises with the reason
    return "webdataset"


def choose_backend(backend: str, device: str | None = None) -> tuple[str, str]:
    """("dali" | "cpu", why) for backend "auto" | "dali" | "cpu": auto picks DALI where it imports and a GPU is
    visible (device "cuda"), the CPU twin otherwise."""
    if backend not in ("auto", "dali", "cpu"):
        raise ValueError(f"backend must be auto, dali or cpu, got {backend!r}")
    if backend == "cpu":
        return "cpu", "asked for"
    from kclip.data.dali import dali_status

    ok, why = dali_status()
    if backend == "dali":
        if not ok:
            raise DataError(why)
        return "dali", "asked for"
    if not ok:
        return "cpu", why
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu", "no CUDA device"
    return "dali", "DALI and a CUDA device are available"


def build_loader(
    path: str | os.PathLike,
    *,
    batch_size: int,
    train: bool = True,
    cfg: TransformConfig | None = None,
    backend: str = "auto",
    device_id: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    num_threads: int = 4,
    seed: int = 0,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    hw_decoder_load: float = 0.65,
    index_dir: str | os.PathLike | None = None,
    csv_spec: CsvSpec | None = None,
    tokenizer: Tokenizer | None = None,
) -> Any:
    """Batches of images, tokens, keys, captions and the samples' metadata (label, attributes, tags, split, where
    their .json has them) from webdataset shards or a CSV, in the order of kclip.data.loader.epoch_batches (see the
    module docstring of kclip.data.loader).

    Args:
        path: shards (a directory, a split of a dataset root as DIR/train or DIR:train, a .tar, brace patterns
            joined by "::") or an open_clip-style CSV file.
        batch_size: samples per batch and rank.
        train: training transforms and shuffling; False: deterministic evaluation preprocessing, key order.
        cfg: transforms (TransformConfig()).
        backend: "auto" (DALI on a GPU where it imports, else the CPU twin), "dali" or "cpu". CSV data is read by
            the CPU twin only. backend="dali" with device_id=None runs DALI's CPU pipeline.
        device_id: the CUDA device of DALI's pipeline (auto: the current device).
        rank, world_size: this process's part of the data: a contiguous part of the epoch's order.
        num_workers: DataLoader workers of the CPU twin (default: the usable cores, at most 8).
        num_threads: DALI's CPU threads.
        seed: the epoch's permutation and the random crops.
        shuffle: a new permutation of all samples each epoch; False: key order. Default: `train`.
        drop_last: every rank gets N // world_size samples (the few left over sit out the epoch) and full batches
            only, so ranks step in lockstep; False: every sample once, the last batch partial. Default: `train`.
        hw_decoder_load: DALI's share of JPEGs for the hardware decoder.
        index_dir: where `kclip data index` wrote the indexes, when not beside the shards.
        csv_spec: columns and separator of a CSV.
        tokenizer: captions -> LongTensor [B, L]; default open_clip's CLIP tokenizer.

    Returns:
        an iterable of batch dicts, one epoch per pass, with `len()` (batches per epoch), `set_epoch(epoch,
        start_batch=0)`, `state_dict()` ({"epoch", "batch"}: batches passed) and `load_state_dict(state)`, which make
        the next pass that epoch from that batch, exactly as an uninterrupted pass continues.

    Raises:
        DataError: see the module docstring.
    """
    from kclip.data.loader import cpu_loader, plan_csv, plan_shards
    from kclip.data.shards import cpu_count

    cfg = cfg or TransformConfig()
    drop_last = train if drop_last is None else drop_last
    fmt = detect_format(path)
    workers = min(8, cpu_count()) if num_workers is None else num_workers
    common = dict(batch_size=batch_size, train=train, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
    if fmt == "csv":
        if backend == "dali":
            raise DataError("CSV data is read by the CPU loader; DALI reads indexed webdataset shards")
        plan = plan_csv(path, csv_spec or CsvSpec())
        return cpu_loader(plan, cfg, num_workers=workers, drop_last=drop_last, tokenizer=tokenizer, **common)
    from kclip.data.index import indexed_shards

    shards = indexed_shards(path, index_dir)  # refuses unindexed shards, for both backends
    if shards.bad_samples:
        log.info("%s: %d bad samples left out by the index", os.fspath(path), shards.bad_samples)
    chosen, why = choose_backend(backend)
    log.info("data: %s loader (%s)", chosen, why)
    if chosen == "dali":
        from kclip.data.dali import DaliLoader

        if device_id is None and backend == "auto":
            import torch

            device_id = torch.cuda.current_device()
        return DaliLoader(
            shards,
            cfg,
            device_id=device_id,
            num_threads=num_threads,
            drop_last=drop_last,
            hw_decoder_load=hw_decoder_load,
            tokenizer=tokenizer,
            **common,
        )
    plan = plan_shards(path, index_dir)
    return cpu_loader(plan, cfg, num_workers=workers, drop_last=drop_last, tokenizer=tokenizer, **common)
