"""The concept classifier C of Knowledge-CLIP: trained on teacher embeddings against the soft concept labels,
then frozen, so that the image encoder can be taught to make C predict its caption's concepts.

C is applied to image features, which are L2-normalised vectors of the CLIP embedding width E. To train it on
the teacher's rows (width D) first, a projection D -> E comes in front, followed by the same L2 normalisation; the
projection is used only for this pre-training and is saved alongside (the image side calls `forward` on its own
normalised features). The head is the authors' MLP E -> 64 -> K (ReLU), or one linear map E -> K. Normalised
features are scaled by sqrt(E) before the head, so the head sees coordinates of unit variance whatever E is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("mlp", "linear")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Shape of C. in_width: teacher width D; embed_dim: CLIP embedding width E; k: concepts; kind: "mlp"
    (E -> hidden -> K) or "linear" (E -> K); hidden: the MLP's width (64, as the authors')."""

    in_width: int
    embed_dim: int
    k: int
    kind: str = "mlp"
    hidden: int = 64


class ConceptClassifier(nn.Module):
    """C: logits over K concepts from L2-normalised features of width E (see the module docstring)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if config.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {config.kind!r}")
        self.config = config
        self.scale = math.sqrt(config.embed_dim)
        self.project = nn.Linear(config.in_width, config.embed_dim)
        if config.kind == "mlp":
            self.head = nn.Sequential(
                nn.Linear(config.embed_dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.k)
            )
        else:
            self.head = nn.Linear(config.embed_dim, config.k)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Concept logits [B, K] of L2-normalised features [B, E] (image features, on the image side)."""
        return self.head(features * self.scale)

    def teacher_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Concept logits [B, K] of teacher rows [B, D] (in the concept space), through the projection."""
        return self(F.normalize(self.project(rows), dim=-1))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k target_k log softmax(logits)_k.  Shapes: [B, K], [B, K] -> []."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def _evaluate(model: ConceptClassifier, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    loss, hits = 0.0, 0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            logits = model.teacher_logits(x[s : s + batch])
            loss += float(soft_cross_entropy(logits, y[s : s + batch])) * logits.shape[0]
            hits += int((logits.argmax(-1) == y[s : s + batch].argmax(-1)).sum())
    return loss / x.shape[0], hits / x.shape[0]


def train_classifier(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    embed_dim: int = 512,
    kind: str = "mlp",
    hidden: int = 64,
    epochs: int = 20,
    batch_size: int = 512,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[ConceptClassifier, dict[str, Any]]:
    """Train C on teacher rows against soft labels (AdamW, cosine learning-rate decay), then freeze it.

    Args:
        x: float32 [N, D] teacher rows in the concept space.
        labels: float32 [N, K] soft labels (rows sum to 1).
        embed_dim: E, the CLIP embedding width the head will read.
        kind, hidden: the head (see ClassifierConfig).
        epochs, batch_size, lr, weight_decay: the optimisation.
        val_fraction: rows held out to report generalisation (none when fewer than 20 rows would be held out).
        seed: initialisation, split and shuffling.

    Returns:
        (C frozen in eval mode, {"loss", "accuracy" (on the training rows), "val_loss", "val_accuracy",
        "label_entropy" (the lowest soft cross-entropy possible on the training rows), "epochs", "seconds", ...}).
        Accuracy is the share of rows whose most likely concept is the label's largest entry.
    """
    t0 = time.perf_counter()
    n, d = x.shape
    k = labels.shape[1]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_val = int(n * val_fraction) if int(n * val_fraction) >= 20 else 0
    xt, yt = (
        torch.from_numpy(np.ascontiguousarray(x, np.float32)),
        torch.from_numpy(np.ascontiguousarray(labels, np.float32)),
    )
    val, train = perm[:n_val], perm[n_val:]
    x_tr, y_tr = xt[train], yt[train]
    torch.manual_seed(seed)
    model = ConceptClassifier(ClassifierConfig(d, embed_dim, k, kind, hidden))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for s in range(0, len(train), batch_size):
            idx = order[s : s + batch_size]
            loss = soft_cross_entropy(model.teacher_logits(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    train_loss, train_acc = _evaluate(model, x_tr, y_tr, 4096)
    entropy = float(-(y_tr * torch.log(y_tr.clamp_min(1e-12))).sum(-1).mean())
    stats: dict[str, Any] = {
        "loss": train_loss,
        "accuracy": train_acc,
        "label_entropy": entropy,
        "val_loss": None,
        "val_accuracy": None,
        "train_rows": len(train),
        "val_rows": n_val,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seconds": 0.0,
    }
    if n_val:
        stats["val_loss"], stats["val_accuracy"] = _evaluate(model, xt[val], yt[val], 4096)
    stats["seconds"] = time.perf_counter() - t0
    log.info(
        "classifier C: loss %.4f (label entropy %.4f), accuracy %.3f, val accuracy %s, %.1f s",
        train_loss,
        entropy,
        train_acc,
        f"{stats['val_accuracy']:.3f}" if n_val else "-",
        stats["seconds"],
    )
    return model, stats


def save_classifier(path, model: ConceptClassifier, train: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write classifier.pt: {"config", "state_dict", "train"} (config: the ClassifierConfig fields plus `extra`)."""
    from kclip._atomic import atomic_path

    blob = {
        "config": {**dataclasses.asdict(model.config), **extra},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train": train,
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_classifier(path, map_location: str | torch.device = "cpu") -> ConceptClassifier:
    """C from classifier.pt, frozen (eval mode, no gradients); `.train_stats` holds its training record."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    cfg = {f.name: blob["config"][f.name] for f in dataclasses.fields(ClassifierConfig)}
    model = ConceptClassifier(ClassifierConfig(**cfg))
    model.load_state_dict(blob["state_dict"])
    model.eval().requires_grad_(False)
    model.train_stats = blob["train"]
    model.extra_config = {k: v for k, v in blob["config"].items() if k not in cfg}
    return model
