"""Benchmark of kclip's fused losses: contrastive + distillation, and soft-label cross-entropy.

Providers (baselines are imported, never re-written):
  contrastive + distillation: kclip (Triton), reference (kclip.losses.reference), open_clip (ClipLoss + F.mse_loss),
  chunked-cublas (row blocks of torch.matmul with checkpointed log-sum-exps, no B×B:
  kclip.losses.reference.chunked_contrastive_distill_loss), inf-cl (the `inf-cl` package, one call per direction)
  where it imports;
  soft-label cross-entropy: kclip (Triton) against reference (eager PyTorch).
Modes: forward, backward (the backward alone, the forward's graph retained), full (forward + backward).
Each row: median / p20 / p80 time in ms and peak memory beyond the inputs (MiB). Contrastive rows also carry the
floor, 4 GEMM-equivalents of 2·B²·D FLOPs (the minimal algorithm: 1 forward, 3 backward) at the bf16 matmul rate
measured here, and time over floor; kclip's rows also carry the GEMM-equivalents its kernels do
(kernels.contrastive_distill.gemm_equivalents: 6 to 10 at D = 768, by the backward configuration autotuned).

    python bench/bench_losses.py --device cuda --out results.json [--budget-s 100]
    python bench/bench_losses.py --smoke          # a CPU check under the Triton interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_common_args,
    format_table,
    output_path,
    peak_memory,
    refuse_device,
    resolve_device,
    setup_logging,
    time_cpu,
    time_gpu,
    write_rows,
)

# The shared shape lists: (B, D) for the contrastive loss (E is the teacher width), (B, K) for the concept loss.
CONTRASTIVE_SHAPES = [(b, 768) for b in (1024, 4096, 16384, 32768, 65536, 131072, 262144)]
CONTRASTIVE_SHAPES += [(32768, 512), (32768, 1024)]
TEACHER_WIDTH = 4096
SOFT_CE_SHAPES = [(32768, 100), (32768, 1000), (32768, 16384)]
SMOKE_CONTRASTIVE = [(64, 32)]
SMOKE_SOFT_CE = [(64, 100)]
MODES = ("forward", "backward", "full")


def _bf16_matmul_tflops(torch, device: str) -> float:
    """The bf16 matmul rate measured here (TFLOP/s), the unit of the floor."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_gpu(lambda: a @ b)["median"]
    return 2 * n**3 / (ms * 1e-3) / 1e12


# Rows per block of the chunked-cuBLAS peer: [4096, B] fp32 logits are 512 MiB at B = 32k.
CHUNK_ROWS = 4096


def _contrastive_providers(torch, F):
    """name -> (function of (image, text, scale, projected, teacher) returning the total loss) or a skip reason."""
    from kclip.losses import contrastive_distill_loss, reference

    def kclip_fn(i, t, s, p, te):
        out = contrastive_distill_loss(i, t, s, p, te, backend="triton")
        return out["contrastive_loss"] + out["distill_loss"]

    def reference_fn(i, t, s, p, te):
        out = reference.contrastive_distill_loss(i, t, s, p, te)
        return out["contrastive_loss"] + out["distill_loss"]

    def chunked_fn(i, t, s, p, te):
        out = reference.chunked_contrastive_distill_loss(i, t, s, p, te, block=CHUNK_ROWS)
        return out["contrastive_loss"] + out["distill_loss"]

    providers = {"kclip": kclip_fn, "reference": reference_fn, "chunked-cublas": chunked_fn}
    try:
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        providers["open_clip"] = lambda i, t, s, p, te: clip_loss(i, t, s) + F.mse_loss(p, te)
    except ImportError as exc:
        providers["open_clip"] = f"open_clip is not importable: {exc}"
    try:
        from inf_cl import cal_inf_loss

        def inf_cl_fn(i, t, s, p, te):
            labels = torch.arange(i.shape[0], device=i.device)
            # Inf-CL computes one direction per call: image->text and text->image, averaged as in ClipLoss.
            loss = (cal_inf_loss(i, t, scale=s, labels=labels) + cal_inf_loss(t, i, scale=s, labels=labels)) / 2
            return loss.mean() + F.mse_loss(p, te)

        providers["inf-cl"] = inf_cl_fn
    except ImportError as exc:
        providers["inf-cl"] = f"inf-cl is not installed here ({exc})"
    return providers


