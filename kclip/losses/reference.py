"""Pure-PyTorch references of kclip's losses: the CPU path, and the ground truth of tests and benchmarks.

Names mirror the public functions of :mod:`kclip.losses`; they materialise the B×N logits and the dense
targets, which the Triton kernels never do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_distill_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    projected_text: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    *,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    rank: int = 0,
) -> dict[str, torch.Tensor]:
    """Symmetric CLIP InfoNCE (open_clip ``ClipLoss``) plus the distillation MSE, computed eagerly.

    Args:
        image_features, text_features: [b, D].
        logit_scale: the scale itself (already exponentiated).
        projected_text, teacher_features: [b, E], or None (no ``distill_loss`` then).
        all_image_features, all_text_features: gathered features [N, D] for the local-loss form, as open_clip's
            ``ClipLoss(local_loss=True)``: local rows against gathered columns, positives at ``rank·b + i``.
        rank: this process's index in the gathered features.

    Returns: ``{"contrastive_loss": [], "distill_loss": []}`` (the latter only when both distillation inputs are
    given), in the inputs' dtype.
    """
    b = image_features.shape[0]
    all_text = text_features if all_text_features is None else all_text_features
    all_image = image_features if all_image_features is None else all_image_features
    logits_per_image = logit_scale * image_features @ all_text.T  # [b, N]
    logits_per_text = logit_scale * text_features @ all_image.T  # [b, N]
    labels = torch.arange(b, device=image_features.device) + rank * b
    out = {
        "contrastive_loss": (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    }
    if projected_text is not None and teacher_features is not None:
        out["distill_loss"] = F.mse_loss(projected_text, teacher_features.to(projected_text.dtype))
    return out


def chunked_contrastive_distill_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    projected_text: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    *,
    block: int = 4096,
) -> dict[str, torch.Tensor]:
    """`contrastive_distill_loss` (single process) through row blocks of ``torch.matmul``: what one writes for a
    large batch without a fused kernel, and the cuBLAS peer of kclip's in bench/bench_losses.py.

    Each block's logits [block, B] are formed, reduced to their summed cross-entropy and freed; the backward
    recomputes them (``torch.utils.checkpoint``), so peak memory is O(block · B) instead of O(B²), at the price of
    one more pass of GEMMs.

    Shapes: features [B, D]; projected_text, teacher_features [B, E] or None. Returns as `contrastive_distill_loss`.
    """
    from torch.utils.checkpoint import checkpoint

    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    b = image_features.shape[0]

    def block_ce(rows: torch.Tensor, cols: torch.Tensor, scale, start: int) -> torch.Tensor:
        logits = scale * rows @ cols.T  # [block, B]
        labels = torch.arange(start, start + rows.shape[0], device=rows.device)
        return F.cross_entropy(logits, labels, reduction="sum")

    total = image_features.new_zeros(())
    for s in range(0, b, block):
        e = min(b, s + block)
        for rows, cols in ((image_features, text_features), (text_features, image_features)):
            total = total + checkpoint(block_ce, rows[s:e], cols, logit_scale, s, use_reentrant=False)
    out = {"contrastive_loss": total / (2 * b)}
    if projected_text is not None and teacher_features is not None:
        out["distill_loss"] = F.mse_loss(projected_text, teacher_features.to(projected_text.dtype))
    return out


def soft_label_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Mean over rows of −Σ_k s_k · log_softmax(logits)_k.

    Args:
        logits: [B, K].
        soft_targets: dense [B, K], or top-k ``(indices [B, T] int, weights [B, T])`` (duplicate indices add up).

    Returns: [] in the logits' dtype.
    """
    if isinstance(soft_targets, tuple):
        indices, weights = soft_targets
        soft_targets = torch.zeros_like(logits).scatter_add_(1, indices.long(), weights.to(logits.dtype))
    log_probs = torch.log_softmax(logits, dim=-1)  # [B, K]
    return -(soft_targets.to(logits.dtype) * log_probs).sum(-1).mean()
