"""Training checkpoints in open_clip's layout, written atomically, with everything an exact resume needs.

A checkpoint is a ``torch.save``'d dict::

    {"epoch": completed epochs, "name": run name, "state_dict": model (KnowledgeCLIP, unwrapped),
     "optimizer": ..., "scaler": ... or None,                                  # open_clip's fields
     "step": optimizer steps done, "batch": batches of the current epoch done (0 at an epoch boundary),
     "loader": the loader's state_dict(), "rng": [per rank: python, numpy, torch, cuda states],
     "config": the resolved flags, "format": "kclip.train_checkpoint", "version": 1}

``epoch_N.pt`` is written after epoch N (every --save-frequency epochs), ``latest.pt`` after every epoch, every
--save-every-n-steps steps, and when the process is asked to stop (SIGTERM / SIGINT). ``--resume latest`` reads
LOGS/NAME/checkpoints/latest.pt.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kclip._atomic import atomic_path
from kclip.errors import KclipError

FORMAT = "kclip.train_checkpoint"
VERSION = 1
# Flags that must agree between a run and the checkpoint it resumes: another value trains another model.
RESUME_FIELDS = ("model", "distill_head", "alpha", "beta", "gamma", "batch_size", "accum_freq", "seed", "train_data")


class CheckpointError(KclipError, ValueError):
    """A checkpoint that cannot be resumed or exported; the message names it."""


def rng_state() -> dict[str, Any]:
    """The random states of this process (python, numpy, torch CPU and every CUDA device)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> Path:
    """torch.save to a temporary name beside `path`, then rename: a checkpoint that exists is whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **checkpoint}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint (on the CPU); raises CheckpointError for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises several types
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint (no state_dict)")
    return ckpt


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """The checkpoint `--resume` names: 'latest' is checkpoint_dir/latest.pt (None where the run has none yet)."""
    if resume == "latest":
        latest = checkpoint_dir / "latest.pt"
        return latest if latest.is_file() else None
    return Path(resume)


def check_resumable(path: Path, ckpt: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse a checkpoint of another run: another architecture or other flags that shape the model or data."""
    saved = ckpt.get("config")
    if ckpt.get("format") != FORMAT or not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a kclip training checkpoint; it cannot be resumed")
    differ = [f for f in RESUME_FIELDS if saved.get(f) != config.get(f)]
    if differ:
        was = ", ".join(f"--{f.replace('_', '-')} {saved.get(f)}" for f in differ)
        now = ", ".join(f"--{f.replace('_', '-')} {config.get(f)}" for f in differ)
        raise CheckpointError(f"{path}: a checkpoint of another run ({was}); this run has {now}")
