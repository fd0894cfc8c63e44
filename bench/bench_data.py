"""Data loading benchmark: training images per second at 224 px from the same JPEG shards, DALI against its peers.

Providers (all read the same indexed webdataset shards of kclip's synthetic set, written at --src-size pixels, and
apply the same training transform: random resized crop to 224 x 224, CLIP normalisation, float32 CHW batches):
  CPU run:  dali-cpu         DALI's CPU pipeline (device_id=None), one row per thread count
            pil-loader       kclip's CPU twin: torch DataLoader + PIL, one row per worker count
  CUDA run: dali-mixed       DALI with nvJPEG on the "mixed" device, one row per hw_decoder_load (the share of
                             JPEGs given to the hardware JPEG decoder)
            torchvision-gpu  torchvision.io.decode_jpeg(device="cuda") on batches of JPEG bytes, then
                             torchvision's resized_crop and the normalisation on the GPU
            pil-loader       the CPU twin with N workers, pinned memory, batches copied to the GPU
Captions are not tokenised in these rows (a constant stands in for the tokenizer, so the rows compare image
pipelines); one extra row per run, tokens=true, adds open_clip's tokenizer to the fastest DALI configuration.

What is timed: after `--warmup` batches (pipeline start, worker start, first reads), the wall time of each next
batch until the epoch ends or the provider's share of --budget-s is spent, the GPU synchronised before each
timestamp. images_per_s = images / seconds over those batches; median_ms, p20_ms, p80_ms per batch. The floor is
the time to write the batch's float32 output once at the measured copy bandwidth of the device (host memcpy on
the CPU, device-to-device copy on a GPU): a weak bound, there is no useful analytic floor for JPEG decoding.

The synthetic scenes are flat shapes on simple backgrounds: their JPEGs are smaller and decode faster than
photographs of the same size, so absolute rates are optimistic; the ratios between providers are the result.

Run:
    python bench/bench_data.py --smoke                      # CI, CPU, < 1 minute
    python bench/bench_data.py --device cpu                 # the CPU rows, about a minute on 2 cores
    python bench/bench_data.py --device cuda --out $OUT/bench_data.json
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_common_args,
    cpu_cores,
    format_table,
    output_path,
    quantiles_ms,
    refuse_device,
    resolve_device,
    write_rows,
)

log = logging.getLogger("bench_data")

OUT_SIZE = 224
# Per device kind: samples written, source image size, batch size, worker / thread counts, hw_decoder_load values.
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"samples": 96, "src": 160, "batch": 16, "workers": (1,), "threads": (1,), "hw": (), "budget": 30},
    "cpu": {"samples": 2000, "src": 256, "batch": 64, "workers": None, "threads": None, "hw": (), "budget": 150},
    "cuda": {
        "samples": 20000,
        "src": 256,
        "batch": 256,
        "workers": (4, 16),
        "threads": (8,),
        "hw": (0.0, 0.5, 0.65, 0.9, 1.0),
        "budget": 200,
    },
}


def _no_tokens(captions: list[str]) -> torch.Tensor:
    """Stands in for the tokenizer so that rows time the image pipeline only."""
    return torch.zeros(len(captions), 77, dtype=torch.long)


class Unavailable(RuntimeError):
    """A provider that cannot run here; the message says why (kept in meta["skipped"])."""


# ---- data ------------------------------------------------------------------------------------------------------


def make_shards(folder: Path, samples: int, src: int) -> dict[str, Any]:
    """Write and index the synthetic training shards; returns facts about them for the meta record."""
    from kclip.data.index import index_dataset
    from kclip.data.synth import synth

    t0 = time.perf_counter()
    synth(folder, samples, num_heldout=0, num_compositional=0, image_size=src, shard_size=500, progress=False)
    summary = index_dataset(folder / "train", progress=False)
    jpeg_bytes = [
        int(line.split()[2])
        for idx in sorted((folder / "train").glob("*.idx"))
        for line in idx.read_text().splitlines()[1:]
    ]
    return {
        "samples": summary["good_samples"],
        "shards": len(summary["shards"]),
        "src_size": src,
        "mean_jpeg_bytes": float(np.mean(jpeg_bytes)),
        "prepare_s": time.perf_counter() - t0,
    }


# ---- providers -------------------------------------------------------------------------------------------------


def dali_loader(data: Path, cfg, batch: int, device_id: int | None, threads: int, hw: float, tokenizer=_no_tokens):
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"nvidia.dali does not import ({e})") from e
    from kclip.data.dali import DaliLoader
    from kclip.data.index import indexed_shards

    return DaliLoader(
        indexed_shards(data),
        cfg,
        batch_size=batch,
        train=True,
        device_id=device_id,
        num_threads=threads,
        hw_decoder_load=hw,
        drop_last=True,
        tokenizer=tokenizer,
    )


def pil_loader(data: Path, cfg, batch: int, workers: int, pin: bool):
    from kclip.data.loader import cpu_loader, plan_shards

    return cpu_loader(
        plan_shards(data),
        cfg,
        batch_size=batch,
        train=True,
        num_workers=workers,
        drop_last=True,
        tokenizer=_no_tokens,
        pin_memory=pin,
    )


class TorchvisionGpu:
    """JPEG bytes read on the host (one prefetch thread), decoded by torchvision on the GPU in batches, then the
    same random resized crop (kclip.data.transforms.random_box) and normalisation as the other providers."""

    def __init__(self, data: Path, cfg, batch: int, seed: int = 0):
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
            from torchvision.transforms.v2 import functional  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"torchvision does not import ({e})") from e
        from kclip.data.index import indexed_shards, read_dali_index

        shards = indexed_shards(data)
        self.entries = [(p, read_dali_index(i)) for p, i in zip(shards.paths, shards.index_paths, strict=True)]
        self.cfg, self.batch, self.seed = cfg, batch, seed

    def _host_batches(self) -> Iterator[list[tuple[str, bytes]]]:
        from kclip.data.shards import read_indexed

        out: list[tuple[str, bytes]] = []
        for path, samples in self.entries:
            for s in read_indexed(path, samples):
                ext = s.image_ext()
                out.append((s.key, s.data[ext]))
                if len(out) == self.batch:
                    yield out
                    out = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import queue
        import random

        from torchvision.io import decode_jpeg
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        from kclip.data.transforms import normalize, random_box

        q: queue.Queue = queue.Queue(maxsize=4)

        def produce():
            for b in self._host_batches():
                q.put([(k, torch.frombuffer(bytearray(d), dtype=torch.uint8)) for k, d in b])
            q.put(None)

        threading.Thread(target=produce, daemon=True).start()
        rng = random.Random(self.seed)
        size = self.cfg.image_size
        interp = InterpolationMode.BICUBIC if self.cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR
        while (items := q.get()) is not None:
            images = decode_jpeg([d for _, d in items], device="cuda")  # list of uint8 [3, H, W] on the GPU
            crops = []
            for img in images:
                x0, y0, x1, y1 = random_box(rng, img.shape[2], img.shape[1], self.cfg.scale, self.cfg.ratio)
                crops.append(
                    F.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [size, size], interpolation=interp, antialias=True)
                )
            batch = normalize(torch.stack(crops).permute(0, 2, 3, 1), self.cfg)  # [B, 3, S, S]
            yield {"image": batch, "key": [k for k, _ in items]}


# ---- measuring -------------------------------------------------------------------------------------------------


def measure(loader, *, warmup: int, budget_s: float, to_gpu: bool, cuda: bool) -> dict[str, Any]:
    """Iterate one epoch; time the batches after `warmup` until the epoch ends or `budget_s` is spent."""

    def sync():
        if cuda:
            torch.cuda.synchronize()

    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(warmup):
        b = next(it)
        if to_gpu:
            b["image"].cuda(non_blocking=True)
    sync()
    startup_s = time.perf_counter() - t_start
    times, images = [], 0
    t0 = last = time.perf_counter()
    for batch in it:
        image = batch["image"].cuda(non_blocking=True) if to_gpu else batch["image"]
        assert image.shape[1:] == (3, OUT_SIZE, OUT_SIZE), image.shape
        sync()
        now = time.perf_counter()
        times.append((now - last) * 1e3)
        last = now
        images += len(batch["key"])
        if now - t0 > budget_s:
            break
    with contextlib.suppress(Exception):
        for _ in it:  # let the DataLoader workers / DALI finish the epoch cleanly
            break
    if not times:
        raise RuntimeError("no batch after the warm-up: raise --samples or lower --warmup")
    q = quantiles_ms(times)
    return {
        "images": images,
        "seconds": last - t0,
        "images_per_s": images / (last - t0),
        "median_ms": q["median"],
        "p20_ms": q["p20"],
        "p80_ms": q["p80"],
        "startup_s": startup_s,
    }


def copy_bandwidth(kind: str) -> float:
    """Bytes per second of a large copy on the device (host memcpy through torch on the CPU)."""
    n = 256 * 2**20
    device = "cuda" if kind == "cuda" else "cpu"
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if kind == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if kind == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


# ---- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--samples", type=int, default=None, help="samples written to the shards")
    parser.add_argument("--src-size", type=int, default=None, help="side of the stored JPEGs, pixels")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", default=None, help="comma-separated DataLoader worker counts (pil-loader)")
    parser.add_argument("--threads", default=None, help="comma-separated DALI thread counts")
    parser.add_argument("--hw-decoder-load", default=None, help="comma-separated hw_decoder_load values (dali-mixed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per row")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of all rows")
    parser.add_argument("--data", type=Path, default=None, help="reuse shards written (and indexed) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    kind, why_not = resolve_device(args.device)
    out = output_path(args, "bench_data", kind)
    settings = SETTINGS["smoke" if args.smoke else kind]
    cores = cpu_cores()
    ints = lambda text, default: tuple(int(v) for v in text.split(",")) if text else default
    workers = ints(args.workers, settings["workers"] or tuple(sorted({1, cores})))
    threads = ints(args.threads, settings["threads"] or (cores,))
    hw_loads = tuple(float(v) for v in args.hw_decoder_load.split(",")) if args.hw_decoder_load else settings["hw"]
    batch = args.batch_size or settings["batch"]
    budget_s = args.budget_s if args.budget_s is not None else settings["budget"]
    meta: dict[str, Any] = {
        "script": "bench_data",
        "device_kind": kind,
        "smoke": args.smoke,
        "out_size": OUT_SIZE,
        "batch_size": batch,
        "warmup_batches": args.warmup,
        "budget_s": budget_s,
        "skipped": {},
    }
    rows: list[dict[str, Any]] = []
    if why_not:
        return refuse_device(out, meta, args.device, why_not)

    from kclip.data.transforms import TransformConfig

    cfg = TransformConfig(image_size=OUT_SIZE)
    with tempfile.TemporaryDirectory(prefix="bench_data.") as tmp:
        if args.data is None:
            meta["data"] = make_shards(Path(tmp), args.samples or settings["samples"], args.src_size or settings["src"])
            data = Path(tmp) / "train"
        else:
            data = args.data
            meta["data"] = {"path": str(data)}
        log.info("shards: %s", meta["data"])
        out_bytes = batch * 3 * OUT_SIZE * OUT_SIZE * 4
        bandwidth = copy_bandwidth(kind)
        meta["copy_bandwidth_gbs"] = bandwidth / 1e9
        floor_ms = out_bytes / bandwidth * 1e3

        configs: list[tuple[str, dict[str, Any]]] = []
        if kind == "cuda":
            configs += [("dali-mixed", {"threads": threads[0], "hw_decoder_load": h}) for h in hw_loads or (0.65,)]
            configs += [("torchvision-gpu", {})]
        else:
            configs += [("dali-cpu", {"threads": t}) for t in threads]
        configs += [("pil-loader", {"workers": w}) for w in workers]
        share = budget_s / (len(configs) + 1)

        def run(provider: str, params: dict[str, Any], tokens: bool = False) -> dict[str, Any] | None:
            label = f"{provider} {params}" + (" +tokens" if tokens else "")
            log.info("%s ...", label)
            try:
                if provider == "dali-mixed" or provider == "dali-cpu":
                    tok = None if tokens else _no_tokens
                    device_id = 0 if provider == "dali-mixed" else None
                    loader = dali_loader(
                        data, cfg, batch, device_id, params["threads"], params.get("hw_decoder_load", 0.65), tok
                    )
                    to_gpu = False
                elif provider == "torchvision-gpu":
                    loader, to_gpu = TorchvisionGpu(data, cfg, batch), False
                else:
                    loader = pil_loader(data, cfg, batch, params["workers"], pin=kind == "cuda")
                    to_gpu = kind == "cuda"
                result = measure(loader, warmup=args.warmup, budget_s=share, to_gpu=to_gpu, cuda=kind == "cuda")
            except Unavailable as exc:
                meta["skipped"][label] = str(exc)
                log.warning("skipping %s: %s", label, exc)
                return None
            except Exception as exc:  # one provider failing must not lose the others' rows
                log.exception("%s failed", label)
                meta["skipped"][label] = f"failed: {type(exc).__name__}: {exc}"
                return None
            row = {
                "provider": provider,
                "mode": "train",
                "image_size": OUT_SIZE,
                "src_size": meta["data"].get("src_size"),
                "batch_size": batch,
                "dtype": "float32",
                "threads": params.get("threads"),
                "workers": params.get("workers"),
                "hw_decoder_load": params.get("hw_decoder_load"),
                "tokens": tokens,
                **result,
                "floor_ms": floor_ms,
                "over_floor": result["median_ms"] / floor_ms,
                "floor": "batch output bytes / device copy bandwidth",
            }
            rows.append(row)
            return row

        for provider, params in configs:
            run(provider, params)
        dali_rows = [r for r in rows if r["provider"].startswith("dali")]
        if dali_rows:
            best = max(dali_rows, key=lambda r: r["images_per_s"])
            try:
                import open_clip  # noqa: F401

                params = {k: best[k] for k in ("threads", "hw_decoder_load") if best[k] is not None}
                run(best["provider"], params, tokens=True)
            except ImportError as e:
                meta["skipped"]["tokens"] = f"open_clip does not import ({e})"

    _ratios(rows, meta)
    write_rows(out, rows, meta)
    columns = [
        ("provider", "provider", ""),
        ("threads", "threads", ""),
        ("workers", "workers", ""),
        ("hw_load", "hw_decoder_load", ".2f"),
        ("tokens", "tokens", ""),
        ("img/s", "images_per_s", ".0f"),
        ("ms/batch", "median_ms", ".1f"),
        ("p20", "p20_ms", ".1f"),
        ("p80", "p80_ms", ".1f"),
        ("x floor", "over_floor", ".0f"),
    ]
    print(format_table(rows, columns))
    for key, value in meta.get("ratios", {}).items():
        print(f"{key}: {value:.2f}")
    for key, why in meta["skipped"].items():
        print(f"skipped {key}: {why}")
    print(f"wrote {out}")
    return 0


def _ratios(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The issue's targets as ratios of the best rows: DALI over torchvision's GPU decode and over PIL."""
    best = {}
    for r in rows:
        if not r["tokens"]:
            best[r["provider"]] = max(best.get(r["provider"], 0.0), r["images_per_s"])
    dali = best.get("dali-mixed") or best.get("dali-cpu")
    ratios = {}
    if dali and "torchvision-gpu" in best:
        ratios["dali_over_torchvision_gpu"] = dali / best["torchvision-gpu"]
    pil = [r for r in rows if r["provider"] == "pil-loader"]
    if dali and pil:
        most = max(pil, key=lambda r: (r["workers"], r["images_per_s"]))
        ratios[f"dali_over_pil_{most['workers']}_workers"] = dali / most["images_per_s"]
    meta["ratios"] = ratios


if __name__ == "__main__":
    sys.exit(main())
