"""Knowledge-CLIP's losses: fused Triton kernels on CUDA tensors, pure-PyTorch references elsewhere.

``backend="triton"`` runs the kernels (CUDA tensors, or CPU tensors when ``kclip.kernels`` was imported under
``TRITON_INTERPRET=1``), ``"reference"`` the PyTorch references of :mod:`kclip.losses.reference`, ``"auto"`` the
kernels on CUDA tensors and the references elsewhere. ``KCLIP_DISABLE_TRITON=1`` forces the references.
Importing this module imports neither Triton nor the kernels and touches no GPU: the kernels load at first use.

Input checks: shapes and dtypes always (``ValueError`` naming the argument). Checks that need the values, hence a
host synchronisation (finite logit scale and features, non-negative soft targets that sum to 1 per row, top-k
indices in range), run on CPU tensors, and on GPU tensors only when ``KCLIP_CHECK=1``. Without it, the soft-label
kernel still finds top-k indices outside [0, K) (they are left out of the loss) and keeps the first such row on
the device; :func:`raise_deferred_errors`, called where the loss is read anyway (the training loop's log
interval), turns it into a ``ValueError`` naming the row, at the cost of the one synchronisation it already makes.
"""

from __future__ import annotations

import os
import warnings

import torch

from kclip.losses import reference

__all__ = ["contrastive_distill_loss", "soft_label_cross_entropy", "raise_deferred_errors", "reference"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "triton", "reference")


class _DeferredIndexCheck:
    """The first out-of-range top-k row the kernel found since the last read, per device, as one int64 on that
    device: call number · 2^32 + row (int64 max where there is none), combined with torch.minimum (no sync)."""

    NONE = torch.iinfo(torch.int64).max

    def __init__(self) -> None:
        self.first: dict[torch.device, torch.Tensor] = {}
        self.calls = 0
        self.k: int | None = None

    def record(self, bad: torch.Tensor, n_rows: int, k: int) -> None:
        code = torch.where(bad < n_rows, bad.to(torch.int64) + (self.calls << 32), self.NONE)  # [1]
        prev = self.first.get(bad.device)
        self.first[bad.device] = code if prev is None else torch.minimum(prev, code)
        self.calls += 1
        self.k = k

    def read(self) -> None:
        first, calls, k = self.first, self.calls, self.k
        self.first, self.calls = {}, 0
        for code in first.values():
            value = int(code.item())  # the synchronisation: once per read, not per step
            if value != self.NONE:
                call, row = divmod(value, 1 << 32)
                raise ValueError(
                    f"soft_targets indices: row {row} of the soft-label cross-entropy call {call + 1} of {calls} "
                    f"since the last check has an index outside [0, {k}) (left out of that loss)"
                )


_DEFERRED = _DeferredIndexCheck()


def raise_deferred_errors() -> None:
    """Raise ValueError for a top-k soft-label index outside [0, K) that a kernel found since the last call
    (module docstring); reads one number per device, so call it where the loss is read anyway."""
    _DEFERRED.read()


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _use_kernels(backend: str, device: torch.device) -> bool:
    """Whether this call runs the Triton kernels (see the module docstring)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "reference" or _flag("KCLIP_DISABLE_TRITON"):
        return False
    if backend == "auto":
        return device.type == "cuda"
    if device.type == "cuda":
        return True
    from kclip import kernels

    if device.type == "cpu" and kernels.INTERPRET:
        return True
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before kclip.kernels is "
        f"imported; got {device.type} tensors"
    )


def _value_checks(device: torch.device) -> bool:
    """Value checks synchronise with the device: CPU tensors always, GPU tensors only under KCLIP_CHECK=1."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or _flag("KCLIP_CHECK")


