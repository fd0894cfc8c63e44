"""Attribute probes of the image encoder: how much of AWA2's 85, CUB's 312 or the synthetic set's 84 binary
attributes a linear read-out of the frozen image features recovers, and class-level zero-shot accuracy from
prompts that list each class's attributes.

Probe. One multi-label logistic regression (torch, full batch, L-BFGS with strong-Wolfe line search, L2 penalty
`l2` on the weights) on the features standardised with the training images' mean and standard deviation; every
attribute gets its own weight vector and bias. Trained on the dataset's training images (the synthetic set's train
split, AWA2's training classes, CUB's train_test_split.txt), evaluated on the others. Deterministic: no seed.

Metrics on the evaluated images:
- `mean_attribute_accuracy`: the share of (image, attribute) decisions right at probability 0.5, averaged over
  attributes;
- `mean_balanced_accuracy`: per attribute the mean of the true positive and true negative rates (sparse
  attributes make plain accuracy look high), averaged over the attributes with both values present;
- `attribute_map`: mean over attributes with at least one positive of the average precision, computed as
  scikit-learn's `average_precision_score` computes it (`average_precision`);
- `attribute_zeroshot_acc1`: each class's prompt lists the attributes at least half of its training images have
  (`attribute_prompt`), and each evaluated image takes the class whose prompt embedding is nearest, among the
  classes present in the evaluated images.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import torch

TASK = "attribute_probe"

# The synthetic set's attribute groups (kclip.data.synth): "colour_red" reads as "red".
_GROUP_PREFIX = re.compile(r"^(colour|shape|size|texture|count|relation)_")


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Average precision of one ranking, as sklearn.metrics.average_precision_score: sum over the distinct score
    thresholds (high to low) of (recall step) x (precision at the threshold). NaN without a positive."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives).astype(bool)
    n_pos = positives.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positives[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each group of tied scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision, recall = tp / (tp + fp), tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclasses.dataclass
class Probe:
    """A fitted multi-label linear probe: logits = ((x - mean) / std) @ weight.T + bias."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [A, E]
    bias: torch.Tensor  # [A]
    loss: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias  # [N, A]


def fit_probe(x: torch.Tensor, y: np.ndarray, *, l2: float = 1e-4, max_iter: int = 200) -> Probe:
    """Fit the probe on features x [N, E] and binary targets y [N, A] (module docstring)."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    target = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    weight = torch.zeros(target.shape[1], z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(target.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight.T + bias, target)
        loss = loss + l2 * weight.pow(2).sum() / target.shape[1]
        loss.backward()
        return loss

    loss = float(opt.step(closure).detach())
    return Probe(mean.float(), std.float(), weight.detach().float(), bias.detach().float(), loss)


def probe_metrics(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The probe's metrics (module docstring) of logits [N, A] against binary y [N, A]."""
    logits, y = np.asarray(logits), np.asarray(y).astype(bool)
    pred = logits > 0
    right = pred == y
    pos, neg = y.sum(0), (~y).sum(0)
    both = (pos > 0) & (neg > 0)
    tpr = (pred & y).sum(0)[both] / pos[both]
    tnr = (~pred & ~y).sum(0)[both] / neg[both]
    aps = [average_precision(logits[:, a], y[:, a]) for a in np.flatnonzero(pos > 0)]
    return {
        "mean_attribute_accuracy": float(right.mean()),
        "mean_balanced_accuracy": float(np.mean((tpr + tnr) / 2)) if both.any() else float("nan"),
        "attribute_map": float(np.mean(aps)) if aps else float("nan"),
        "attributes": int(y.shape[1]),
        "attributes_with_positives": len(aps),
    }


def humanize(name: str) -> str:
    """An attribute's name as prompt words: CUB's "has_bill_shape::hooked_seabird" -> "hooked seabird bill shape",
    the synthetic set's "colour_red" -> "red" and "red_circle" -> "red circle", AWA2's "longleg" as it is."""
    if "::" in name:
        part, value = name.split("::", 1)
        part = part.removeprefix("has_")
        return re.sub(r"[_\s]+", " ", f"{value} {part}").strip()
    return re.sub(r"[_\s]+", " ", _GROUP_PREFIX.sub("", name)).strip()


def attribute_prompt(class_row: np.ndarray, attribute_names: Sequence[str], threshold: float = 0.5) -> str:
    """The prompt of a class from its attribute shares [A]: "a photo of something red, circle, small."."""
    words = [humanize(attribute_names[a]) for a in np.flatnonzero(np.asarray(class_row) >= threshold)]
    return "a photo of something " + ", ".join(words) + "." if words else "a photo of something."
