"""Soft-label cross-entropy: mean over rows of −Σ_k s_k · log_softmax(z)_k, forward and backward.

The forward makes one pass over each row of logits, in blocks of K, carrying the online log-sum-exp and the
target dot product together; it saves per row only the log-sum-exp and the target mass Σ_k s_k. The backward
makes one pass and writes ∂z; the [B, K] probabilities are never stored. Targets are either dense [B, K] or
top-k (indices [B, T], weights [B, T]); top-k targets are gathered in the forward, and in the backward the
target-free part S·p is written for all of K and then the T entries of each row are written again with their
targets: O(K + T²) per row, not O(K·T). Duplicate indices add up: each entry carries the summed weight of every
entry with its index, so duplicates store the same value and the result does not depend on their order.
Top-k indices outside [0, K) are left out of the loss and reported: the forward writes the first such row into a
device-side flag that kclip.losses reads where the loss is read, without a host sync in the step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET

# Kernel globals must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_LN2 = 0.6931471805599453  # host side


# The interpreter's single configuration (autotuning is off there); the GPU list covers small K (many rows per
# program) to large K (one row per program, wide blocks).
INTERPRET_CONFIG = triton.Config({"BLOCK_B": 8, "BLOCK_K": 256}, num_warps=4, num_stages=1)
CONFIGS = [
    triton.Config({"BLOCK_B": 16, "BLOCK_K": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_B": 4, "BLOCK_K": 1024}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_B": 1, "BLOCK_K": 4096}, num_warps=8, num_stages=2),
]


def _configs() -> list[triton.Config]:
    return [INTERPRET_CONFIG] if INTERPRET else CONFIGS


def _prune_by_k(configs, named_args, **kwargs):
    """Drop blocks wider than the (power-of-two rounded) number of classes; keep at least the narrowest."""
    width = triton.next_power_of_2(named_args["K"])
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(width, 128)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_K"])]


# Forward, row i (base-2 online log-sum-exp over blocks of K):
#   lse_i = log Σ_k e^{z_ik},  S_i = Σ_k s_ik,  loss_i = lse_i · S_i − Σ_k s_ik z_ik,  loss = (1/B) Σ_i loss_i.
# Top-k targets: Σ_k s_ik z_ik = Σ_t w_it z_i,idx_it and S_i = Σ_t w_it, gathered after the sweep.
@triton.autotune(configs=_configs(), key=["N_ROWS", "K"], prune_configs_by={"early_config_prune": _prune_by_k})
@triton.jit
def _soft_label_ce_fwd_kernel(
    Z,
    S,
    IDX,
    W,
    LOSS,  # [N_ROWS] fp32
    LSE,  # [N_ROWS] fp32, natural log
    SSUM,  # [N_ROWS] fp32
    BAD,  # [1] int32: the first row with a top-k index outside [0, K), N_ROWS where there is none
    N_ROWS,
    K,
    TOPK,
    stride_z,
    stride_s,
    stride_idx,
    stride_w,
    DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    row_mask = rows < N_ROWS
    offs_k = tl.arange(0, BLOCK_K)
    m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_B], tl.float32)
    # Elementwise accumulators, reduced once after the loop (fewer reductions per block).
    dot_acc = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    ssum_acc = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask = row_mask[:, None] & (ks < K)[None, :]
        z = tl.load(Z + rows[:, None] * stride_z + ks[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        z2 = z * LOG2E  # [BLOCK_B, BLOCK_K]
        m_new = tl.maximum(m_i, tl.max(z2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past the end see only -inf
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z2 - m_safe[:, None]), 1)
        m_i = m_new
        if DENSE:
            s = tl.load(S + rows[:, None] * stride_s + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            dot_acc += s * tl.where(mask, z, 0.0)
            ssum_acc += s
    if DENSE:
        dot = tl.sum(dot_acc, 1)
        ssum = tl.sum(ssum_acc, 1)
    else:
        offs_t = tl.arange(0, BLOCK_T)
        tmask = row_mask[:, None] & (offs_t < TOPK)[None, :]
        idx = tl.load(IDX + rows[:, None] * stride_idx + offs_t[None, :], mask=tmask, other=0).to(tl.int64)
        w = tl.load(W + rows[:, None] * stride_w + offs_t[None, :], mask=tmask, other=0.0).to(tl.float32)
        valid = tmask & (idx >= 0) & (idx < K)
        zg = tl.load(Z + rows[:, None] * stride_z + idx, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_T]
        dot = tl.sum(tl.where(valid, w * zg, 0.0), 1)
        ssum = tl.sum(tl.where(valid, w, 0.0), 1)
        out_of_range = tl.sum((tmask & ~valid).to(tl.int32), 1) > 0  # [BLOCK_B]
        tl.atomic_min(BAD, tl.min(tl.where(out_of_range, rows, N_ROWS), 0).to(tl.int32))
    lse = (tl.where(row_mask, m_i, 0.0) + tl.log2(tl.where(row_mask, l_i, 1.0))) * LN2  # padding rows: finite
    tl.store(LOSS + rows, lse * ssum - dot, mask=row_mask)
    tl.store(LSE + rows, lse, mask=row_mask)
    tl.store(SSUM + rows, ssum, mask=row_mask)


# Backward: ∂loss/∂z_ik = (g/B) · (S_i · e^{z_ik − lse_i} − s_ik), one pass over K per row. Top-k targets:
# the pass writes (g/B) · S_i · p_ik everywhere, then each kept entry t is written again as
# (g/B) · (S_i · p_i,idx_it − Σ_{t': idx_it' = idx_it} w_it'), recomputed from z (no read-back of the first store).
@triton.autotune(configs=_configs(), key=["N_ROWS", "K"], prune_configs_by={"early_config_prune": _prune_by_k})
@triton.jit
def _soft_label_ce_bwd_kernel(
    Z,
    S,
    IDX,
    W,
    DZ,
    LSE,
    SSUM,
    GRAD,
    N_ROWS,
    K,
    TOPK,
    stride_z,
    stride_s,
    stride_idx,
    stride_w,
    INV_B,
    DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    row_mask = rows < N_ROWS
    coef = tl.load(GRAD).to(tl.float32) * INV_B
    lse2 = tl.load(LSE + rows, mask=row_mask, other=0.0) * LOG2E
    ssum = tl.load(SSUM + rows, mask=row_mask, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask = row_mask[:, None] & (ks < K)[None, :]
        z = tl.load(Z + rows[:, None] * stride_z + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.exp2(z * LOG2E - lse2[:, None])  # [BLOCK_B, BLOCK_K]
        if DENSE:
            s = tl.load(S + rows[:, None] * stride_s + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            dz = (p * ssum[:, None] - s) * coef
        else:
            dz = p * ssum[:, None] * coef
        tl.store(DZ + rows[:, None] * K + ks[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
    if not DENSE:
        # This program owns its rows: after the barrier every thread's store above is visible, and the kept
        # entries are overwritten with their full gradient.
        tl.debug_barrier()
        offs_t = tl.arange(0, BLOCK_T)
        tmask = row_mask[:, None] & (offs_t < TOPK)[None, :]
        idx = tl.load(IDX + rows[:, None] * stride_idx + offs_t[None, :], mask=tmask, other=-1).to(tl.int64)
        w = tl.load(W + rows[:, None] * stride_w + offs_t[None, :], mask=tmask, other=0.0).to(tl.float32)
        valid = tmask & (idx >= 0) & (idx < K)  # [BLOCK_B, BLOCK_T]
        same = (idx[:, :, None] == idx[:, None, :]) & valid[:, None, :]  # [BLOCK_B, BLOCK_T, BLOCK_T]
        w_all = tl.sum(tl.where(same, w[:, None, :], 0.0), 2)  # the summed weight of the entry's index
        zg = tl.load(Z + rows[:, None] * stride_z + idx, mask=valid, other=0.0).to(tl.float32)
        pg = tl.exp2(zg * LOG2E - lse2[:, None])
        dzg = (pg * ssum[:, None] - w_all) * coef
        tl.store(DZ + rows[:, None] * K + idx, dzg.to(DZ.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------------------
# Host side


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_targets(targets, indices, weights):
    """The kernels' view of the soft targets: (dense, targets, indices, weights, top_k), row-major. Dense targets
    fill all three pointer slots (the top-k ones go unread) and top_k is 0; top-k targets pass their weights as
    the dense slot (unread)."""
    if targets is not None:
        targets = _rowmajor(targets)
        return True, targets, targets, targets, 0
    idx, w = _rowmajor(indices), _rowmajor(weights)
    return False, w, idx, w, idx.shape[1]


def soft_label_ce_forward(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Shapes: logits [B, K]; targets [B, K] (dense) or indices, weights [B, T] (top-k).

    Returns: (loss [] fp32, log-sum-exp [B] fp32, target mass [B] fp32, bad [1] int32: the first row with a
    top-k index outside [0, K), or B where there is none; left on the device).
    """
    logits = _rowmajor(logits)
    n_rows, k = logits.shape
    dense, targets, idx, w, topk = _kernel_targets(targets, indices, weights)
    loss_rows = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss_rows)
    ssum = torch.empty_like(loss_rows)
    bad = torch.full((1,), n_rows, device=logits.device, dtype=torch.int32)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_B"]),)
    _soft_label_ce_fwd_kernel[grid](
        logits, targets, idx, w, loss_rows, lse, ssum, bad, n_rows, k, topk,
        logits.stride(0), targets.stride(0), idx.stride(0), w.stride(0),
        DENSE=dense, BLOCK_T=triton.next_power_of_2(max(topk, 1)),
    )  # fmt: skip
    return loss_rows.sum() / n_rows, lse, ssum, bad


