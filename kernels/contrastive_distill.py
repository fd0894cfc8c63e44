"""Fused CLIP contrastive (symmetric InfoNCE) + text-embedding distillation loss, forward and backward.

The B×N logits matrix ``s · A·Cᵀ`` never reaches device memory. The forward streams column tiles and keeps an
online log-sum-exp per row, for both directions of the symmetric loss in one launch (image rows against text
columns, text rows against image columns); it saves only the per-row log-sum-exps ([2, B] floats). The backward
recomputes each logit tile from the features and the saved log-sum-exps, FlashAttention style (Triton tutorial
06-fused-attention), and accumulates the feature gradients tile by tile. The distillation term (mean squared
error between projected text and teacher embeddings) rides in the same launches.

Two forms:

* single process (``image_all``/``text_all`` None): rows and columns are the same batch. Row i of the image
  direction and column i of the text direction share their logits, so one backward pass per direction uses
  both the row and the column softmax of each tile.
* ``local_loss`` (open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``): local rows [b, D] against
  gathered columns [N, D] with the positives at ``offset + i``. The backward has a row pass (gradients of the
  local features) and a column pass (gradients of the gathered features, which the all-gather's backward
  sums over ranks).

Work, in GEMM-equivalents (one rows x columns x D product; ``gemm_equivalents``): the forward computes the logits
once per direction (2); each backward program owns a group of NUM_DO slices of BLOCK_DO features, computes each
logit tile once for the whole group and accumulates every slice's gradient from it, so the backward does
2 (ceil(D / (NUM_DO · BLOCK_DO)) + 1). At D = 768 the sm_90 configuration holds the whole width (3 x 256): 4 in
the backward, 6 in all; the configurations that also compile without spills for sm_80 group 384 features (8 in
all) or take one 256-wide slice (10); the autotuner picks by time. The minimal algorithm (1 forward, 3 backward)
is the floor bench/bench_losses.py uses.

Reductions: every program writes its own partial (rows, splits of the inner dimension, slices of the feature
dimension) and the host sums them in a fixed order; the only atomics are the optional split-inner accumulation
of the backward (``deterministic=False`` with more than one split), which ``deterministic=True`` replaces by
per-split buffers summed in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET

# Kernel globals must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = 0.6931471805599453  # host side
BLOCK_E = 128  # distillation width tile: a memory-bound elementwise loop, not tuned
MAX_SPLITS = 16


C = triton.Config
# The interpreter's single configuration (autotuning is off there): small, so B=257 stays fast on a CPU.
INTERPRET_FWD_CONFIG = C({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
# Its backward groups two 32-wide feature slices, so the tests' widths cover one slice, a partial second slice and
# several groups.
INTERPRET_BWD_CONFIG = C(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_DO": 32, "NUM_DO": 2}, num_warps=4, num_stages=1
)
# GPU configurations per input width (16-bit tiles on tensor cores; fp32 through 3-pass TF32, which needs smaller
# tiles), each compiled for sm_80 and sm_90 without spills by tests/test_kernels_compile.py. The backward's
# BLOCK_DO = 256 keeps the recomputation of each tile to ceil(D / 256) times (3 at D = 768).
FWD_CONFIGS_16 = [
    C({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    C({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    C({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
]
FWD_CONFIGS_32 = [
    C({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    C({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    C({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
]


def _bwd(m: int, n: int, k: int, do: int, num_do: int, warps: int, stages: int) -> triton.Config:
    return C(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_DO": do, "NUM_DO": num_do},
        num_warps=warps,
        num_stages=stages,
    )


# Backward: pipelined (num_stages >= 2) everywhere, each compiled without spills in its store modes. A program
# accumulates NUM_DO slices of BLOCK_DO features and computes each logit tile once for all of them; the tile is
# recomputed once per group of NUM_DO x BLOCK_DO features (gemm_equivalents). The grouped configurations hold
# more accumulators, so they take fewer rows (BLOCK_M = 32).
BWD_CONFIGS_16 = [
    _bwd(64, 64, 64, 256, 1, 8, 2),
    _bwd(64, 64, 64, 256, 1, 8, 3),
    _bwd(64, 64, 32, 256, 1, 8, 3),
    _bwd(32, 64, 64, 256, 1, 4, 2),
    _bwd(64, 32, 64, 256, 1, 8, 3),
    _bwd(64, 64, 64, 128, 1, 8, 2),
    _bwd(64, 128, 64, 128, 1, 8, 3),
    _bwd(32, 64, 64, 128, 3, 8, 2),  # a 384-wide group: D = 768 recomputes each tile twice
    _bwd(32, 64, 64, 128, 3, 8, 3),
]
# Only sm_90 (Hopper) compiles these without spills (sm_80 spills 140-810 bytes): the whole D = 768 in one group
# (each tile computed once: 4 GEMM-equivalents in the backward), and a 64-row 384-wide group. Pruned elsewhere.
BWD_CONFIGS_16_SM90 = [
    _bwd(32, 32, 64, 256, 3, 16, 2),
    _bwd(64, 64, 64, 128, 3, 8, 2),
]
BWD_CONFIGS_32 = [
    _bwd(32, 32, 32, 64, 1, 4, 3),
    _bwd(64, 32, 32, 128, 1, 8, 3),
    _bwd(32, 32, 32, 128, 1, 4, 3),
    _bwd(32, 32, 32, 128, 3, 8, 2),
]
# The atomic split-inner store (deterministic=False) holds more registers: on sm_80 only the 16-bit tiles with
# BLOCK_DO = 128 fit without spills (the 256-wide ones spill 190-640 bytes), and neither sm_90-only group does
# (60 and 8 bytes); every fp32 one fits.
BWD_ATOMIC_CONFIGS_16 = BWD_CONFIGS_16[-4:]
BWD_ATOMIC_CONFIGS_32 = BWD_CONFIGS_32


def _fwd_configs() -> list[triton.Config]:
    return [INTERPRET_FWD_CONFIG] if INTERPRET else FWD_CONFIGS_16 + FWD_CONFIGS_32


def _bwd_configs() -> list[triton.Config]:
    return [INTERPRET_BWD_CONFIG] if INTERPRET else BWD_CONFIGS_16 + BWD_CONFIGS_16_SM90 + BWD_CONFIGS_32


def _prune(configs, named_args, **kwargs):
    """Keep the configurations of the input dtype (and store mode) whose tiles are not wider than the features."""
    if INTERPRET:
        return configs
    features = named_args["A0"] if "A0" in named_args else named_args["X0"]
    wide = features.dtype == torch.float32
    if "A0" in named_args:
        allowed = FWD_CONFIGS_32 if wide else FWD_CONFIGS_16
    elif kwargs.get("STORE_MODE", named_args.get("STORE_MODE")) == 2:
        allowed = BWD_ATOMIC_CONFIGS_32 if wide else BWD_ATOMIC_CONFIGS_16
    else:
        allowed = BWD_CONFIGS_32 if wide else BWD_CONFIGS_16
        if not wide and features.is_cuda and torch.cuda.get_device_capability(features.device) >= (9, 0):
            allowed = allowed + BWD_CONFIGS_16_SM90
    candidates = [c for c in configs if any(c is a for a in allowed)]
    d = named_args["D"]
    width = triton.next_power_of_2(d)
    kept = [
        c
        for c in candidates
        if c.kwargs["BLOCK_K"] <= max(width, 16)
        and c.kwargs.get("BLOCK_DO", 0) <= width
        and (c.kwargs.get("NUM_DO", 1) - 1) * c.kwargs.get("BLOCK_DO", 0) < d  # no accumulator wholly past D
    ]
    return kept or [min(candidates, key=lambda c: c.kwargs.get("BLOCK_DO", c.kwargs["BLOCK_K"]))]


@triton.jit
def _dot_tile(
    a_ptr, rows, row_mask, stride_a, c_ptr, cols, col_mask, stride_c, D,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """<A_rows, C_cols> over the width D in slices of BLOCK_K, fp32 accumulation: one [BLOCK_M, BLOCK_N] logit tile
    (before scaling), shared by the forward and both backward passes."""
    offs_k = tl.arange(0, BLOCK_K)
    x = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < D
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_K]
        c = tl.load(
            c_ptr + cols[None, :] * stride_c + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0
        )  # [BLOCK_K, BLOCK_N]
        if DOT_FP32:
            a = a.to(tl.float32)
            c = c.to(tl.float32)
        x = tl.dot(a, c, x, input_precision=INPUT_PRECISION)
    return x


# Forward. Per direction d (0: rows A=image, columns C=text; 1: rows A=text, columns C=image) and row i:
#   z_ij = s · <A_i, C_j>,  lse_i = log Σ_j exp(z_ij)  (online: m ← max(m, max_j z), l ← l·e^{m_old−m} + Σ e^{z−m})
#   loss = 1/(2b) Σ_d Σ_i (lse_di − z_d,i,off+i)
# computed in base 2 (z·log2 e) so the exponentials are exp2. The column range may be split over programs
# (grid axis 2) when there are few row blocks; each split stores its own base-2 lse, merged on the host.
# Programs of split 0 also store the positive logit z_i,off+i (a row dot product) and, for d = 0, the squared
# distillation error Σ_e (P_ie − T_ie)² of their rows.
@triton.autotune(configs=_fwd_configs(), key=["N_ROWS", "N_COLS", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _contrastive_distill_fwd_kernel(
    A0,
    C0,
    A1,
    C1,
    SCALE,
    LSE_PART,  # [2, SPLITS, N_ROWS] fp32, base 2
    DIAG,  # [2, N_ROWS] fp32
    P,
    TCH,
    SQERR,  # [N_ROWS] fp32
    N_ROWS,
    N_COLS,
    D,
    E,
    OFFSET,
    COLS_PER_SPLIT,
    stride_a0,
    stride_c0,
    stride_a1,
    stride_c1,
    stride_p,
    stride_t,
    HAS_DISTILL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    direction = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    if direction == 0:
        a_ptr = A0
        c_ptr = C0
        stride_a = stride_a0
        stride_c = stride_c0
    else:
        a_ptr = A1
        c_ptr = C1
        stride_a = stride_a1
        stride_c = stride_c1

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_mask = rows < N_ROWS
    scale = tl.load(SCALE).to(tl.float32)
    qk_scale = scale * LOG2E
    offs_k = tl.arange(0, BLOCK_K)

    col_begin = pid_s * COLS_PER_SPLIT  # int32 loop bounds; offsets below are int64
    col_end = tl.minimum(col_begin + COLS_PER_SPLIT, N_COLS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(col_begin, col_end, BLOCK_N):
        cols = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
        col_mask = cols < col_end
        x = _dot_tile(
            a_ptr, rows, row_mask, stride_a, c_ptr, cols, col_mask, stride_c, D,
            DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        z = tl.where(col_mask[None, :], x * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N], base 2
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), 1)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)
    tl.store(LSE_PART + (direction * n_splits + pid_s).to(tl.int64) * N_ROWS + rows, lse2, mask=row_mask)

    if pid_s == 0:
        diag_rows = rows + OFFSET
        diag = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            mask = row_mask[:, None] & (ks < D)[None, :]
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            c = tl.load(c_ptr + diag_rows[:, None] * stride_c + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            diag += tl.sum(a * c, 1)
        tl.store(DIAG + direction.to(tl.int64) * N_ROWS + rows, diag * scale, mask=row_mask)
        if HAS_DISTILL:
            if direction == 0:
                offs_e = tl.arange(0, BLOCK_E)
                sq = tl.zeros([BLOCK_M], tl.float32)
                for e0 in range(0, E, BLOCK_E):
                    es = e0 + offs_e
                    mask = row_mask[:, None] & (es < E)[None, :]
                    p = tl.load(P + rows[:, None] * stride_p + es[None, :], mask=mask, other=0.0).to(tl.float32)
                    t = tl.load(TCH + rows[:, None] * stride_t + es[None, :], mask=mask, other=0.0).to(tl.float32)
                    sq += tl.sum((p - t) * (p - t), 1)
                tl.store(SQERR + rows, sq, mask=row_mask)


@triton.jit
def _slice_dot(
    acc, g, y_ptr, cols, col_mask, stride_y, dcols, dmask,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + G · Y[cols, dcols]: one feature slice's share of Σ_j G_ij Y_j."""
    y = tl.load(
        y_ptr + cols[:, None] * stride_y + dcols[None, :], mask=col_mask[:, None] & dmask[None, :], other=0.0
    )  # [BLOCK_N, BLOCK_DO]
    if DOT_FP32:
        y = y.to(tl.float32)
    return tl.dot(g, y, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _store_slice(
    acc, slice_index, x_ptr, stride_x, dx_ptr, rows, row_mask, D, N_OUTER, DSCALE_ROW, scale, pid_s,
    STORE_DSCALE: tl.constexpr, STORE_MODE: tl.constexpr, BLOCK_DO: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    """Write one slice of ∂X = s Σ_j G_ij Y_j (acc, upstream factor applied) and its ∂s partial <X_i, acc_i>.
    A group's FIRST slice always starts inside D; a later one of the last group may start past it (skipped)."""
    start = slice_index * BLOCK_DO
    if FIRST or start < D:
        dcols = start.to(tl.int64) + tl.arange(0, BLOCK_DO)
        out_mask = row_mask[:, None] & (dcols < D)[None, :]
        if STORE_DSCALE:
            xo = tl.load(x_ptr + rows[:, None] * stride_x + dcols[None, :], mask=out_mask, other=0.0).to(tl.float32)
            tl.store(DSCALE_ROW + slice_index.to(tl.int64) * N_OUTER + rows, tl.sum(xo * acc, 1), mask=row_mask)
        dx = acc * scale
        if STORE_MODE == 0:
            tl.store(dx_ptr + rows[:, None] * D + dcols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=out_mask)
        elif STORE_MODE == 1:
            tl.store(dx_ptr + (pid_s * N_OUTER + rows[:, None]) * D + dcols[None, :], dx, mask=out_mask)
        else:
            tl.atomic_add(dx_ptr + rows[:, None] * D + dcols[None, :], dx, mask=out_mask)


# Backward. With G = ∂loss/∂z (z = s·X·Yᵀ the logit tile of "outer" rows X against "inner" rows Y):
#   ∂loss/∂X_i = s Σ_j G_ij Y_j,      ∂loss/∂s = Σ_ij G_ij <X_i, Y_j> = Σ_i <X_i, Σ_j G_ij Y_j>,
#   G_ij = g/(2b) · ( [ROW] e^{z_ij − lse_row_i} + [COL] e^{z_ij − lse_col_j} − w·δ(i − j = shift) ),
# g the upstream gradient of the contrastive term, w the number of softmax terms. Each tile is recomputed from
# X, Y and the saved log-sum-exps (never stored). Uses:
#   single process: X = A_d, Y = C_d, ROW = lse_d, COL = lse_{1−d} (column softmax of direction d is the row
#                   softmax of the other direction), w = 2, shift = 0; ∂s from direction 0 only.
#   local rows:     X = A_d (local), Y = C_d (gathered), ROW = lse_d, w = 1, shift = −offset; ∂s from both.
#   gathered cols:  X = C_d (gathered), Y = A_d (local), COL = lse_d, w = 1, shift = +offset.
# Grid: (outer row blocks, 2 directions × feature groups of NUM_DO × BLOCK_DO, inner splits). Each group computes
# the tile once and accumulates its NUM_DO slices from it ([BLOCK_M, D] accumulators: at D = 768, 32 rows in 16
# warps fit sm_90's registers; 64 rows do not).
# Distillation: ∂/∂P = 2 (P − T) · g_d / (b·E), written by one program slice per row block.
@triton.autotune(
    configs=_bwd_configs(),
    key=["N_OUTER", "N_INNER", "D", "STORE_MODE"],  # the store mode changes which configurations may run
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["DX0", "DX1", "DSCALE"],
)
@triton.jit
def _contrastive_distill_bwd_kernel(
    X0,
    Y0,
    X1,
    Y1,
    DX0,
    DX1,
    SCALE,
    GRAD_C,
    GRAD_D,
    LSE_ROW0,
    LSE_ROW1,
    LSE_COL0,
    LSE_COL1,
    DSCALE,  # [2, SPLITS, N_DS_SLOTS, N_OUTER] fp32
    P,
    TCH,
    DP,
    N_OUTER,
    N_INNER,
    D,
    E,
    DIAG_SHIFT,
    INNER_PER_SPLIT,
    N_DS_SLOTS,
    stride_x0,
    stride_y0,
    stride_x1,
    stride_y1,
    stride_p,
    stride_t,
    COEF,
    DIAG_WEIGHT,
    DISTILL_COEF,
    USE_ROW_LSE: tl.constexpr,
    USE_COL_LSE: tl.constexpr,
    STORE_DSCALE: tl.constexpr,
    HAS_DISTILL: tl.constexpr,
    STORE_MODE: tl.constexpr,  # 0: store in the output dtype, 1: fp32 partial per split, 2: fp32 atomic add
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    NUM_DO: tl.constexpr,  # feature slices a program accumulates (1 to 4): its group is NUM_DO x BLOCK_DO wide
):
    pid_m = tl.program_id(0)
    pid_1 = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    n_groups = tl.cdiv(D, BLOCK_DO * NUM_DO)
    direction = pid_1 // n_groups
    d_group = pid_1 % n_groups
    if direction == 0:
        x_ptr = X0
        y_ptr = Y0
        dx_ptr = DX0
        lse_row_ptr = LSE_ROW0
        lse_col_ptr = LSE_COL0
        stride_x = stride_x0
        stride_y = stride_y0
    else:
        x_ptr = X1
        y_ptr = Y1
        dx_ptr = DX1
        lse_row_ptr = LSE_ROW1
        lse_col_ptr = LSE_COL1
        stride_x = stride_x1
        stride_y = stride_y1

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_mask = rows < N_OUTER
    scale = tl.load(SCALE).to(tl.float32)
    qk_scale = scale * LOG2E
    coef = tl.load(GRAD_C).to(tl.float32) * COEF
    if USE_ROW_LSE:
        lse_row = tl.load(lse_row_ptr + rows, mask=row_mask, other=0.0) * LOG2E
    first_slice = d_group * NUM_DO

    inner_begin = pid_s * INNER_PER_SPLIT  # int32 loop bounds; offsets below are int64
    inner_end = tl.minimum(inner_begin + INNER_PER_SPLIT, N_INNER)
    # One accumulator per feature slice of the group: the logit tile is computed once for all of them.
    offs_do = tl.arange(0, BLOCK_DO)
    dcols0 = first_slice.to(tl.int64) * BLOCK_DO + offs_do  # [BLOCK_DO]
    dmask0 = dcols0 < D
    acc0 = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    if NUM_DO > 1:
        dcols1 = dcols0 + BLOCK_DO
        dmask1 = dcols1 < D
        acc1 = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    if NUM_DO > 2:
        dcols2 = dcols0 + 2 * BLOCK_DO
        dmask2 = dcols2 < D
        acc2 = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    if NUM_DO > 3:
        dcols3 = dcols0 + 3 * BLOCK_DO
        dmask3 = dcols3 < D
        acc3 = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for start_n in range(inner_begin, inner_end, BLOCK_N):
        cols = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
        col_mask = cols < inner_end
        x = _dot_tile(
            x_ptr, rows, row_mask, stride_x, y_ptr, cols, col_mask, stride_y, D,
            DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        z = x * qk_scale  # [BLOCK_M, BLOCK_N], base 2
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if USE_ROW_LSE:
            g += tl.exp2(z - lse_row[:, None])
        if USE_COL_LSE:
            lse_col = tl.load(lse_col_ptr + cols, mask=col_mask, other=0.0) * LOG2E
            g += tl.exp2(z - lse_col[None, :])
        g = tl.where((rows[:, None] - cols[None, :]) == DIAG_SHIFT, g - DIAG_WEIGHT, g)
        g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)  # padding rows could overflow exp2
        # G is O(1) here; the upstream factor g/(2b) is applied after the dots so that fp16 tiles cannot underflow.
        if DOT_FP32:
            g = g.to(tl.float32)
        else:
            g = g.to(y_ptr.dtype.element_ty)
        acc0 = _slice_dot(acc0, g, y_ptr, cols, col_mask, stride_y, dcols0, dmask0, DOT_FP32, INPUT_PRECISION)
        if NUM_DO > 1:
            acc1 = _slice_dot(acc1, g, y_ptr, cols, col_mask, stride_y, dcols1, dmask1, DOT_FP32, INPUT_PRECISION)
        if NUM_DO > 2:
            acc2 = _slice_dot(acc2, g, y_ptr, cols, col_mask, stride_y, dcols2, dmask2, DOT_FP32, INPUT_PRECISION)
        if NUM_DO > 3:
            acc3 = _slice_dot(acc3, g, y_ptr, cols, col_mask, stride_y, dcols3, dmask3, DOT_FP32, INPUT_PRECISION)

    # Triton has no lists of tensors: the group's accumulators are spelled out, each under its static condition.
    ds_row = DSCALE + (direction * n_splits + pid_s).to(tl.int64) * N_DS_SLOTS * N_OUTER
    _store_slice(acc0 * coef, first_slice, x_ptr, stride_x, dx_ptr, rows, row_mask, D, N_OUTER, ds_row, scale, pid_s,
                 STORE_DSCALE, STORE_MODE, BLOCK_DO, True)  # fmt: skip
    if NUM_DO > 1:
        _store_slice(acc1 * coef, first_slice + 1, x_ptr, stride_x, dx_ptr, rows, row_mask, D, N_OUTER, ds_row, scale,
                     pid_s, STORE_DSCALE, STORE_MODE, BLOCK_DO, False)  # fmt: skip
    if NUM_DO > 2:
        _store_slice(acc2 * coef, first_slice + 2, x_ptr, stride_x, dx_ptr, rows, row_mask, D, N_OUTER, ds_row, scale,
                     pid_s, STORE_DSCALE, STORE_MODE, BLOCK_DO, False)  # fmt: skip
    if NUM_DO > 3:
        _store_slice(acc3 * coef, first_slice + 3, x_ptr, stride_x, dx_ptr, rows, row_mask, D, N_OUTER, ds_row, scale,
                     pid_s, STORE_DSCALE, STORE_MODE, BLOCK_DO, False)  # fmt: skip

    if HAS_DISTILL:
        if (direction == 0) & (d_group == 0) & (pid_s == 0):
            dcoef = tl.load(GRAD_D).to(tl.float32) * DISTILL_COEF
            offs_e = tl.arange(0, BLOCK_E)
            for e0 in range(0, E, BLOCK_E):
                es = e0 + offs_e
                mask = row_mask[:, None] & (es < E)[None, :]
                p = tl.load(P + rows[:, None] * stride_p + es[None, :], mask=mask, other=0.0).to(tl.float32)
                t = tl.load(TCH + rows[:, None] * stride_t + es[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(DP + rows[:, None] * E + es[None, :], ((p - t) * dcoef).to(DP.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Host side


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(up-cast tiles to fp32, fp32 dot precision). fp32 inputs use 3-pass TF32 dots (fp32-level accuracy on tensor
    cores, where plain fp32 dots would run on the FMA units); the interpreter cannot multiply bf16 tiles, so it
    up-casts them."""
    return (INTERPRET and dtype == torch.bfloat16), "tf32x3"


def _num_splits(programs: int, n_inner: int, device: torch.device) -> int:
    """How many programs share one row block's inner range, for a launch of `programs` programs per split: enough
    to fill the GPU twice over (each launch counts its own grid: the forward's is rows x 2 directions, the
    backward's rows x 2 directions x feature slices)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_SPLITS, (2 * sms) // max(programs, 1), triton.cdiv(n_inner, 512)))


def gemm_equivalents(width: int, block_do: int = 256, num_do: int = 3) -> dict[str, int]:
    """The kernels' work in GEMM-equivalents (one rows x columns x D product each): the forward computes the
    logits once per direction (2); per direction, the backward recomputes the whole logit tile once for each group
    of num_do x block_do features (one program's accumulators) and forms the gradient once: 2 (groups + 1).
    At D = 768: 6 in all with the whole width in one group (256 x 3, the sm_90 configuration), 8 with 384-wide
    groups, 10 with one 256-wide slice a program; the minimal algorithm (both directions' log-sum-exps from one
    tile, one recomputation in the backward) does 1 + 3."""
    backward = 2 * (triton.cdiv(width, block_do * num_do) + 1)
    return {"forward": 2, "backward": backward, "total": 2 + backward, "minimal": 4}


def _split_range(n_inner: int, splits: int) -> tuple[int, int]:
    """(inner rows per split, a multiple of 128 so that every tile size divides it; number of non-empty splits)."""
    per = triton.cdiv(triton.cdiv(n_inner, splits), 128) * 128
    return per, triton.cdiv(n_inner, per)


def contrastive_distill_forward(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    image_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    offset: int = 0,
    projected: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Shapes: image, text [b, D]; image_all, text_all [N, D] (local-loss form) or None (N = b, single process);
    logit_scale one element; projected, teacher [b, E].

    Returns: (contrastive loss [] fp32, distillation loss [] fp32 (0 when absent), log-sum-exps [2, b] fp32).
    """
    image, text = _rowmajor(image), _rowmajor(text)
    b, width = image.shape
    cols0 = text if text_all is None else _rowmajor(text_all)
    cols1 = image if image_all is None else _rowmajor(image_all)
    n_cols = cols0.shape[0]
    has_distill = projected is not None
    if has_distill:
        projected, teacher = _rowmajor(projected), _rowmajor(teacher)
    splits, cols_per_split = 1, n_cols
    wanted = _num_splits(triton.cdiv(b, 128) * 2, n_cols, image.device)  # BLOCK_M 128: most forward configs
    if wanted > 1:
        cols_per_split, splits = _split_range(n_cols, wanted)
    lse_part = torch.empty((2, splits, b), device=image.device, dtype=torch.float32)
    diag = torch.empty((2, b), device=image.device, dtype=torch.float32)
    sqerr = torch.empty((b,) if has_distill else (1,), device=image.device, dtype=torch.float32)
    dot_fp32, precision = _dot_options(image.dtype)
    p = projected if has_distill else image
    t = teacher if has_distill else image
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), 2, splits)
    _contrastive_distill_fwd_kernel[grid](
        image, cols0, text, cols1, logit_scale, lse_part, diag, p, t, sqerr,
        b, n_cols, width, p.shape[1], offset, cols_per_split,
        image.stride(0), cols0.stride(0), text.stride(0), cols1.stride(0), p.stride(0), t.stride(0),
        HAS_DISTILL=has_distill, DOT_FP32=dot_fp32, INPUT_PRECISION=precision, BLOCK_E=BLOCK_E,
    )  # fmt: skip
    lse = torch.logsumexp(lse_part * _LN2, dim=1)  # [2, b], natural log
    loss = (lse - diag).sum() / (2 * b)
    distill = sqerr.sum() / (b * p.shape[1]) if has_distill else loss.new_zeros(())
    return loss, distill, lse


def _launch_bwd(
    outer: tuple[torch.Tensor, torch.Tensor],
    inner: tuple[torch.Tensor, torch.Tensor],
    lse_row: tuple[torch.Tensor, torch.Tensor] | None,
    lse_col: tuple[torch.Tensor, torch.Tensor] | None,
    logit_scale: torch.Tensor,
    grad_c: torch.Tensor,
    grad_d: torch.Tensor,
    coef: float,
    diag_shift: int,
    store_dscale: bool,
    deterministic: bool,
    distill: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backward launch over both directions: returns (∂outer0, ∂outer1, ∂s partials [2, ...])."""
    x0, x1 = outer
    y0, y1 = inner
    n_outer, width = x0.shape
    n_inner = y0.shape[0]
    device, dtype = x0.device, x0.dtype
    splits, per_split = 1, n_inner
    # programs per split for the widest groups (the fewest programs): 32 rows x 768 features
    wanted = _num_splits(triton.cdiv(n_outer, 32) * 2 * triton.cdiv(width, 768), n_inner, device)
    if wanted > 1:
        per_split, splits = _split_range(n_inner, wanted)
    if splits == 1:
        store_mode = 0
        dx0, dx1 = torch.empty_like(x0), torch.empty_like(x1)
    elif deterministic:
        store_mode = 1
        dx0 = torch.empty((splits, n_outer, width), device=device, dtype=torch.float32)
        dx1 = torch.empty((splits, n_outer, width), device=device, dtype=torch.float32)
    else:
        store_mode = 2
        dx0 = torch.zeros((n_outer, width), device=device, dtype=torch.float32)
        dx1 = torch.zeros((n_outer, width), device=device, dtype=torch.float32)
    min_do = min(c.kwargs["BLOCK_DO"] for c in _bwd_configs())  # slots for the narrowest width slice
    n_slots = triton.cdiv(width, min_do)
    dscale = torch.zeros((2, splits, n_slots, n_outer) if store_dscale else (1,), device=device, dtype=torch.float32)
    any_lse = (lse_row or lse_col)[0]
    lr0, lr1 = lse_row or (any_lse, any_lse)
    lc0, lc1 = lse_col or (any_lse, any_lse)
    if distill is not None:
        p, t, dp = distill
    else:
        p = t = dp = x0
    dot_fp32, precision = _dot_options(dtype)
    n_weights = (lse_row is not None) + (lse_col is not None)
    grid = lambda meta: (
        triton.cdiv(n_outer, meta["BLOCK_M"]),
        2 * triton.cdiv(width, meta["BLOCK_DO"] * meta["NUM_DO"]),
        splits,
    )
    _contrastive_distill_bwd_kernel[grid](
        x0, y0, x1, y1, dx0, dx1, logit_scale, grad_c, grad_d, lr0, lr1, lc0, lc1, dscale, p, t, dp,
        n_outer, n_inner, width, p.shape[1], diag_shift, per_split, n_slots,
        x0.stride(0), y0.stride(0), x1.stride(0), y1.stride(0), p.stride(0), t.stride(0),
        coef, float(n_weights), 2.0 / (p.shape[0] * p.shape[1]),
        USE_ROW_LSE=lse_row is not None, USE_COL_LSE=lse_col is not None, STORE_DSCALE=store_dscale,
        HAS_DISTILL=distill is not None, STORE_MODE=store_mode, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        BLOCK_E=BLOCK_E,
    )  # fmt: skip
    if store_mode == 1:
        dx0, dx1 = dx0.sum(0), dx1.sum(0)  # fixed-order reduction over the splits
    return dx0.to(dtype), dx1.to(dtype), dscale


def contrastive_distill_backward(
    grad_contrastive: torch.Tensor,
    grad_distill: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    lse: torch.Tensor,
    image_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    offset: int = 0,
    projected: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel(s).

    Returns: (∂image [b, D], ∂text [b, D], ∂image_all [N, D] or None, ∂text_all [N, D] or None,
    ∂logit_scale (shape of logit_scale), ∂projected [b, E] or None). The gathered-feature gradients are those of
    this rank's loss only; the all-gather's backward sums them over ranks.
    """
    image, text = _rowmajor(image), _rowmajor(text)
    b = image.shape[0]
    grad_c = grad_contrastive.reshape(1).to(torch.float32)
    grad_d = grad_distill.reshape(1).to(torch.float32)
    distill = None
    if projected is not None:
        projected, teacher = _rowmajor(projected), _rowmajor(teacher)
        distill = (projected, teacher, torch.empty_like(projected))
    coef = 0.5 / b
    lse0, lse1 = lse[0], lse[1]
    if image_all is None:
        d_image, d_text, ds = _launch_bwd(
            (image, text), (text, image), (lse0, lse1), (lse1, lse0), logit_scale, grad_c, grad_d, coef, 0,
            True, deterministic, distill,
        )  # fmt: skip
        d_scale = ds[0].sum()
        d_image_all = d_text_all = None
    else:
        image_all, text_all = _rowmajor(image_all), _rowmajor(text_all)
        d_image, d_text, ds = _launch_bwd(
            (image, text), (text_all, image_all), (lse0, lse1), None, logit_scale, grad_c, grad_d, coef, -offset,
            True, deterministic, distill,
        )  # fmt: skip
        d_scale = ds.sum()
        d_text_all, d_image_all, _ = _launch_bwd(
            (text_all, image_all), (image, text), None, (lse0, lse1), logit_scale, grad_c, grad_d, coef, offset,
            False, deterministic,
        )  # fmt: skip
    d_projected = distill[2] if distill is not None else None
    d_scale = d_scale.reshape(logit_scale.shape).to(logit_scale.dtype)
    return d_image, d_text, d_image_all, d_text_all, d_scale, d_projected


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (opaque to torch.compile, with fake implementations for tracing)


def _none_if_empty(t: torch.Tensor) -> torch.Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


@torch.library.custom_op("kclip::contrastive_distill_fwd", mutates_args=())
def _fwd_op(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    image_all: torch.Tensor | None,
    text_all: torch.Tensor | None,
    offset: int,
    projected: torch.Tensor | None,
    teacher: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return contrastive_distill_forward(image, text, logit_scale, image_all, text_all, offset, projected, teacher)


@_fwd_op.register_fake
def _(image, text, logit_scale, image_all, text_all, offset, projected, teacher):
    scalar = image.new_empty((), dtype=torch.float32)
    return scalar, scalar.clone(), image.new_empty((2, image.shape[0]), dtype=torch.float32)


@torch.library.custom_op("kclip::contrastive_distill_bwd", mutates_args=())
def _bwd_op(
    grad_contrastive: torch.Tensor,
    grad_distill: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    lse: torch.Tensor,
    image_all: torch.Tensor | None,
    text_all: torch.Tensor | None,
    offset: int,
    projected: torch.Tensor | None,
    teacher: torch.Tensor | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = contrastive_distill_backward(
        grad_contrastive, grad_distill, image, text, logit_scale, lse, image_all, text_all, offset, projected,
        teacher, deterministic,
    )  # fmt: skip
    # Custom ops return tensors only: an absent gradient travels as an empty 1-d tensor.
    return tuple(g if g is not None else image.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(grad_contrastive, grad_distill, image, text, logit_scale, lse, image_all, text_all, offset, projected, teacher,
      deterministic):  # fmt: skip
    return (
        torch.empty_like(image),
        torch.empty_like(text),
        torch.empty_like(image_all) if image_all is not None else image.new_empty(0),
        torch.empty_like(text_all) if text_all is not None else image.new_empty(0),
        torch.empty_like(logit_scale),
        torch.empty_like(projected) if projected is not None else image.new_empty(0),
    )


class ContrastiveDistillFunction(torch.autograd.Function):
    """Autograd glue: the forward saves the features and the [2, b] log-sum-exps, the backward recomputes."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, image_all, text_all, offset, projected, teacher, deterministic):
        loss, distill, lse = torch.ops.kclip.contrastive_distill_fwd(
            image, text, logit_scale, image_all, text_all, offset, projected, teacher
        )
        ctx.save_for_backward(image, text, logit_scale, lse, image_all, text_all, projected, teacher)
        ctx.offset = offset
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return loss, distill

    @staticmethod
    def backward(ctx, grad_loss, grad_distill):
        image, text, logit_scale, lse, image_all, text_all, projected, teacher = ctx.saved_tensors
        grads = torch.ops.kclip.contrastive_distill_bwd(
            grad_loss, grad_distill, image, text, logit_scale, lse, image_all, text_all, ctx.offset, projected,
            teacher, ctx.deterministic,
        )  # fmt: skip
        d_image, d_text, d_image_all, d_text_all, d_scale, d_projected = (_none_if_empty(g) for g in grads)
        return d_image, d_text, d_scale, d_image_all, d_text_all, None, d_projected, None, None


def contrastive_distill(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    projected: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    *,
    image_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    offset: int = 0,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused contrastive + distillation loss (kernels only; kclip.losses validates and dispatches).

    Args:
        image, text: this process's features, [b, D], same dtype (fp32, fp16, bf16).
        logit_scale: the (already exponentiated) scale, one element.
        projected, teacher: [b, E] distillation pair, or both None. No gradient flows to ``teacher``.
        image_all, text_all: gathered features [N, D] of the local-loss form, or None for a single process.
        offset: index of this process's first row in the gathered features (rank · b).
        deterministic: never use atomics; split reductions go through per-split buffers summed in order.

    Returns: (contrastive loss [] fp32, distillation loss [] fp32, 0 when absent).
    """
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=image.device)
    return ContrastiveDistillFunction.apply(
        image, text, logit_scale, image_all, text_all, offset, projected, teacher, deterministic
    )


__all__ = ["contrastive_distill", "contrastive_distill_forward", "contrastive_distill_backward"]