def _check_matrix(name: str, t: torch.Tensor, kernels: bool, rows: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-d tensor, got {getattr(t, 'shape', type(t))}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows} (the batch size)")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    allowed = _FLOAT_DTYPES if kernels else (*_FLOAT_DTYPES, torch.float64)
    if t.dtype not in allowed:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in allowed)}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def contrastive_distill_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    projected_text: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    local_loss: bool = False,
    group: torch.distributed.ProcessGroup | None = None,
    deterministic: bool = False,
) -> dict[str, torch.Tensor]:
    """CLIP contrastive loss plus Knowledge-CLIP's text-embedding distillation, fused on the GPU.

    ``contrastive_loss`` is open_clip's ``ClipLoss``: the mean of the image→text and text→image cross-entropies
    over ``logits = logit_scale · I·Tᵀ`` with the positives on the diagonal. ``distill_loss`` is
    ``F.mse_loss(projected_text, teacher_features)``, the mean over batch *and* width. The training program feeds
    teacher embeddings standardised per dimension (mean and std stored with the teacher store), so the term is
    O(1) like the contrastive one; the paper's ``Σ_i ‖E_T(x_i)·W_e − L(x_i)‖²`` differs from it by the constant
    factor ``b·E`` (batch times teacher width), which its weight α absorbs.

    Distributed form (``local_loss=True`` with an initialised process group of W > 1 ranks): features are
    all-gathered *with* gradient (``torch.distributed.nn.functional.all_gather``) and each rank computes the loss of
    its b local rows against the N = W·b gathered columns, both directions, as open_clip's
    ``ClipLoss(local_loss=True, gather_with_grad=True)``. Each rank's loss is the mean over its own rows, so the
    mean over ranks equals the single-process loss of the whole batch. Gradient scaling: the all-gather's backward
    *sums* the gathered-feature gradients over ranks, so each rank's feature gradients (hence the encoder
    parameters' gradients before DDP reduces them) are **W times** those of one process holding the whole batch,
    i.e. the gradient of Σ_ranks loss; DDP's 1/W averaging brings them back to the single-process gradient. The
    ``logit_scale`` gradient on a rank is that of its own loss only; averaged over ranks it equals the
    single-process gradient. Do not rescale again.

    Args:
        image_features: [b, D] image embeddings (usually L2-normalised), fp32, fp16 or bf16.
        text_features: [b, D] text embeddings, same dtype.
        logit_scale: the scale itself, already exponentiated: a one-element tensor (learnable) or a number.
        projected_text: [b, E] text embeddings mapped to the teacher width by W_e, or None.
        teacher_features: [b, E] (standardised) teacher embeddings, or None. No gradient flows to it.
        backend: "auto", "triton" or "reference" (module docstring).
        local_loss: use the distributed form above when a process group of more than one rank is initialised.
        group: process group of the gather (default: the world).
        deterministic: kernels only; never use atomics (split reductions go through per-split buffers summed in a
            fixed order), so that two runs give bit-identical gradients.

    Returns:
        ``{"contrastive_loss": [], "distill_loss": []}``, the latter only when both distillation tensors are given.
        The kernels return fp32 scalars; the reference returns the inputs' dtype.

    Shapes:
        b is the local batch, D the embedding width, E the teacher width.
    """
    if not isinstance(image_features, torch.Tensor):
        raise ValueError(f"image_features must be a tensor, got {type(image_features)}")
    device = image_features.device
    kernels = _use_kernels(backend, device)
    _check_matrix("image_features", image_features, kernels)
    b, width = image_features.shape
    _check_matrix("text_features", text_features, kernels, rows=b)
    if text_features.shape[1] != width:
        raise ValueError(f"text_features has width {text_features.shape[1]}, image_features {width}")
    if text_features.dtype != image_features.dtype:
        raise ValueError(f"text_features has dtype {text_features.dtype}, image_features {image_features.dtype}")
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=device, dtype=torch.float32)
    if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
        raise ValueError(f"logit_scale must be one floating-point element, got {tuple(logit_scale.shape)}")
    if (projected_text is None) != (teacher_features is None):
        raise ValueError("projected_text and teacher_features must be given together")
    has_distill = projected_text is not None
    if has_distill:
        _check_matrix("projected_text", projected_text, kernels, rows=b)
        _check_matrix("teacher_features", teacher_features, kernels, rows=b)
        if teacher_features.shape != projected_text.shape:
            raise ValueError(
                f"teacher_features has shape {tuple(teacher_features.shape)}, projected_text "
                f"{tuple(projected_text.shape)}"
            )
    for name, t in (("text_features", text_features), ("logit_scale", logit_scale), ("projected_text", projected_text),
                    ("teacher_features", teacher_features)):  # fmt: skip
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, image_features on {device}")
    if _value_checks(device):
        _check_finite("logit_scale", logit_scale)
        _check_finite("image_features", image_features)
        _check_finite("text_features", text_features)
        if has_distill:
            _check_finite("projected_text", projected_text)
            _check_finite("teacher_features", teacher_features)

    image_all = text_all = None
    rank = 0
    if local_loss and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size(group)
        if world > 1:
            import torch.distributed.nn.functional as dist_fn

            rank = torch.distributed.get_rank(group)
            # The autograd all-gather (backward: sum over ranks) works on every backend, gloo included; torch marks
            # it deprecated in favour of functional collectives that gloo lacks the reduce-scatter for.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                image_all = torch.cat(dist_fn.all_gather(image_features, group=group))  # [W·b, D]
                text_all = torch.cat(dist_fn.all_gather(text_features, group=group))  # [W·b, D]

    if not kernels:
        return reference.contrastive_distill_loss(
            image_features, text_features, logit_scale, projected_text, teacher_features,
            all_image_features=image_all, all_text_features=text_all, rank=rank,
        )  # fmt: skip
    from kclip.kernels.contrastive_distill import contrastive_distill

    loss, distill = contrastive_distill(
        image_features, text_features, logit_scale, projected_text, teacher_features,
        image_all=image_all, text_all=text_all, offset=rank * b, deterministic=deterministic,
    )  # fmt: skip
    out = {"contrastive_loss": loss}
    if has_distill:
        out["distill_loss"] = distill
    return out


