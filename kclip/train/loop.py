"""`kclip train`: the Knowledge-CLIP training program.

One process per device, launched by hand or by torchrun (``torchrun --nproc_per_node N -m kclip.train ...``; SLURM's
``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` are read as open_clip reads them). Each step:

    batch (kclip.data.build_loader, this rank's part) ─ teacher rows of its keys, standardised with the training
    split's statistics (TeacherStore) ─ soft concept labels of its keys (Concepts) ─ KnowledgeCLIP forward under
    autocast ─ L = α·L_emb + β·L_concept + γ·L_contrastive (kclip.losses: Triton kernels on GPUs, references on
    the CPU) ─ backward ─ AdamW (open_clip's parameter groups), warmup + cosine, logit scale clamped at ln 100.

``--accum-freq K`` follows open_clip: the features of all K micro-batches are first computed without gradient and
cached; each micro-batch is then run again with gradient and its features put in place of the cached ones, so that
the contrastive loss of every backward sees the whole accumulated batch. With several ranks the features are
all-gathered with gradient: ``--local-loss`` computes each rank's rows against the gathered columns (the kernels'
distributed form), otherwise every rank computes the loss of the whole global batch; both give the gradients of one
process holding the global batch (``--gather-with-grad`` is accepted for open_clip's command lines: kclip always
gathers with gradient, the only form whose gradients are those of the global batch).

Checkpoints (kclip.train.checkpoint) hold the step, the loader's position and every rank's RNG state, so that
``--resume latest`` after a stop anywhere continues with exactly the steps the uninterrupted run takes. SIGTERM and
SIGINT write latest.pt at the next step boundary and exit. Only rank 0 writes logs and checkpoints. Loss values
stay on the device between log intervals: a non-finite loss is flagged on the device and found at the next log
interval, which stops the run naming the step and the term (the last good checkpoint stays).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kclip.errors import KclipError
from kclip.losses import raise_deferred_errors
from kclip.train.checkpoint import (
    check_resumable,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kclip.train.params import ConfigError
from kclip.train.schedule import lr_at

log = logging.getLogger(__name__)

LOGIT_SCALE_MAX = math.log(100.0)
TERMS = ("contrastive_loss", "distill_loss", "concept_loss")


class TrainError(KclipError, RuntimeError):
    """Training stopped for a reason the user can act on (a non-finite loss, data that does not match)."""


# ---- processes ----------------------------------------------------------------------------------------------------


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {choice}: torch sees no usable CUDA device here; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device(choice)


def _init_distributed(world: int, device: torch.device, backend: str | None) -> bool:
    import torch.distributed as dist

    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun: the first node is the rendezvous
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return True


def _gather(t: torch.Tensor) -> torch.Tensor:
    """All-gather rows with gradient (backward sums over ranks)."""
    import warnings

    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(t))


# ---- precision ----------------------------------------------------------------------------------------------------


def autocast_for(precision: str, device: torch.device):
    """The autocast context of open_clip's --precision: amp is fp16 on GPUs (bf16 on the CPU, which has no fp16
    autocast worth having), amp_bf16 bf16; the others run the weights' dtype as they are."""
    if precision == "amp":
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    elif precision in ("amp_bf16", "amp_bfloat16"):
        dtype = torch.bfloat16
    else:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---- the run folder -----------------------------------------------------------------------------------------------


def run_name(args: argparse.Namespace) -> str:
    """open_clip's default name: date, model, lr, batch size, workers, precision."""
    date = datetime.datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    model = args.model.replace("/", "-")
    return f"{date}-model_{model}-lr_{args.lr}-b_{args.batch_size}-j_{args.workers}-p_{args.precision}"


def flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of the run (what the command line set up besides them left out)."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "train_parser", "train_argv", "command")}