def _soft_ce_providers():
    from kclip.losses import reference, soft_label_cross_entropy

    return {
        "kclip": lambda z, s: soft_label_cross_entropy(z, s, backend="triton"),
        "reference": reference.soft_label_cross_entropy,
    }


def _measure(torch, kind, make_inputs, loss_fn, mode, smoke):
    """(timing dict, peak memory dict) of one mode; inputs are rebuilt outside the measured region."""
    leaves, frozen = make_inputs()
    timer = (lambda fn: time_gpu(fn)) if kind == "cuda" else (lambda fn: time_cpu(fn, repeat=2 if smoke else 5))

    def forward():
        return loss_fn(*leaves, *frozen)

    def full():
        for t in leaves:
            t.grad = None
        forward().backward()

    # One untimed full step first: Triton's autotuning (its trial launches and their buffers) and first-call
    # allocations happen outside the peak-memory measurement and the timing.
    full()
    for t in leaves:
        t.grad = None
    if mode == "forward":
        with torch.no_grad():
            with peak_memory(kind) as mem:
                forward()
            timing = timer(forward)
    elif mode == "full":
        with peak_memory(kind) as mem:
            full()
        timing = timer(full)
    else:
        loss = forward()

        def backward():
            for t in leaves:
                t.grad = None
            loss.backward(retain_graph=True)

        with peak_memory(kind) as mem:
            backward()
        timing = timer(backward)
        del loss
    return timing, mem


def _kclip_gemms(d: int) -> dict[str, int]:
    """GEMM-equivalents of kclip's kernels per mode, with the backward's feature group as autotuned (one 256-wide
    slice if not yet)."""
    from kclip.kernels import contrastive_distill as cd

    best = getattr(cd._contrastive_distill_bwd_kernel, "best_config", None)
    kw = best.kwargs if best is not None else {"BLOCK_DO": 256, "NUM_DO": 1}
    work = cd.gemm_equivalents(d, kw["BLOCK_DO"], kw.get("NUM_DO", 1))
    return {"forward": work["forward"], "backward": work["backward"], "full": work["total"]}


def _fits(torch, kind, provider, b, d):
    """Why a provider cannot run a shape here (the B×B logits of the eager providers), or ""."""
    if kind != "cuda" or provider in ("kclip", "inf-cl", "chunked-cublas"):
        return ""
    need = 4 * b * b * 4  # logits, their softmax and gradients, fp32 in the cross-entropy
    have = torch.cuda.get_device_properties(0).total_memory
    return (
        f"needs ~{need / 2**30:.0f} GiB for the B×B logits, the GPU has {have / 2**30:.0f}" if need > 0.8 * have else ""
    )