def soft_label_ce_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    ssum: torch.Tensor,
    targets: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: ∂loss/∂logits [B, K] in the logits' dtype, scaled by ``grad``."""
    logits = _rowmajor(logits)
    n_rows, k = logits.shape
    dense, targets, idx, w, topk = _kernel_targets(targets, indices, weights)
    d_logits = torch.empty_like(logits)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_B"]),)
    _soft_label_ce_bwd_kernel[grid](
        logits, targets, idx, w, d_logits, lse, ssum, grad.reshape(1).to(torch.float32), n_rows, k, topk,
        logits.stride(0), targets.stride(0), idx.stride(0), w.stride(0), 1.0 / n_rows,
        DENSE=dense, BLOCK_T=triton.next_power_of_2(max(topk, 1)),
    )  # fmt: skip
    return d_logits


@torch.library.custom_op("kclip::soft_label_ce_fwd", mutates_args=())
def _fwd_op(
    logits: torch.Tensor, targets: torch.Tensor | None, indices: torch.Tensor | None, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return soft_label_ce_forward(logits, targets, indices, weights)


@_fwd_op.register_fake
def _(logits, targets, indices, weights):
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
    bad = logits.new_empty(1, dtype=torch.int32)
    return logits.new_empty((), dtype=torch.float32), rows, rows.clone(), bad


@torch.library.custom_op("kclip::soft_label_ce_bwd", mutates_args=())
def _bwd_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    ssum: torch.Tensor,
    targets: torch.Tensor | None,
    indices: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    return soft_label_ce_backward(grad, logits, lse, ssum, targets, indices, weights)


@_bwd_op.register_fake
def _(grad, logits, lse, ssum, targets, indices, weights):
    return torch.empty_like(logits)


class SoftLabelCEFunction(torch.autograd.Function):
    """Autograd glue: saves the logits, the targets and two floats per row; no gradient to the targets (nor to
    the out-of-range flag, the second output)."""

    @staticmethod
    def forward(ctx, logits, targets, indices, weights):
        loss, lse, ssum, bad = torch.ops.kclip.soft_label_ce_fwd(logits, targets, indices, weights)
        ctx.save_for_backward(logits, lse, ssum, targets, indices, weights)
        ctx.mark_non_differentiable(bad)
        return loss, bad

    @staticmethod
    def backward(ctx, grad, _grad_bad):
        logits, lse, ssum, targets, indices, weights = ctx.saved_tensors
        d_logits = torch.ops.kclip.soft_label_ce_bwd(grad, logits, lse, ssum, targets, indices, weights)
        return d_logits, None, None, None


def soft_label_ce(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-label cross-entropy (kernels only; kclip.losses validates and dispatches).

    Args:
        logits: [B, K], fp32, fp16 or bf16.
        targets: dense soft labels [B, K]; or None with ``indices`` (int, [B, T]) and ``weights`` ([B, T]).

    Returns: (the mean over rows, [] fp32; the first row with a top-k index outside [0, K), [1] int32 on the
    device, B where there is none). Gradient flows to ``logits`` only.
    """
    return SoftLabelCEFunction.apply(logits, targets, indices, weights)


__all__ = ["soft_label_ce", "soft_label_ce_forward", "soft_label_ce_backward"]