def soft_label_cross_entropy(
    logits: torch.Tensor,
    soft_targets: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Soft-label cross-entropy, Knowledge-CLIP's concept loss: mean over rows of −Σ_k s_k · log_softmax(logits)_k.

    Args:
        logits: [B, K] classifier outputs, fp32, fp16 or bf16.
        soft_targets: dense soft labels [B, K] (non-negative, rows summing to 1), or top-k
            ``(indices [B, T] integer, weights [B, T])`` with indices in [0, K) and weights summing to 1 per row.
            No gradient flows to the targets.
        backend: "auto", "triton" or "reference" (module docstring).

    Returns:
        The loss, [] (fp32 from the kernels, the logits' dtype from the reference).

    Shapes:
        B rows, K classes (2 to 65536 and beyond: the kernels loop over K in blocks), T kept labels per row.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a tensor, got {type(logits)}")
    device = logits.device
    kernels = _use_kernels(backend, device)
    _check_matrix("logits", logits, kernels)
    n_rows, k = logits.shape
    dense = not isinstance(soft_targets, tuple)
    if dense:
        if not isinstance(soft_targets, torch.Tensor) or soft_targets.shape != logits.shape:
            raise ValueError(
                f"soft_targets must be a [B, K] tensor like logits {tuple(logits.shape)}, or (indices, weights); "
                f"got {getattr(soft_targets, 'shape', type(soft_targets))}"
            )
        if not soft_targets.is_floating_point():
            raise ValueError(f"soft_targets has dtype {soft_targets.dtype}; it must be floating point")
        tensors = (("soft_targets", soft_targets),)
    else:
        if len(soft_targets) != 2:
            raise ValueError("top-k soft_targets must be a pair (indices, weights)")
        indices, weights = soft_targets
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != n_rows:
            raise ValueError(f"soft_targets indices must be [B={n_rows}, T], got {getattr(indices, 'shape', None)}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"soft_targets indices have dtype {indices.dtype}; expected int32 or int64")
        if not isinstance(weights, torch.Tensor) or weights.shape != indices.shape:
            raise ValueError(
                f"soft_targets weights must have the indices' shape {tuple(indices.shape)}, "
                f"got {getattr(weights, 'shape', None)}"
            )
        if not weights.is_floating_point():
            raise ValueError(f"soft_targets weights have dtype {weights.dtype}; they must be floating point")
        tensors = (("soft_targets indices", indices), ("soft_targets weights", weights))
    for name, t in tensors:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, logits on {device}")
    if _value_checks(device):
        _check_finite("logits", logits)
        w = soft_targets if dense else weights
        name = "soft_targets" if dense else "soft_targets weights"
        _check_finite(name, w)
        if bool((w < 0).any()):
            raise ValueError(f"{name} must be non-negative")
        row_sums = w.double().sum(-1)
        if not bool(torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3, rtol=0)):
            raise ValueError(f"{name} rows must sum to 1 (largest deviation {float((row_sums - 1).abs().max()):.3g})")
        if not dense and bool(((indices < 0) | (indices >= k)).any()):
            raise ValueError(f"soft_targets indices must lie in [0, {k})")

    if not kernels:
        return reference.soft_label_cross_entropy(logits, soft_targets)
    from kclip.kernels.soft_label_ce import soft_label_ce

    if dense:
        return soft_label_ce(logits, soft_targets)[0]
    loss, bad = soft_label_ce(logits, None, indices, weights)
    if not _value_checks(device) and not torch.compiler.is_compiling():
        _DEFERRED.record(bad, n_rows, k)
    return loss