def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting rows after this many seconds")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    setup_logging()
    kind, why_not = resolve_device(args.device)
    if kind == "cpu":
        # Triton reads TRITON_INTERPRET when the kernels are defined: set it before kclip.kernels is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F

    out_path = output_path(args, "bench_losses", kind)
    meta = {"device_kind": kind, "smoke": args.smoke, "modes": args.modes, "skipped": {}, "budget_s": args.budget_s}
    if why_not:
        return refuse_device(out_path, meta, args.device, why_not)
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    contrastive_shapes = SMOKE_CONTRASTIVE if args.smoke else CONTRASTIVE_SHAPES
    soft_shapes = SMOKE_SOFT_CE if args.smoke else SOFT_CE_SHAPES
    teacher_width = 64 if args.smoke else TEACHER_WIDTH
    rate = _bf16_matmul_tflops(torch, "cuda") if kind == "cuda" else None
    meta |= {"dtype": str(dtype), "bf16_matmul_tflops": rate, "teacher_width": teacher_width}
    start = time.perf_counter()
    rows = []

    def over_budget():
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    providers = _contrastive_providers(torch, F)
    for name, p in providers.items():
        if isinstance(p, str):
            meta["skipped"][name] = p
    gen = torch.Generator(device=kind).manual_seed(0)
    for b, d in contrastive_shapes:

        def make_inputs(b=b, d=d):
            image = F.normalize(torch.randn(b, d, device=kind, generator=gen), dim=-1).to(dtype).requires_grad_()
            text = F.normalize(torch.randn(b, d, device=kind, generator=gen), dim=-1).to(dtype).requires_grad_()
            scale = torch.tensor(100.0, device=kind, requires_grad=True)
            projected = torch.randn(b, teacher_width, device=kind, dtype=dtype, generator=gen).requires_grad_()
            teacher = torch.randn(b, teacher_width, device=kind, dtype=dtype, generator=gen)
            return [image, text, scale, projected], [teacher]

        floor_ms = 4 * 2 * b * b * d / (rate * 1e12) * 1e3 if rate else None
        for name, fn in providers.items():
            if isinstance(fn, str):
                continue
            for mode in args.modes:
                key = f"contrastive {name} {mode} B={b} D={d}"
                why = "time budget spent" if over_budget() else _fits(torch, kind, name, b, d)
                if why:
                    meta["skipped"][key] = why
                    continue
                try:
                    timing, mem = _measure(torch, kind, make_inputs, fn, mode, args.smoke)
                except torch.cuda.OutOfMemoryError as exc:
                    meta["skipped"][key] = f"out of memory: {str(exc).splitlines()[0]}"
                    torch.cuda.empty_cache()
                    continue
                row = {
                    "op": "contrastive_distill", "provider": name, "mode": mode, "shape": f"{b}x{d}x{teacher_width}",
                    "B": b, "D": d, "E": teacher_width, "dtype": str(dtype).removeprefix("torch."),
                    "median_ms": timing["median"], "p20_ms": timing["p20"], "p80_ms": timing["p80"], **mem,
                }  # fmt: skip
                if floor_ms is not None and mode == "full":
                    row |= {"floor_ms": floor_ms, "over_floor": timing["median"] / floor_ms}
                if name == "kclip":
                    row["gemm_equivalents"] = _kclip_gemms(d)[mode]
                rows.append(row)

    for b, k in soft_shapes:

        def make_soft(b=b, k=k):
            logits = torch.randn(b, k, device=kind, generator=gen).to(dtype).requires_grad_()
            targets = torch.softmax(torch.randn(b, k, device=kind, generator=gen), -1)
            return [logits], [targets]

        for name, fn in _soft_ce_providers().items():
            for mode in args.modes:
                key = f"soft_label_ce {name} {mode} B={b} K={k}"
                if over_budget():
                    meta["skipped"][key] = "time budget spent"
                    continue
                timing, mem = _measure(torch, kind, make_soft, fn, mode, args.smoke)
                rows.append({"op": "soft_label_ce", "provider": name, "mode": mode, "shape": f"{b}x{k}", "B": b, "K": k,
                             "dtype": str(dtype).removeprefix("torch."), "median_ms": timing["median"],
                             "p20_ms": timing["p20"], "p80_ms": timing["p80"], **mem})  # fmt: skip

    path = write_rows(out_path, rows, meta)
    columns = [
        ("op", "op", ""), ("provider", "provider", ""), ("mode", "mode", ""), ("shape", "shape", ""),
        ("median ms", "median_ms", ".3f"), ("p20", "p20_ms", ".3f"), ("p80", "p80_ms", ".3f"),
        ("peak MiB", "peak_mem_mib", ".1f"), ("floor ms", "floor_ms", ".3f"), ("x floor", "over_floor", ".2f"),
    ]  # fmt: skip
    print(format_table(rows, columns))
    if rate:
        print(f"floor: 4 GEMM-equivalents of 2·B²·D FLOPs at the measured bf16 matmul rate, {rate:.0f} TFLOP/s")
    for key, why in meta["skipped"].items():
        print(f"skipped {key}: {why}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
