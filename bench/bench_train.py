"""End-to-end training benchmark: samples per second of `kclip train` against open_clip_train's own loop.

Providers (each trains the same architecture from random weights for one epoch of the same shards, at the same
batch size, precision, learning-rate schedule and data-worker count, one after the other in this process):
  kclip            kclip.train.loop.train with the paper's loss, alpha=1 beta=0.01 gamma=1 (text distillation into
                   the teacher store, concept loss through the frozen classifier C, contrastive)
  kclip-baseline   the same loop with alpha=0 beta=0: plain CLIP (contrastive only) through kclip's loop
  open_clip_train  open_clip_train.main.main, contrastive only (ClipLoss), its webdataset loader on the same tars;
                   skipped with the reason in meta["skipped"] where it does not import (it needs webdataset,
                   braceexpand and pandas, which the GPU image lacks unless they are carried as wheels)

Data, made here in a temporary folder with kclip's own tools: `kclip data synth` shards (webdataset tars whose
samples carry .jpg, .txt and .json: open_clip_train reads the jpg and txt keys), `kclip data index`, a teacher
store written through kclip.teacher.store's API with random rows (this benchmark measures training, not the
teacher: random rows of the teacher's width cost the loop what real ones cost), and concepts fitted on that store
by kclip.concepts.fit_concepts. Shards are sized so that every open_clip_train worker gets whole batches and both
loops run exactly `steps` steps.

Shapes:
  --smoke     kclip-tiny (kclip/models/model_configs), batch 8, 6 steps, no data worker, fp32, on the CPU (CI)
  CPU run     ViT-B-32, batch 16, 36 steps, 1 data worker, fp32
  CUDA run    ViT-B-32, batch 256, 24 steps, 8 data workers, amp_bf16, logs every 4 steps

What is timed. The loops' own logs, written every --log-every-n-steps steps: kclip's LOGS/NAME/metrics.jsonl
(batch_time and data_time averaged over the interval) and open_clip_train's LOGS/NAME/out.log ("Train Epoch ...
Data (t) ... Batch (t)" lines). The intervals that start within the first `warmup` steps (worker start, first
allocations, kernel selection and Triton compilation) are left out; over the rest, samples_per_s = batch x steps /
their seconds, step_ms the mean step time, data_ms the mean time waiting for the loader, compute_ms the remainder;
median/p20/p80 are over the kept intervals' step times. wall_s is the whole train() / main() call: model build,
loader start, every step and the epoch-end checkpoint; setup_save_s = wall_s - the logged time of all steps.

Step breakdown, timed in this script on one batch of the same loader, after the loops (a warm-up step, then
--repeats steps, the device synchronised between phases; medians): for kclip's providers kclip's own pieces
(kclip.train.loop.Targets for the teacher rows and labels, the model's forward under loop.autocast_for,
loop.compute_losses, backward, AdamW over kclip.models.param_groups with zero_grad); for open_clip_train
open_clip.create_model, open_clip.loss.ClipLoss and open_clip_train.precision.get_autocast. peak_mem_mib is the
memory the warm-up step takes beyond the model's weights (the optimizer's state included), host RSS on the CPU.

Floor: the FLOPs of a training step, 3 x the forward FLOPs counted by torch.utils.flop_counter.FlopCounterMode on
one forward of the provider's model at the batch size (losses left out: < 0.1%), over the matmul rate measured here
on the vision tower's first MLP product ([B x tokens, width] x [width, 4 width]) in the dtype the precision computes
in; over_floor = step_ms / floor_ms.

Run:
    python bench/bench_train.py --smoke --device cpu --out /tmp/bench_train.json   # CI, well under a minute
    python bench/bench_train.py --device cpu                                       # ~8 minutes on 2 cores
    python bench/bench_train.py --device cuda --budget-s 100 --out $OUT/bench_train.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import json
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_common_args,
    compute_dtype,
    cpu_cores,
    cuda_sync,
    finish,
    matmul_rate,
    output_path,
    peak_memory,
    quantiles_ms,
    refuse_device,
    resolve_device,
    setup_logging,
    write_rows,
)

log = logging.getLogger("bench_train")

PROVIDERS = ("kclip", "kclip-baseline", "open_clip_train")
LOSS_WEIGHTS = {"kclip": (1.0, 0.01, 1.0), "kclip-baseline": (0.0, 0.0, 1.0)}  # alpha, beta, gamma
# Per shape: the architecture, batch, steps (a multiple of the workers, so every open_clip_train worker gets whole
# batches), warm-up steps left out, data workers, precision, log interval, source image side of the synthetic set,
# teacher width (SmolLM2-135M's 576 on the CPU, Llama-2-7B's 4096 on a GPU), concepts K, breakdown repeats, budget.
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": "kclip-tiny", "batch": 8, "steps": 6, "warmup": 2, "workers": 0, "precision": "fp32",
        "log_every": 1, "image_size": 64, "teacher_width": 64, "k": 4, "repeats": 2, "budget": None,
    },
    "cpu": {
        "model": "ViT-B-32", "batch": 16, "steps": 36, "warmup": 4, "workers": 1, "precision": "fp32",
        "log_every": 1, "image_size": 128, "teacher_width": 576, "k": 100, "repeats": 3, "budget": None,
    },
    "cuda": {
        "model": "ViT-B-32", "batch": 256, "steps": 24, "warmup": 4, "workers": 8, "precision": "amp_bf16",
        "log_every": 4, "image_size": 128, "teacher_width": 4096, "k": 100, "repeats": 5, "budget": 150,
    },
}  # fmt: skip
LR, WARMUP_LR_STEPS, SEED = 5e-4, 2, 0
PHASES = ("targets", "forward", "loss", "backward", "optimizer")


# ---- data -------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    root: Path
    train: Path  # the split, DIR/train, as kclip reads it
    shards: str  # brace pattern of the split's tars, as open_clip_train reads it
    samples: int
    store: Path
    concepts: Path
    seconds: dict[str, float]


def make_data(work: Path, s: dict[str, Any], kind: str) -> Data:
    """The synthetic shards (indexed), a random-row teacher store over them and concepts fitted on it."""
    import open_clip

    from kclip.concepts import fit_concepts
    from kclip.data import synth as S
    from kclip.data.index import index_dataset
    from kclip.data.shards import iter_tar
    from kclip.models import register_model_configs
    from kclip.teacher.store import finalize, new_meta, write_json, write_part

    seconds = {}
    shards = max(2, s["workers"])
    per_shard = -(-s["steps"] // shards)  # batches per shard
    samples = shards * per_shard * s["batch"]
    root = work / "data"
    t0 = time.perf_counter()
    S.synth(root, samples, num_heldout=0, num_compositional=0, image_size=s["image_size"],
            shard_size=per_shard * s["batch"], workers=cpu_cores(), progress=False)  # fmt: skip
    index_dataset(root / "train", workers=cpu_cores(), progress=False)
    seconds["synth_index"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tars = sorted((root / "train").glob("*.tar"))
    keys = [sample.key for tar in tars for sample in iter_tar(tar)]
    store = work / "store"
    store.mkdir()
    width = s["teacher_width"]
    meta = new_meta(model="random rows (bench_train)", pooling="mean", max_length=77, data=str(root), width=width)
    write_json(store / "meta.json", meta)
    rows = np.random.default_rng(SEED).standard_normal((len(keys), width), dtype=np.float32)  # [N, D]
    write_part(store, 0, 0, keys, rows, split="train")
    finalize(store)
    seconds["teacher_store"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    register_model_configs()
    concepts = work / "concepts"
    embed_dim = int(open_clip.get_model_config(s["model"])["embed_dim"])
    fit_concepts(store, concepts, s["k"], split="train", embed_dim=embed_dim, device=kind, report=False)
    seconds["concepts"] = time.perf_counter() - t0
    stems = [t.stem for t in tars]
    pattern = f"{root / 'train'}/{{{stems[0]}..{stems[-1]}}}.tar" if len(stems) > 1 else str(tars[0])
    return Data(root, root / "train", pattern, len(keys), store, concepts, seconds)


# ---- the loops ----------------------------------------------------------------------------------------------------


@dataclass
class Interval:
    """One log record: the steps it covers and their mean times."""

    first_step: int  # 1-based
    steps: int
    step_s: float
    data_s: float


def kclip_argv(provider: str, data: Data, s: dict[str, Any], logs: Path, kind: str) -> list[str]:
    alpha, beta, gamma = LOSS_WEIGHTS[provider]
    argv = [
        "--train-data", str(data.train), "--model", s["model"], "--batch-size", str(s["batch"]), "--epochs", "1",
        "--lr", str(LR), "--warmup", str(WARMUP_LR_STEPS), "--precision", s["precision"],
        "--workers", str(s["workers"]), "--log-every-n-steps", str(s["log_every"]), "--seed", str(SEED),
        "--alpha", str(alpha), "--beta", str(beta), "--gamma", str(gamma),
        "--logs", str(logs), "--name", provider, "--device", kind, "-q",
    ]  # fmt: skip
    if alpha > 0:
        argv += ["--teacher-store", str(data.store)]
    if beta > 0:
        argv += ["--concepts", str(data.concepts)]
    return argv


def open_clip_argv(data: Data, s: dict[str, Any], logs: Path, kind: str) -> list[str]:
    return [
        "--train-data", data.shards, "--dataset-type", "webdataset", "--train-num-samples", str(data.samples),
        "--model", s["model"], "--batch-size", str(s["batch"]), "--epochs", "1", "--lr", str(LR),
        "--warmup", str(WARMUP_LR_STEPS), "--precision", s["precision"], "--workers", str(s["workers"]),
        "--log-every-n-steps", str(s["log_every"]), "--seed", str(SEED), "--logs", str(logs),
        "--name", "open_clip_train", "--device", kind,
    ]  # fmt: skip


def run_kclip(provider: str, data: Data, s: dict[str, Any], logs: Path, kind: str) -> tuple[list[Interval], float]:
    """Train one epoch with kclip's loop; the intervals of its metrics.jsonl and the wall seconds of train()."""
    from kclip.train.loop import train
    from kclip.train.params import parse_train_args

    args = parse_train_args(kclip_argv(provider, data, s, logs, kind))
    cuda_sync()
    t0 = time.perf_counter()
    summary = train(args)
    cuda_sync()
    wall = time.perf_counter() - t0
    intervals, previous = [], 0
    for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "batch_time" in record:
            n = record["step"] - previous
            intervals.append(Interval(previous + 1, n, record["batch_time"], record["data_time"]))
            previous = record["step"]
    return intervals, wall


_OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")


def run_open_clip_train(data: Data, s: dict[str, Any], logs: Path, kind: str) -> tuple[list[Interval], float]:
    """Train one epoch with open_clip_train.main.main in this process (after kclip's architectures are registered
    with open_clip); its console output goes to LOGS/open_clip_train.console; the intervals of its out.log."""
    from open_clip_train.main import main as open_clip_main

    from kclip.models import register_model_configs

    register_model_configs()
    root = logging.getLogger()
    # main()'s setup_logging adds handlers to the root logger and sets every logger to INFO: all put back after
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ["", *logging.root.manager.loggerDict]}
    # main() turns TF32 on and cudnn.benchmark where a GPU is visible: put them back for whatever runs next
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    logs.mkdir(parents=True, exist_ok=True)
    console = logs / "open_clip_train.console"
    try:
        with open(console, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            cuda_sync()
            t0 = time.perf_counter()
            rc = open_clip_main(open_clip_argv(data, s, logs, kind))
            cuda_sync()
            wall = time.perf_counter() - t0
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for name in ["", *logging.root.manager.loggerDict]:
            logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = (
            flags
        )
    out_log = logs / "open_clip_train" / "out.log"
    if rc not in (None, 0) or not out_log.is_file():
        tail = console.read_text()[-2000:] if console.is_file() else ""
        raise RuntimeError(f"open_clip_train's main returned {rc}: {tail}")
    intervals, previous = [], 0
    for line in out_log.read_text().splitlines():
        m = _OPEN_CLIP_LINE.search(line)
        if m:
            end = int(m.group(1)) // s["batch"]
            intervals.append(Interval(previous + 1, end - previous, float(m.group(3)), float(m.group(2))))
            previous = end
    if not intervals:
        raise RuntimeError(f"no 'Train Epoch' line in {out_log}")
    return intervals, wall


def summarise(intervals: list[Interval], batch: int, warmup: int, wall: float) -> dict[str, Any]:
    """samples_per_s, step/data/compute ms and quantiles over the intervals that start after the warm-up steps."""
    kept = [iv for iv in intervals if iv.first_step > warmup] or intervals[-1:]
    steps = sum(iv.steps for iv in kept)
    step_s = sum(iv.steps * iv.step_s for iv in kept) / steps
    data_s = sum(iv.steps * iv.data_s for iv in kept) / steps
    q = quantiles_ms([iv.step_s * 1e3 for iv in kept])
    logged = sum(iv.steps * iv.step_s for iv in intervals)
    return {
        "steps": sum(iv.steps for iv in intervals),
        "measured_steps": steps,
        "samples_per_s": batch / step_s,
        "step_ms": step_s * 1e3,
        "median_ms": q["median"],
        "p20_ms": q["p20"],
        "p80_ms": q["p80"],
        "data_ms": data_s * 1e3,
        "compute_ms": (step_s - data_s) * 1e3,
        "data_share": data_s / step_s,
        "wall_s": wall,
        "setup_save_s": wall - logged,
    }


# ---- the step breakdown -------------------------------------------------------------------------------------------


@dataclass
class StepParts:
    """One training step cut into phases, over a fixed batch already on the device."""

    model: torch.nn.Module
    targets: Callable[[], Any]
    forward: Callable[[Any], dict[str, torch.Tensor]]
    loss: Callable[[dict[str, torch.Tensor], Any], torch.Tensor]
    autocast: Callable[[], Any]
    optimizer: torch.optim.Optimizer


def _first_batch(train_data: str, clip: torch.nn.Module, batch: int, device: torch.device) -> dict[str, Any]:
    """The first training batch of kclip's CPU loader, preprocessed for the open_clip model `clip`, on the device."""
    import open_clip

    from kclip.data.pipeline import build_loader
    from kclip.data.transforms import TransformConfig

    pre = open_clip.get_model_preprocess_cfg(clip)
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    cfg = TransformConfig(image_size=size, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    loader = build_loader(train_data, batch_size=batch, train=True, cfg=cfg, backend="cpu", num_workers=0, seed=SEED)
    b = next(iter(loader))
    return {"loader": loader, "key": b["key"], "image": b["image"].to(device), "tokens": b["tokens"].to(device)}


def kclip_parts(provider: str, data: Data, s: dict[str, Any], logs: Path, device: torch.device) -> StepParts:
    """kclip's step: Targets, KnowledgeCLIP forward, compute_losses, AdamW over param_groups (as loop._step)."""
    from kclip.models import build_model, param_groups
    from kclip.train.loop import Targets, autocast_for, compute_losses, training_store
    from kclip.train.params import parse_train_args

    args = parse_train_args(kclip_argv(provider, data, s, logs, device.type))
    store = training_store(args.teacher_store, "train") if args.alpha > 0 else None
    model = build_model(
        args.model,
        teacher_width=None if store is None else store.width,
        distill_head=args.distill_head,
        concepts=args.concepts if args.beta > 0 else None,
        precision=args.precision,
        device=device,
    ).train()
    b = _first_batch(args.train_data, model.clip, args.batch_size, device)
    targets = Targets(args, store, b["loader"].sample_keys(), device)
    optimizer = torch.optim.AdamW(
        param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps
    )
    return StepParts(
        model=model,
        targets=lambda: (targets.teacher(b["key"]), targets.labels(b["key"])),
        forward=lambda t: model(b["image"], b["tokens"]),
        loss=lambda out, t: compute_losses(out, t[0], t[1], args, 1)["total"],
        autocast=lambda: autocast_for(args.precision, device),
        optimizer=optimizer,
    )


def open_clip_parts(data: Data, s: dict[str, Any], device: torch.device) -> StepParts:
    """open_clip_train's step: open_clip's CLIP, ClipLoss, its autocast and input dtype, AdamW over its groups."""
    import open_clip
    from open_clip import get_input_dtype
    from open_clip.loss import ClipLoss
    from open_clip_train.precision import get_autocast

    from kclip.models import param_groups, register_model_configs

    register_model_configs()
    model = open_clip.create_model(s["model"], precision=s["precision"], device=device, output_dict=True).train()
    b = _first_batch(str(data.train), model, s["batch"], device)  # kclip's loader: the same pixels and tokens
    images = b["image"].to(dtype=get_input_dtype(s["precision"]) or torch.float32)
    clip_loss = ClipLoss()
    # kclip.models.param_groups is open_clip_train's rule (no decay for gains, biases, logit_scale)
    optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=LR, betas=(0.9, 0.98), eps=1e-6)
    return StepParts(
        model=model,
        targets=lambda: None,
        forward=lambda t: model(images, b["tokens"]),
        loss=lambda out, t: sum(clip_loss(**out, output_dict=True).values()),
        autocast=get_autocast(s["precision"], device_type=device.type),
        optimizer=optimizer,
    )


def time_step(parts: StepParts, repeats: int, kind: str) -> dict[str, Any]:
    """A warm-up step (its forward FLOPs counted, its peak memory taken), then `repeats` timed steps."""
    from torch.utils.flop_counter import FlopCounterMode

    def sync():
        if kind == "cuda":
            torch.cuda.synchronize()

    def step(counter=None) -> dict[str, float]:
        times = {}
        t = time.perf_counter()
        targets = parts.targets()
        sync()
        times["targets"], t = time.perf_counter() - t, time.perf_counter()
        with parts.autocast():
            with counter if counter is not None else contextlib.nullcontext():
                out = parts.forward(targets)
            sync()
            times["forward"], t = time.perf_counter() - t, time.perf_counter()
            total = parts.loss(out, targets)
            sync()
            times["loss"], t = time.perf_counter() - t, time.perf_counter()
        total.backward()
        sync()
        times["backward"], t = time.perf_counter() - t, time.perf_counter()
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
        sync()
        times["optimizer"] = time.perf_counter() - t
        return times

    counter = FlopCounterMode(display=False)
    with peak_memory(kind) as mem:
        step(counter)
    samples = [step() for _ in range(max(1, repeats))]
    out = {f"{p}_ms": statistics.median(x[p] for x in samples) * 1e3 for p in PHASES}
    out["breakdown_ms"] = statistics.median(sum(x.values()) for x in samples) * 1e3
    out["forward_gflop"] = counter.get_total_flops() / 1e9
    out.update(mem)
    return out


# ---- main -------------------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist)
    return None


def open_clip_train_missing() -> str:
    """Why open_clip_train's loop cannot run here ("" when it can)."""
    try:
        import open_clip_train.main  # noqa: F401  (imports webdataset, braceexpand, pandas)
        from webdataset.tariterators import tar_file_expander
    except ImportError as e:
        return f"open_clip_train does not import ({e}): pip install 'webdataset<=0.2.86' braceexpand pandas"
    if "eof_value" in inspect.signature(tar_file_expander).parameters:
        # webdataset >= 0.2.96 ends each shard with an empty sample that open_clip_train's group_by_keys_nothrow
        # cannot read (KeyError: 'fname'; open_clip issue #935)
        return (
            f"webdataset {_version('webdataset')} breaks open_clip_train's webdataset loader (KeyError 'fname', "
            "open_clip#935): pip install 'webdataset<=0.2.86'"
        )
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--model", default=None, help="open_clip architecture (default by shape)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per provider")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps left out of the measurement")
    parser.add_argument("--workers", type=int, default=None, help="data workers of every loop")
    parser.add_argument("--precision", default=None, help="open_clip's --precision: fp32, amp_bf16, amp, ...")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps of the breakdown")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated providers")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting runs after this many seconds")
    args = parser.parse_args(argv)
    setup_logging()
    start = time.perf_counter()

    kind, why_not = resolve_device("cpu" if args.smoke else args.device)
    out = output_path(args, "bench_train", kind)
    s = dict(SETTINGS["smoke" if args.smoke else kind])
    for key, flag in (("model", "model"), ("batch", "batch_size"), ("steps", "steps"), ("warmup", "warmup_steps"),
                      ("workers", "workers"), ("precision", "precision"), ("repeats", "repeats")):  # fmt: skip
        if getattr(args, flag) is not None:
            s[key] = getattr(args, flag)
    if s["workers"] > 0:
        s["steps"] = -(-s["steps"] // s["workers"]) * s["workers"]
    budget_s = args.budget_s if args.budget_s is not None else s.pop("budget")
    s.pop("budget", None)
    providers = [p for p in args.providers.split(",") if p]
    meta: dict[str, Any] = {
        "script": "bench_train",
        "device_kind": kind,
        "smoke": args.smoke,
        **{k: v for k, v in s.items()},
        "lr": LR,
        "providers": providers,
        "budget_s": budget_s,
        "webdataset": _version("webdataset"),
        "skipped": {},
    }
    rows: list[dict[str, Any]] = []
    if why_not:
        return refuse_device(out, meta, args.device, why_not)
    try:
        import open_clip  # noqa: F401
    except ImportError as e:
        meta["skipped"]["all"] = f"open_clip does not import ({e}): kclip's models are open_clip's"
        write_rows(out, rows, meta)
        log.error("%s", meta["skipped"]["all"])
        return 1
    if "open_clip_train" in providers and (why := open_clip_train_missing()):
        meta["skipped"]["open_clip_train"] = why
        providers.remove("open_clip_train")
    from kclip.data.pipeline import choose_backend

    meta["kclip_data_backend"] = "{} ({})".format(*choose_backend("auto", kind))
    device = torch.device(kind)

    def left() -> float:
        return float("inf") if budget_s is None else budget_s - (time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        work = Path(tmp)
        data = make_data(work, s, kind)
        meta["samples"] = data.samples
        meta["data_setup_s"] = data.seconds
        log.info("data: %d samples, %s", data.samples, ", ".join(f"{k} {v:.1f} s" for k, v in data.seconds.items()))
        rate = matmul_rate(s["model"], s["batch"], compute_dtype(s["precision"], kind), kind)
        meta["matmul"] = rate
        log.info("matmul %s %s: %.0f GFLOP/s", rate["shape"], rate["dtype"], rate["gflops"])

        by_provider: dict[str, dict[str, Any]] = {}
        estimate = 0.0
        for provider in providers:
            if left() < estimate:
                meta["skipped"][provider] = f"time budget spent ({left():.0f} s left, a run took {estimate:.0f} s)"
                continue
            logs = work / "logs" / provider
            try:
                if provider == "open_clip_train":
                    intervals, wall = run_open_clip_train(data, s, logs, kind)
                else:
                    intervals, wall = run_kclip(provider, data, s, logs, kind)
            except Exception as exc:  # a provider that fails is recorded, the others still run
                log.exception("%s failed", provider)
                meta["skipped"][provider] = f"failed: {type(exc).__name__}: {str(exc)[-1500:]}"
                continue
            finally:
                shutil.rmtree(logs, ignore_errors=True)  # the checkpoints: ~1.8 GB each at ViT-B-32
            estimate = wall
            alpha, beta, gamma = LOSS_WEIGHTS.get(provider, (0.0, 0.0, 1.0))
            row = {
                "provider": provider,
                "mode": "train",
                "model": s["model"],
                "batch_size": s["batch"],
                "precision": s["precision"],
                "dtype": rate["dtype"],
                "workers": s["workers"],
                "warmup_steps": s["warmup"],
                "alpha": alpha,
                "beta": beta,
                "gamma": gamma,
                **summarise(intervals, s["batch"], s["warmup"], wall),
            }
            by_provider[provider] = row
            rows.append(row)
            log.info(
                "%s: %.2f samples/s (step %.0f ms, data %.0f ms), wall %.1f s",
                provider,
                row["samples_per_s"],
                row["step_ms"],
                row["data_ms"],
                wall,
            )
            write_rows(out, rows, meta)  # each finished row is kept should a later one run out of time

        for provider, row in by_provider.items():
            repeats = s["repeats"]
            per_step = row["step_ms"] / 1e3 + 1.0
            if left() < 3 * per_step + 10:
                meta["skipped"][f"{provider} breakdown"] = "time budget spent"
                continue
            repeats = int(max(1, min(repeats, (left() - 10) / per_step - 2)))
            try:
                if provider == "open_clip_train":
                    parts = open_clip_parts(data, s, device)
                else:
                    parts = kclip_parts(provider, data, s, work / "logs" / "breakdown", device)
                row.update(time_step(parts, repeats, kind))
            except Exception as exc:
                log.exception("%s breakdown failed", provider)
                meta["skipped"][f"{provider} breakdown"] = f"failed: {type(exc).__name__}: {exc}"
                continue
            finally:
                parts = None
                if kind == "cuda":
                    torch.cuda.empty_cache()
            row["breakdown_repeats"] = repeats
            train_flop = 3 * row["forward_gflop"] * 1e9
            row["floor_ms"] = train_flop / (rate["gflops"] * 1e9) * 1e3
            row["floor_gflops"] = rate["gflops"]
            row["over_floor"] = row["step_ms"] / row["floor_ms"]
            row["achieved_gflops"] = train_flop / (row["step_ms"] * 1e-3) / 1e9
            write_rows(out, rows, meta)

    base = by_provider.get("open_clip_train")
    for row in rows:
        row["vs_open_clip_train"] = row["samples_per_s"] / base["samples_per_s"] if base else None
    finish(
        out,
        rows,
        meta,
        start,
        [
            ("provider", "provider", ""),
            ("samples/s", "samples_per_s", ".2f"),
            ("x oc_train", "vs_open_clip_train", ".3f"),
            ("step ms", "step_ms", ".0f"),
            ("data ms", "data_ms", ".0f"),
            ("targets", "targets_ms", ".1f"),
            ("fwd", "forward_ms", ".0f"),
            ("loss", "loss_ms", ".1f"),
            ("bwd", "backward_ms", ".0f"),
            ("opt", "optimizer_ms", ".0f"),
            ("floor ms", "floor_ms", ".0f"),
            ("x floor", "over_floor", ".2f"),
            ("wall s", "wall_s", ".1f"),
            ("setup+save s", "setup_save_s", ".1f"),
        ],
    )
    return 0 if rows and not any(k in meta["skipped"] for k in ("kclip", "kclip-baseline")) else 1


if __name__ == "__main__":
    sys.exit(main())
