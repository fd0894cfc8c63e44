"""The flags of `kclip train`: open_clip_train's names and defaults wherever the meaning is the same, kclip's own
for the teacher store, the concepts and the loss weights, and ``--config FILE.yaml`` whose keys are the flags.

A config file holds flag names as keys, with dashes or underscores (``batch-size: 32`` or ``batch_size: 32``);
flags given on the command line override it. An unknown key is an error naming the file and the key. A `kclip run`
config (sections data, teacher, concepts, train, eval, budget) gives its ``train:`` section.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from kclip.errors import KclipError
from kclip.models import PRECISIONS

SCHEDULERS = ("cosine", "const", "const-cooldown")
# The top-level keys of a `kclip run` config (kclip.run.config), whose train: section holds these flags.
RUN_SECTIONS = {"name", "data", "teacher", "concepts", "train", "eval", "budget"}
DATASET_TYPES = ("webdataset", "csv", "auto")


class ConfigError(KclipError, ValueError):
    """A training config or flag value that cannot be used; the message names it."""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kclip train` (see the module docstring)."""
    d = p.add_argument_group("data")
    d.add_argument("--train-data", default=None, help="training split: shards (DIR/train or DIR:train) or a CSV")
    d.add_argument("--val-data", default=None, help="validation split, evaluated at the end of each epoch")
    d.add_argument("--dataset-type", choices=DATASET_TYPES, default="auto", help="webdataset, csv or auto")
    d.add_argument("--train-num-samples", type=int, default=None, help="samples per epoch (default: all of the split)")
    d.add_argument("--workers", type=int, default=4, help="data workers per rank (the CPU loader's), 4")
    d.add_argument("--data-backend", choices=("auto", "dali", "cpu"), default="auto", help="DALI or the CPU twin")
    d.add_argument("--csv-img-key", default="filepath")
    d.add_argument("--csv-caption-key", default="title")
    d.add_argument("--csv-separator", default="\t")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="kclip-tiny", help="an open_clip architecture (kclip-tiny: the embedded one)")
    m.add_argument("--pretrained", default=None, help="an open_clip pretrained tag or a local checkpoint file")
    m.add_argument("--distill-head", choices=("linear", "mlp"), default="linear", help="W_e: paper or authors' code")
    m.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in both towers")
    m.add_argument("--torchcompile", action="store_true", help="torch.compile the model")

    k = p.add_argument_group("Knowledge-CLIP")
    k.add_argument("--teacher-store", default=None, help="teacher store (kclip teacher embed); needed when alpha > 0")
    k.add_argument("--concepts", default=None, help="concepts directory (kclip concepts fit); needed when beta > 0")
    k.add_argument("--alpha", type=float, default=1.0, help="weight of the text distillation loss (paper: 1)")
    k.add_argument("--beta", type=float, default=0.01, help="weight of the concept loss (paper: 0.01)")
    k.add_argument("--gamma", type=float, default=1.0, help="weight of the contrastive loss (paper: 1)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=64, help="batch size per rank (and per micro-batch)")
    o.add_argument("--epochs", type=int, default=32)
    o.add_argument("--lr", type=float, default=5.0e-4, help="learning rate (the paper fine-tunes at 5e-5)")
    o.add_argument("--wd", type=float, default=0.2, help="weight decay (not on gains, biases, logit scale)")
    o.add_argument("--beta1", type=float, default=0.9, help="Adam beta 1")
    o.add_argument("--beta2", type=float, default=0.98, help="Adam beta 2")
    o.add_argument("--eps", type=float, default=1.0e-6, help="Adam epsilon")
    o.add_argument("--warmup", type=int, default=10000, help="warmup steps")
    o.add_argument("--lr-scheduler", choices=SCHEDULERS, default="cosine")
    o.add_argument("--lr-cooldown-end", type=float, default=0.0, help="end lr of const-cooldown")
    o.add_argument("--epochs-cooldown", type=int, default=None, help="cooldown epochs of const-cooldown")
    o.add_argument("--precision", choices=PRECISIONS, default="amp", help="amp (fp16 autocast), amp_bf16, fp32, ...")
    o.add_argument("--grad-clip-norm", type=float, default=None)
    o.add_argument("--accum-freq", type=int, default=1, help="micro-batches per optimizer step (features cached)")
    o.add_argument("--local-loss", action="store_true", help="local rows against gathered columns")
    o.add_argument("--gather-with-grad", action="store_true", help="all-gather features with gradient")
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("logs and checkpoints")
    r.add_argument("--logs", default="./logs/", help="where runs are written (LOGS/NAME/...)")
    r.add_argument("--name", default=None, help="the run's folder under --logs (default: date, model, lr, batch)")
    r.add_argument("--resume", default=None, help="'latest' or a checkpoint path")
    r.add_argument("--save-frequency", type=int, default=1, help="epochs between epoch_N.pt checkpoints")
    r.add_argument(
        "--save-every-n-steps", type=int, default=None, help="also write latest.pt every N steps (mid-epoch)"
    )
    r.add_argument("--report-to", default="", help="'tensorboard' (or empty for none)")
    r.add_argument("--log-every-n-steps", type=int, default=100)
    r.add_argument("--device", default="auto", help="auto, cuda or cpu")
    r.add_argument("--dist-backend", default=None, help="nccl (GPUs) or gloo (CPUs); default by device")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--config", default=None, help="a YAML file whose keys are these flags (flags override it)")


def _dest_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: a.dest for a in parser._actions if a.dest not in ("help", "config")}


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A --config file as a mapping; ConfigError for a missing file, bad YAML or a file that is not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The YAML config as {dest: value}; raises ConfigError for a missing or malformed file or an unknown key."""
    raw = read_yaml(path)
    if isinstance(raw.get("train"), dict) and set(raw) <= RUN_SECTIONS:
        raw = raw["train"]
    known = _dest_names(parser)
    out = {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r} (keys are the flags of `kclip train`)")
        out[dest] = value
    return out


def flags_to_argv(values: dict[str, Any], where: str) -> list[str]:
    """`kclip train` flags from a mapping of flag names to values (a run config's train: section): None leaves a
    flag at its default, True gives a switch, False leaves it off. An unknown name is a ConfigError naming `where`.
    """
    parser = argparse.ArgumentParser(prog="kclip train")
    add_train_arguments(parser)
    switches = {a.dest for a in parser._actions if isinstance(a, argparse._StoreTrueAction)}
    known = _dest_names(parser)
    argv: list[str] = []
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (keys are the flags of `kclip train`)")
        flag = "--" + dest.replace("_", "-")
        if value is None or value is False:
            continue
        if dest in switches:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def parse_train_args(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse `kclip train` flags: the --config file's values first, the command line over them."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="kclip train")
        add_train_arguments(parser)
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**load_config(first.config, parser))
    return check_args(parser.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot train, naming the flag (data and stores are checked by the trainer)."""
    if args.train_data is None:
        raise ConfigError("--train-data: required (a split: DIR/train, DIR:train, or a CSV)")
    for flag in ("batch_size", "epochs", "accum_freq", "log_every_n_steps", "save_frequency"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.workers < 0 or args.warmup < 0:
        raise ConfigError("--workers and --warmup must be >= 0")
    if args.lr <= 0:
        raise ConfigError(f"--lr {args.lr}: must be > 0")
    for flag in ("alpha", "beta", "gamma"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag} {getattr(args, flag)}: must be >= 0")
    if args.alpha == args.beta == args.gamma == 0:
        raise ConfigError("--alpha, --beta and --gamma are all 0: nothing to train")
    if args.alpha > 0 and args.teacher_store is None:
        raise ConfigError(f"--alpha {args.alpha} needs --teacher-store (or --alpha 0 for no text distillation)")
    if args.beta > 0 and args.concepts is None:
        raise ConfigError(f"--beta {args.beta} needs --concepts (or --beta 0 for no concept loss)")
    if args.report_to not in ("", "none", "tensorboard"):
        raise ConfigError(f"--report-to {args.report_to}: kclip reports to tensorboard (or nothing)")
    return args