def write_params(path: Path, args: argparse.Namespace) -> None:
    """params.txt as open_clip writes it: one "name: value" line per flag, sorted."""
    from kclip._atomic import atomic_write_text

    atomic_write_text(path, "".join(f"{k}: {v}\n" for k, v in sorted(flags(args).items())))


class Metrics:
    """metrics.jsonl (one JSON object per log interval) and, with --report-to tensorboard, scalars (rank 0 only)."""

    def __init__(self, folder: Path | None, tensorboard: bool):
        self.path = None if folder is None else folder / "metrics.jsonl"
        self.writer = None
        if folder is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(f"--report-to tensorboard needs tensorboard ({e}): pip install tensorboard") from None
            self.writer = SummaryWriter(str(folder / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- data, teacher, concepts --------------------------------------------------------------------------------------


class Targets:
    """The teacher rows and soft concept labels of a batch's keys, on the device."""

    def __init__(self, args: argparse.Namespace, store, keys: np.ndarray, device: torch.device):
        self.store, self.concepts, self.device = store, None, device
        if store is not None:  # the training split's view of the teacher store (`training_store`)
            store.check_keys(keys, what=f"the training split {args.train_data}")
        if args.beta > 0:
            from kclip.concepts import Concepts

            self.concepts = Concepts(args.concepts)
            self.concepts.index_of(keys)  # every training key has a label (raises naming one that has not)
            self.topk = self.concepts.meta["labels"] == "topk"

    def teacher(self, keys: list[str]) -> torch.Tensor | None:
        if self.store is None:
            return None
        return torch.from_numpy(self.store.rows(keys, standardize=True)).to(self.device, non_blocking=True)

    def labels(self, keys: list[str]):
        if self.concepts is None:
            return None
        if self.topk:
            idx, w = self.concepts.topk(keys)
            return torch.from_numpy(idx).to(self.device), torch.from_numpy(w).to(self.device)
        return torch.from_numpy(self.concepts.labels(keys)).to(self.device)


def training_store(root: str, split: str):
    """The store's view of the training split (its rows and statistics); a store of one split is used whole."""
    from kclip.teacher.store import StoreError, TeacherStore

    store = TeacherStore(root)
    if len(store.splits) <= 1:
        return store
    if split not in store.splits:
        raise StoreError(
            f"{root}: no split {split!r} for the training data (its splits: {', '.join(store.splits)}); name the "
            "training split as the store names it (DIR/SPLIT or DIR:SPLIT)"
        )
    return TeacherStore(root, split)


# ---- loss -----------------------------------------------------------------------------------------------------------


def compute_losses(
    out: dict[str, torch.Tensor],
    teacher: torch.Tensor | None,
    labels,
    args: argparse.Namespace,
    world: int,
) -> dict[str, torch.Tensor]:
    """The weighted terms and "total" of one (accumulated) batch."""
    from kclip.losses import contrastive_distill_loss, soft_label_cross_entropy

    image, text = out["image_features"], out["text_features"]
    projected = out.get("projected_text")
    if teacher is not None:
        teacher = teacher.to(projected.dtype)
    if world > 1 and not args.local_loss:  # the whole global batch on every rank
        image, text = _gather(image), _gather(text)
        if teacher is not None:
            projected, teacher = _gather(projected), _gather(teacher)
    terms = contrastive_distill_loss(
        image, text, out["logit_scale"], projected, teacher, local_loss=args.local_loss and world > 1
    )
    if labels is not None:
        terms["concept_loss"] = soft_label_cross_entropy(out["concept_logits"], labels)
    weights = {"contrastive_loss": args.gamma, "distill_loss": args.alpha, "concept_loss": args.beta}
    total = sum(weights[k] * v.float() for k, v in terms.items() if weights[k] > 0)
    return {**{k: v.float() for k, v in terms.items()}, "total": total}


_ROW_KEYS = ("image_features", "text_features", "projected_text", "concept_logits")


def _merge(cached: list[dict], j: int, live: dict) -> dict:
    """The accumulated batch's outputs: the cached rows of every micro-batch, micro-batch j's live ones. The logit
    scale, which every row shares, is live in the last micro-batch only, so that its gradient is that of the whole
    batch once (open_clip's loop takes it live in each and so accumulates it --accum-freq times)."""
    out = {"logit_scale": live["logit_scale"] if j == len(cached) - 1 else cached[j]["logit_scale"]}
    for k in _ROW_KEYS:
        if k in live:
            out[k] = torch.cat([live[k] if i == j else c[k] for i, c in enumerate(cached)])
    return out


def _cat_labels(parts: list):
    if parts[0] is None:
        return None
    if isinstance(parts[0], tuple):
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return torch.cat(parts)


# ---- the program ----------------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGTERM / SIGINT ask the run to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("signal %d: writing a checkpoint at the next step boundary, then stopping", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run `kclip train` with parsed flags (kclip.train.params); returns a summary of the run.

    Raises:
        KclipError subclasses for bad input, before the first step; TrainError for a non-finite loss.
    """
    rank, world, local_rank = world_info()
    device = _device(args.device, local_rank)
    own_group = _init_distributed(world, device, args.dist_backend)
    try:
        return _train(args, rank, world, device)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    import random

    from kclip.data.pipeline import build_loader, detect_format
    from kclip.data.shards import named_splits
    from kclip.data.transforms import TransformConfig
    from kclip.models import build_model, param_groups

    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    name = args.name or run_name(args)
    if args.resume == "latest" and args.name is None:
        raise ConfigError("--resume latest needs --name (the run whose latest checkpoint to continue)")
    run_dir = Path(args.logs) / name
    ckpt_dir = run_dir / "checkpoints"
    detect_format(args.train_data)  # the data path first: a dataset root or a missing path is named before all else
    split = named_splits(args.train_data)[0][0]

    store = training_store(args.teacher_store, split) if args.alpha > 0 else None
    model = build_model(
        args.model,
        pretrained=args.pretrained,
        teacher_width=None if store is None else store.width,
        distill_head=args.distill_head,
        concepts=args.concepts if args.beta > 0 else None,
        precision=args.precision,
        device=device,
    )
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
    cfg = TransformConfig(image_size=size, mean=tuple(model.image_mean), std=tuple(model.image_std))
    loader = build_loader(
        args.train_data,
        batch_size=args.batch_size,
        train=True,
        cfg=cfg,
        backend=args.data_backend,
        device_id=device.index if device.type == "cuda" else None,
        rank=rank,
        world_size=world,
        num_workers=args.workers,
        seed=args.seed,
    )
    keys = loader.sample_keys()
    if len(loader) < args.accum_freq:
        raise ConfigError(
            f"--train-data {args.train_data}: {len(keys)} samples give {len(loader)} batches of {args.batch_size} per "
            f"rank ({world} ranks), fewer than one step of --accum-freq {args.accum_freq}"
        )
    targets = Targets(args, store, keys, device)
    steps_per_epoch = len(loader) // args.accum_freq
    if args.train_num_samples is not None:
        per_step = args.batch_size * args.accum_freq * world
        steps_per_epoch = max(1, min(steps_per_epoch, args.train_num_samples // per_step))
    total_steps = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(
        param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps
    )
    scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" and device.type == "cuda" else None

    config = flags(args)
    step, epoch, batch_in_epoch = 0, 0, 0
    resume = resolve_resume(args.resume, ckpt_dir) if args.resume else None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        check_resumable(resume, ckpt, config)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:
            raise ConfigError(f"{resume}: its weights do not fit --model {args.model} ({e})") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, batch_in_epoch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch"])
        states = ckpt.get("rng") or []
        if rank < len(states):
            set_rng_state(states[rank])
        log.info("resumed %s: epoch %d, step %d, batch %d", resume, epoch, step, batch_in_epoch)

    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_params(run_dir / "params.txt", args)
    metrics = Metrics(run_dir if rank == 0 else None, args.report_to == "tensorboard")
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.torchcompile:
        wrapped = torch.compile(wrapped)

    def checkpoint(path_names: list[str]) -> None:
        states = [rng_state()]
        if world > 1:
            import torch.distributed as dist

            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if rank != 0:
            return
        blob = {
            "epoch": epoch,
            "name": name,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "batch": batch_in_epoch,
            "loader": {"epoch": epoch, "batch": batch_in_epoch},
            "rng": states,
            "config": config,
        }
        for p in path_names:
            save_checkpoint(ckpt_dir / p, blob)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, unit="step", disable=args.quiet or rank != 0, desc="train")
    sums = {k: torch.zeros((), device=device) for k in (*TERMS, "total")}
    finite = torch.ones((len(TERMS) + 1,), dtype=torch.bool, device=device)
    logged_steps, t_log, data_time, samples = 0, time.perf_counter(), 0.0, 0
    last: dict[str, Any] = {}
    stopped = False
    model.train()
    with _StopFlag() as stop:
        while epoch < args.epochs and not stopped:
            loader.set_epoch(epoch, batch_in_epoch)
            it = iter(loader)
            while batch_in_epoch // args.accum_freq < steps_per_epoch:
                t0 = time.perf_counter()
                micro = [next(it) for _ in range(args.accum_freq)]
                data_time += time.perf_counter() - t0
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(
                        step,
                        base_lr=args.lr,
                        warmup=args.warmup,
                        total_steps=total_steps,
                        kind=args.lr_scheduler,
                        cooldown_steps=(args.epochs_cooldown or 0) * steps_per_epoch,
                        cooldown_end_lr=args.lr_cooldown_end,
                    )
                losses = _step(wrapped, model, micro, targets, args, world, device, optimizer, scaler)
                with torch.no_grad():
                    model.clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
                    for i, k in enumerate((*TERMS, "total")):
                        if k in losses:
                            sums[k] += losses[k].detach()
                            finite[i] &= torch.isfinite(losses[k].detach())
                step += 1
                batch_in_epoch += args.accum_freq
                logged_steps += 1
                samples += sum(len(b["key"]) for b in micro) * world
                bar.update(1)
                at_log = step % args.log_every_n_steps == 0 or step == total_steps
                if at_log:
                    last = _log(sums, finite, logged_steps, step, epoch, optimizer, samples, t_log, data_time, device)
                    try:  # the kernels' deferred input checks, read here where _log has synchronised anyway
                        raise_deferred_errors()
                    except ValueError as e:
                        raise ConfigError(f"--concepts {args.concepts}: {e}") from None
                    if rank == 0:
                        metrics.write(last)
                        bar.set_postfix(loss=f"{last['total']:.4f}", lr=f"{last['lr']:.2e}", sps=last["samples_per_s"])
                    sums = {k: torch.zeros((), device=device) for k in sums}
                    logged_steps, t_log, data_time, samples = 0, time.perf_counter(), 0.0, 0
                if args.save_every_n_steps and step % args.save_every_n_steps == 0:
                    checkpoint(["latest.pt"])
                if _agree(stop.requested, world, at_log):
                    checkpoint(["latest.pt"])
                    stopped = True
                    break
            if stopped:
                break
            epoch += 1
            batch_in_epoch = 0
            names = ["latest.pt"] + ([f"epoch_{epoch}.pt"] if epoch % args.save_frequency == 0 else [])
            checkpoint(names)
            if args.val_data and rank == 0:
                record = evaluate(model, args, cfg, device)
                metrics.write({"step": step, "epoch": epoch, **record})
    bar.close()
    metrics.close()
    return {"name": name, "run_dir": str(run_dir), "step": step, "epoch": epoch, "stopped": stopped, "last": last}


def _agree(requested: bool, world: int, at_log: bool) -> bool:
    """Whether to stop now: this process's flag alone, or (several ranks) any rank's, compared at log intervals."""
    if world <= 1:
        return requested
    if not at_log:
        return False
    import torch.distributed as dist

    t = torch.tensor([int(requested)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item())


def _step(wrapped, model, micro, targets, args, world, device, optimizer, scaler) -> dict[str, torch.Tensor]:
    """One optimizer step over the micro-batches (see the module docstring for --accum-freq)."""
    images = [b["image"].to(device, non_blocking=True) for b in micro]
    tokens = [b["tokens"].to(device, non_blocking=True) for b in micro]
    teacher = [targets.teacher(b["key"]) for b in micro]
    labels = [targets.labels(b["key"]) for b in micro]
    optimizer.zero_grad(set_to_none=True)
    amp = autocast_for(args.precision, device)
    if len(micro) == 1:
        with amp:
            out = wrapped(images[0], tokens[0])
            losses = compute_losses(out, teacher[0], labels[0], args, world)
        _backward(losses["total"], scaler)
    else:
        with torch.no_grad(), amp:
            cached = [wrapped(i, t) for i, t in zip(images, tokens, strict=True)]
        teacher_all = None if teacher[0] is None else torch.cat(teacher)
        labels_all = _cat_labels(labels)
        for j in range(len(micro)):
            sync = contextlib.nullcontext() if j == len(micro) - 1 or world == 1 else wrapped.no_sync()
            with sync:
                with amp:
                    live = wrapped(images[j], tokens[j])
                    losses = compute_losses(_merge(cached, j, live), teacher_all, labels_all, args, world)
                _backward(losses["total"], scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if args.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return losses


def _backward(total: torch.Tensor, scaler) -> None:
    (scaler.scale(total) if scaler is not None else total).backward()


def _log(sums, finite, n, step, epoch, optimizer, samples, t_log, data_time, device) -> dict[str, Any]:
    """The log record of the steps since the last one; raises TrainError where a loss was not finite."""
    flags = finite.tolist()  # the one host-device sync of the interval
    for ok, term in zip(flags, (*TERMS, "total"), strict=True):
        if not ok:
            raise TrainError(
                f"step {step}: the {term} is not finite (NaN or inf) in the last {n} steps; stopping, the last "
                "checkpoint is kept (lower --lr, use --precision fp32 or amp_bf16, or check the teacher store)"
            )
    elapsed = time.perf_counter() - t_log
    record = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
    record.update({k: float(v) / n for k, v in sums.items() if float(v) != 0.0 or k in ("total", "contrastive_loss")})
    record.update(samples_per_s=round(samples / elapsed, 2), data_time=round(data_time / n, 4))
    record["batch_time"] = round(elapsed / n, 4)
    if device.type == "cuda":
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return record


@torch.no_grad()
def evaluate(model, args, cfg, device) -> dict[str, float]:
    """Validation: the contrastive loss and image→text / text→image recall@1 over the whole --val-data split."""
    from kclip.data.pipeline import build_loader

    model.eval()
    images, texts = [], []
    for b in build_loader(args.val_data, batch_size=args.batch_size, train=False, cfg=cfg, backend="cpu",
                          num_workers=min(args.workers, 2)):  # fmt: skip
        with autocast_for(args.precision, device):
            out = model(b["image"].to(device), b["tokens"].to(device))
        images.append(out["image_features"].float())
        texts.append(out["text_features"].float())
        scale = out["logit_scale"].float()
    model.train()
    image, text = torch.cat(images), torch.cat(texts)
    logits = scale * image @ text.T
    target = torch.arange(len(image), device=device)
    loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    return {
        "val/contrastive_loss": float(loss),
        "val/image_to_text_r1": float((logits.argmax(1) == target).float().mean()),
        "val/text_to_image_r1": float((logits.argmax(0) == target).float().mean()),
        "val/samples": len(image),
    }
