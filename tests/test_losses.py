"""kclip.losses: the Triton kernels (under the interpreter on the CPU) against the float64 references.

Tolerances: fp32 against float64 directly; fp16 and bf16 at most twice the error of the same computation done by
PyTorch in that dtype (plus a few ulps of the value's scale for cases where PyTorch happens to be exact).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from kclip.losses import contrastive_distill_loss, reference, soft_label_cross_entropy

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS = {torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}


def _features(b, d, dtype, seed=0, device=DEVICE, normalize=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if normalize:
        x = F.normalize(x, dim=-1)
    return x.to(device=device, dtype=dtype)


def _contrastive_case(b, d, dtype, scale, e=48, seed=0, device=DEVICE):
    image = _features(b, d, dtype, seed, device)
    text = _features(b, d, dtype, seed + 1, device)
    projected = _features(b, e, dtype, seed + 2, device, normalize=False)
    teacher = _features(b, e, torch.float32, seed + 3, device, normalize=False)
    logit_scale = torch.tensor(float(scale), device=device)
    return image, text, logit_scale, projected, teacher


def _run(inputs, backend, weights=(0.7, 1.3), **kwargs):
    """Loss value and every gradient for a weighted sum of the two terms (so grad_output ≠ 1)."""
    image, text, scale, projected, teacher = (t.detach().clone().requires_grad_(t is not None and i != 4)
                                              for i, t in enumerate(inputs))  # fmt: skip
    out = contrastive_distill_loss(image, text, scale, projected, teacher, backend=backend, **kwargs)
    total = weights[0] * out["contrastive_loss"] + weights[1] * out["distill_loss"]
    grads = torch.autograd.grad(total, [image, text, scale, projected])
    return [out["contrastive_loss"].detach(), out["distill_loss"].detach(), *grads]


def _reference64(inputs, weights=(0.7, 1.3)):
    return _run([t.double() for t in inputs], "reference", weights)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [16, 64, 100])
@pytest.mark.parametrize("b", [1, 3, 37, 257])
def test_contrastive_distill_matches_float64(b, d, dtype, scale):
    inputs = _contrastive_case(b, d, dtype, scale, seed=b + d)
    got = _run(inputs, "triton")
    want = _reference64(inputs)
    names = ["contrastive_loss", "distill_loss", "d_image", "d_text", "d_logit_scale", "d_projected"]
    if dtype == torch.float32:
        for name, g, w in zip(names, got, want, strict=True):
            tol = 2e-5 * (1 + w.abs().max().item())
            assert _max_err(g, w) <= tol, f"{name}: {_max_err(g, w)} > {tol}"
    else:
        torch_low = _run(inputs, "reference")  # the same computation by PyTorch in the low precision
        for name, g, w, t in zip(names, got, want, torch_low, strict=True):
            floor = 4 * EPS[dtype] * (1 + w.abs().max().item())
            assert _max_err(g, w) <= 2 * _max_err(t, w) + floor, (
                f"{name}: kernel {_max_err(g, w)}, PyTorch {dtype} {_max_err(t, w)}"
            )


def test_bf16_upcast_under_interpreter_within_twice_pytorch():
    inputs = _contrastive_case(37, 64, torch.bfloat16, 100.0, seed=5)
    got, want, torch_bf16 = _run(inputs, "triton"), _reference64(inputs), _run(inputs, "reference")
    for g, w, t in zip(got, want, torch_bf16, strict=True):
        assert _max_err(g, w) <= 2 * _max_err(t, w) + 4 * EPS[torch.bfloat16] * (1 + w.abs().max().item())


@pytest.mark.parametrize("block", [1, 8, 37, 100])
def test_chunked_cublas_peer_matches_the_reference(block):
    """The benchmark's chunked peer is the same loss, value and every gradient, whatever its block size."""
    inputs = [t.double() for t in _contrastive_case(37, 16, torch.float32, 7.0, e=8, seed=9, device="cpu")]

    def run(fn, **kw):
        leaves = [t.clone().requires_grad_(i != 4) for i, t in enumerate(inputs)]
        out = fn(*leaves, **kw)
        total = 0.7 * out["contrastive_loss"] + 1.3 * out["distill_loss"]
        return [total.detach(), *torch.autograd.grad(total, leaves[:4])]

    for g, w in zip(run(reference.chunked_contrastive_distill_loss, block=block),
                    run(reference.contrastive_distill_loss), strict=True):  # fmt: skip
        assert _max_err(g, w) <= 1e-12 * (1 + w.abs().max().item())


def test_agrees_with_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text, scale, _, _ = _contrastive_case(37, 64, torch.float32, 14.3, seed=3)
    got_inputs = [t.clone().requires_grad_() for t in (image, text, scale)]
    ours = contrastive_distill_loss(*got_inputs, backend="triton")["contrastive_loss"]
    ours_grads = torch.autograd.grad(ours, got_inputs)
    ref_inputs = [t.clone().requires_grad_() for t in (image, text, scale)]
    theirs = open_clip_loss.ClipLoss()(*ref_inputs)
    theirs_grads = torch.autograd.grad(theirs, ref_inputs)
    assert _max_err(ours, theirs) < 1e-5
    for g, t in zip(ours_grads, theirs_grads, strict=True):
        assert _max_err(g, t) < 1e-5 * (1 + t.abs().max().item())


def test_stable_with_large_logits():
    # Unnormalised features at scale 100: logits in the thousands, far past exp's fp32 range.
    image, text = (
        _features(37, 64, torch.float32, 1, normalize=False),
        _features(37, 64, torch.float32, 2, normalize=False),
    )
    inputs = (image * 3, text * 3, torch.tensor(100.0), None, None)
    ours = contrastive_distill_loss(*inputs, backend="triton")["contrastive_loss"]
    want = reference.contrastive_distill_loss(*(t.double() if t is not None else None for t in inputs))
    assert torch.isfinite(ours)
    assert _max_err(ours, want["contrastive_loss"]) < 1e-3 * want["contrastive_loss"].abs().item()


def test_edge_cases_b1_and_all_equal():
    image, text, scale, _, _ = _contrastive_case(1, 16, torch.float32, 100.0)
    out = contrastive_distill_loss(image.requires_grad_(), text, scale, backend="triton")
    assert out["contrastive_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert "distill_loss" not in out
    same = torch.ones(9, 16) / 4
    loss = contrastive_distill_loss(same, same.clone(), torch.tensor(50.0), backend="triton")["contrastive_loss"]
    assert loss.item() == pytest.approx(torch.log(torch.tensor(9.0)).item(), rel=1e-5)


def test_split_inner_range_deterministic_and_atomic(monkeypatch):
    """Several programs per row block (the large-GPU path), with per-split buffers and with atomics."""
    import kclip.kernels.contrastive_distill as cd

    monkeypatch.setattr(cd, "_num_splits", lambda programs, n_inner, device: 3)
    inputs = _contrastive_case(300, 64, torch.float32, 30.0, seed=11)
    want = _reference64(inputs)
    first = _run(inputs, "triton", deterministic=True)
    again = _run(inputs, "triton", deterministic=True)
    atomic = _run(inputs, "triton", deterministic=False)
    for f, a, t, w in zip(first, again, atomic, want, strict=True):
        assert torch.equal(f, a), "deterministic mode is not bitwise reproducible"
        for got in (f, t):
            assert _max_err(got, w) <= 2e-5 * (1 + w.abs().max().item())


def _local_loss_in_one_process(world, b, d, dtype, scale, device):
    """The local-loss form driven in one process: each of `world` emulated ranks runs the kernel on its rows
    against the whole batch as the gathered features, at offset rank·b; the sum of the rank losses backpropagates
    into the full-batch leaves as the all-gather's backward would (summed over ranks). Returns (mean rank loss,
    gradients) and the float64 reference of one process holding the batch, its gradients times `world`."""
    from kclip.kernels.contrastive_distill import contrastive_distill

    image, text, logit_scale, _, _ = _contrastive_case(world * b, d, dtype, scale, seed=world + b, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, logit_scale)]
    total = 0.0
    for r in range(world):
        rows = slice(r * b, (r + 1) * b)
        loss, _ = contrastive_distill(leaves[0][rows], leaves[1][rows], leaves[2], image_all=leaves[0],
                                      text_all=leaves[1], offset=r * b)  # fmt: skip
        total = total + loss
    got = [total.detach() / world, *torch.autograd.grad(total, leaves)]
    ref = [t.detach().double().requires_grad_() for t in (image, text, logit_scale)]
    single = reference.contrastive_distill_loss(*ref)["contrastive_loss"]
    want = [single.detach(), *torch.autograd.grad(world * single, ref)]
    return got, want


def test_local_loss_form_in_one_process_under_the_interpreter():
    got, want = _local_loss_in_one_process(3, 7, 32, torch.float32, 20.0, DEVICE)
    for g, w in zip(got, want, strict=True):
        assert _max_err(g, w) <= 1e-5 * (1 + w.abs().max().item())


def test_work_count_and_split_counts_per_launch(monkeypatch):
    """The kernels' GEMM-equivalents as the docstring counts them, and a local-loss forward (2k rows against 32k
    gathered columns) that fills a 132-SM GPU: its split count comes from its own grid, not the backward's."""
    import types

    import kclip.kernels.contrastive_distill as cd

    assert cd.gemm_equivalents(768) == {"forward": 2, "backward": 4, "total": 6, "minimal": 4}
    assert cd.gemm_equivalents(768, 128, 3)["total"] == 8
    assert cd.gemm_equivalents(768, 256, 1)["total"] == 10
    assert cd.gemm_equivalents(512, 128, 1)["total"] == 12
    # every backward configuration's group and the count it gives at D = 768
    groups = {c.kwargs["BLOCK_DO"] * c.kwargs["NUM_DO"] for c in cd.BWD_CONFIGS_16 + cd.BWD_CONFIGS_16_SM90}
    assert 768 in groups and all(1 <= c.kwargs["NUM_DO"] <= 4 for c in cd.BWD_CONFIGS_16 + cd.BWD_CONFIGS_32)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))  # fmt: skip
    fwd_programs = triton.cdiv(2048, 128) * 2
    splits = cd._num_splits(fwd_programs, 32768, torch.device("cuda"))
    assert fwd_programs * splits >= 132 and splits <= cd.MAX_SPLITS
    assert cd._num_splits(fwd_programs, 32768, torch.device("cpu")) == 1


def test_launchers_allocate_nothing_of_b_squared():
    b = 257
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append((t.numel(), str(func)))
            return out

    inputs = _contrastive_case(b, 16, torch.float32, 10.0, e=16)
    leaves = [t.clone().requires_grad_() for t in inputs[:4]]
    with Record():
        out = contrastive_distill_loss(*leaves, inputs[4], backend="triton")
        (out["contrastive_loss"] + out["distill_loss"]).backward()
    largest = max(sizes)
    assert largest[0] < b * b // 4, f"{largest[1]} produced {largest[0]} elements (B² = {b * b})"


def test_torch_compile_graph():
    inputs = _contrastive_case(37, 16, torch.float32, 10.0, seed=2)

    def step(image, text, scale, projected, teacher):
        out = contrastive_distill_loss(image, text, scale, projected, teacher, backend="triton")
        return out["contrastive_loss"] + out["distill_loss"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs[:4]]
    loss = compiled(*leaves, inputs[4])
    grads = torch.autograd.grad(loss, leaves)
    want = _run(inputs, "triton", weights=(1.0, 1.0))
    assert _max_err(loss, want[0] + want[1]) < 1e-6
    for g, w in zip(grads, want[2:], strict=True):
        assert _max_err(g, w) < 1e-6


def test_custom_ops_opcheck():
    import kclip.kernels.contrastive_distill as cd
    import kclip.kernels.soft_label_ce as ce

    image, text, scale, projected, teacher = _contrastive_case(5, 16, torch.float32, 3.0, e=16)
    torch.library.opcheck(cd._fwd_op, (image, text, scale, None, None, 0, projected, teacher),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    logits = torch.randn(4, 10)
    torch.library.opcheck(ce._fwd_op, (logits, torch.softmax(logits, -1), None, None),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


# ---- soft-label cross-entropy -----------------------------------------------------------------------------------


def _soft_case(b, k, dtype, topk=None, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, k, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    if topk is None:
        targets = torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64) * 2, -1).to(device, torch.float32)
        return logits, targets
    indices = torch.randint(0, k, (b, topk), generator=g).to(device)
    weights = torch.softmax(torch.randn(b, topk, generator=g, dtype=torch.float64), -1).to(device, torch.float32)
    return logits, (indices, weights)


def _ce_run(logits, targets, backend, grad_weight=1.7):
    z = logits.detach().clone().requires_grad_()
    loss = soft_label_cross_entropy(z, targets, backend=backend)
    (dz,) = torch.autograd.grad(grad_weight * loss, [z])
    return loss.detach(), dz


@pytest.mark.parametrize("topk", [None, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, k", [(3, 2), (37, 100), (9, 300), (5, 1000), (2, 65536)])
def test_soft_label_ce_matches_float64(b, k, dtype, topk):
    logits, targets = _soft_case(b, k, dtype, topk=None if topk is None else min(topk, k), seed=k)
    got = _ce_run(logits, targets, "triton")
    t64 = targets.double() if topk is None else (targets[0], targets[1].double())
    want = _ce_run(logits.double(), t64, "reference")
    if dtype == torch.float32:
        for g, w in zip(got, want, strict=True):
            assert _max_err(g, w) <= 1e-5 * (1 + w.abs().max().item())
    else:
        torch_low = _ce_run(logits, targets, "reference")
        for g, w, t in zip(got, want, torch_low, strict=True):
            assert _max_err(g, w) <= 2 * _max_err(t, w) + 4 * EPS[dtype] * (1 + w.abs().max().item())


def test_soft_label_ce_duplicate_topk_indices_add_up():
    logits = torch.randn(4, 50)
    indices = torch.tensor([[3, 3, 7], [0, 1, 2], [49, 49, 49], [10, 20, 10]])
    weights = torch.full((4, 3), 1 / 3)
    got = _ce_run(logits, (indices, weights), "triton")
    want = _ce_run(logits.double(), (indices, weights.double()), "reference")
    for g, w in zip(got, want, strict=True):
        assert _max_err(g, w) < 1e-5


def test_soft_label_ce_topk_16_with_many_duplicates_over_blocks():
    """T = 16 with indices drawn from few values, K spanning several blocks: the scatter of the backward."""
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(11, 700, generator=g)
    indices = torch.randint(0, 6, (11, 16), generator=g) * 131  # 6 distinct values in [0, 700), in every block
    weights = torch.softmax(torch.randn(11, 16, generator=g), -1)
    got = _ce_run(logits, (indices, weights), "triton")
    want = _ce_run(logits.double(), (indices, weights.double()), "reference")
    for g_, w in zip(got, want, strict=True):
        assert _max_err(g_, w) <= 1e-5 * (1 + w.abs().max().item())
    again = _ce_run(logits, (indices, weights), "triton")
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))  # duplicates in any order: bitwise


def test_out_of_range_topk_index_is_reported_where_the_loss_is_read(monkeypatch):
    """Without the host-side value checks (a GPU without KCLIP_CHECK), the kernel keeps the first bad row on the
    device; raise_deferred_errors names it; entries out of range are left out of the loss meanwhile."""
    from kclip import losses

    monkeypatch.setattr(losses, "_value_checks", lambda device: False)
    logits = torch.randn(5, 50)
    indices = torch.tensor([[1, 2], [3, 4], [5, 50], [6, -1], [7, 8]])
    weights = torch.full((5, 2), 0.5)
    losses.raise_deferred_errors()  # nothing pending from earlier tests
    loss = soft_label_cross_entropy(logits, (indices, weights), backend="triton")
    clean = soft_label_cross_entropy(logits, (indices.clamp(0, 49), torch.where((indices >= 0) & (indices < 50),
                                     weights, 0.0)), backend="reference")  # fmt: skip
    assert torch.allclose(loss, clean.float(), atol=1e-5)
    soft_label_cross_entropy(logits[:2], (indices[:2], weights[:2]), backend="triton")  # a clean call after it
    with pytest.raises(ValueError, match=r"row 2 of the soft-label cross-entropy call 1 of 2 .* outside \[0, 50\)"):
        losses.raise_deferred_errors()
    losses.raise_deferred_errors()  # read once: cleared


# ---- dispatch and input checks ------------------------------------------------------------------------------------


def test_auto_backend_uses_reference_on_cpu():
    image, text, scale, _, _ = _contrastive_case(3, 16, torch.float64, 2.0, device="cpu")
    out = contrastive_distill_loss(image, text, scale)  # float64 is reference-only: auto must pick it
    assert out["contrastive_loss"].dtype == torch.float64


def test_disable_triton_forces_reference(monkeypatch):
    monkeypatch.setenv("KCLIP_DISABLE_TRITON", "1")
    image, text, scale, _, _ = _contrastive_case(3, 16, torch.float64, 2.0, device="cpu")
    out = contrastive_distill_loss(image, text, scale, backend="triton")
    assert out["contrastive_loss"].dtype == torch.float64


def test_value_checks_only_on_cpu_or_when_asked(monkeypatch):
    from kclip import losses

    monkeypatch.delenv("KCLIP_CHECK", raising=False)
    assert losses._value_checks(torch.device("cpu"))
    assert not losses._value_checks(torch.device("cuda"))
    monkeypatch.setenv("KCLIP_CHECK", "1")
    assert losses._value_checks(torch.device("cuda"))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_contrastive_inputs(backend):
    image, text, scale, projected, teacher = _contrastive_case(4, 16, torch.float32, 2.0, e=8, device="cpu")
    cases = [
        ("text_features", dict(text=text[:3])),
        ("text_features", dict(text=text[:, :8])),
        ("text_features", dict(text=text.half())),
        ("image_features", dict(image=image.int(), text=text.int())),
        ("image_features", dict(image=image[0], text=text[0])),
        ("logit_scale", dict(scale=torch.ones(2))),
        ("logit_scale", dict(scale=torch.tensor(float("nan")))),
        ("logit_scale", dict(scale=torch.tensor(float("inf")))),
        ("image_features", dict(image=image.clone().index_fill_(0, torch.tensor([1]), float("nan")))),
        ("teacher_features", dict(teacher=None)),
        ("teacher_features", dict(teacher=teacher[:, :4])),
        ("projected_text", dict(projected=projected[:2], teacher=teacher[:2])),
    ]
    for name, change in cases:
        args = dict(image=image, text=text, scale=scale, projected=projected, teacher=teacher) | change
        with pytest.raises(ValueError, match=name if name != "teacher_features" or change["teacher"] is not None
                           else "together"):  # fmt: skip
            contrastive_distill_loss(args["image"], args["text"], args["scale"], args["projected"], args["teacher"],
                                     backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match="backend"):
        contrastive_distill_loss(image, text, scale, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_soft_label_inputs(backend):
    logits, targets = _soft_case(4, 10, torch.float32, device="cpu")
    indices = torch.randint(0, 10, (4, 3))
    weights = torch.full((4, 3), 1 / 3)
    cases = [
        ("soft_targets", targets[:3]),
        ("soft_targets", targets.clone().index_fill_(1, torch.tensor([0]), -0.1)),  # negative
        ("soft_targets", targets * 2),  # rows sum to 2
        ("soft_targets", (targets > 0.1).long()),
        ("indices", (indices.float(), weights)),
        ("indices", (indices[:2], weights[:2])),
        ("indices", (indices + 10, weights)),  # out of range
        ("weights", (indices, weights[:, :2])),
        ("weights", (indices, -weights)),
    ]
    for name, bad in cases:
        with pytest.raises(ValueError, match=name):
            soft_label_cross_entropy(logits, bad, backend=backend)
    with pytest.raises(ValueError, match="logits"):
        soft_label_cross_entropy(logits.int(), targets, backend=backend)
    with pytest.raises(ValueError, match="logits"):
        soft_label_cross_entropy(logits.clone().fill_(float("nan")), targets, backend=backend)


def test_import_is_lean():
    code = (
        "import sys, torch, kclip.losses\n"
        "assert 'triton' not in sys.modules, 'kclip.losses imported triton'\n"
        "assert 'kclip.kernels.contrastive_distill' not in sys.modules\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_prune_keeps_dtype_and_store_mode_lists(monkeypatch):
    import kclip.kernels.contrastive_distill as cd

    monkeypatch.setattr(cd, "INTERPRET", False)
    bwd = cd.BWD_CONFIGS_16 + cd.BWD_CONFIGS_32
    x16, x32 = torch.empty(1, 768, dtype=torch.bfloat16), torch.empty(1, 768)
    assert cd._prune(bwd, {"X0": x16, "D": 768}, STORE_MODE=0) == cd.BWD_CONFIGS_16
    assert cd._prune(bwd, {"X0": x32, "D": 768}, STORE_MODE=2) == cd.BWD_ATOMIC_CONFIGS_32
    fwd = cd.FWD_CONFIGS_16 + cd.FWD_CONFIGS_32
    assert cd._prune(fwd, {"A0": x16, "D": 768}) == cd.FWD_CONFIGS_16
    assert cd._prune(fwd, {"A0": x32, "D": 768}) == cd.FWD_CONFIGS_32
    # No 16-bit forward tile is as narrow as 16 features: the narrowest one (BLOCK_K = 32) is kept, alone.
    (narrowest,) = [c for c in cd.FWD_CONFIGS_16 if c.kwargs["BLOCK_K"] == 32]
    assert cd._prune(fwd, {"A0": x16, "D": 16}) == [narrowest]


# ---- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("b, d", [(4096, 768), (1000, 512)])
def test_gpu_bf16_within_twice_pytorch(b, d):
    inputs = _contrastive_case(b, d, torch.bfloat16, 100.0, e=1024, device="cuda")
    got, want, torch_bf16 = _run(inputs, "triton"), _reference64(inputs), _run(inputs, "reference")
    for g, w, t in zip(got, want, torch_bf16, strict=True):
        assert _max_err(g, w) <= 2 * _max_err(t, w) + 4 * EPS[torch.bfloat16] * (1 + w.abs().max().item())


def _grouped_backward_configs():
    import kclip.kernels.contrastive_distill as cd

    configs = cd.BWD_CONFIGS_16 + cd.BWD_CONFIGS_16_SM90 + cd.BWD_CONFIGS_32
    return [
        pytest.param(c, id=str(c).split(", num_ctas")[0].replace(" ", "")) for c in configs if c.kwargs["NUM_DO"] > 1
    ]


@pytest.mark.parametrize("config", _grouped_backward_configs())
def test_every_grouped_backward_configuration(config, monkeypatch):
    """Each GPU configuration that accumulates several feature slices a program, forced (the autotuner would pick
    one), at D = 768 and 700 (one or two groups, a partial last slice): on a GPU in bf16/fp32 at B = 1000, here
    under the interpreter in fp16/fp32 at B = 40 (the interpreter multiplies no bf16 tiles)."""
    import kclip.kernels.contrastive_distill as cd

    on_gpu = torch.cuda.is_available()
    if on_gpu and config in cd.BWD_CONFIGS_16_SM90 and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("an sm_90 configuration")
    dtype = torch.float32 if config in cd.BWD_CONFIGS_32 else (torch.bfloat16 if on_gpu else torch.float16)
    kernel = cd._contrastive_distill_bwd_kernel
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "early_config_prune", None)
    for d in (768, 700):
        inputs = _contrastive_case(1000 if on_gpu else 40, d, dtype, 100.0, e=64 if on_gpu else 16, device=DEVICE)
        got, want, torch_ref = _run(inputs, "triton"), _reference64(inputs), _run(inputs, "reference")
        assert kernel.best_config is config
        for g, w, t in zip(got, want, torch_ref, strict=True):
            assert _max_err(g, w) <= 2 * _max_err(t, w) + 4 * EPS[dtype] * (1 + w.abs().max().item())


@pytest.mark.gpu
def test_gpu_fp32_and_large_batch():
    inputs = _contrastive_case(16384, 512, torch.float32, 100.0, e=64, device="cuda")
    got, want = _run(inputs, "triton"), _reference64(inputs)
    for g, w in zip(got, want, strict=True):
        assert _max_err(g, w) <= 1e-4 * (1 + w.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_local_loss_form_in_one_process(dtype):
    got, want = _local_loss_in_one_process(4, 2048, 768, dtype, 100.0, "cuda")
    tol = 1e-4 if dtype == torch.float32 else 8 * EPS[dtype]
    for g, w in zip(got, want, strict=True):
        assert _max_err(g, w) <= tol * (1 + w.abs().max().item())


@pytest.mark.gpu
def test_gpu_deterministic_mode_is_bitwise_reproducible_with_splits():
    """At B = 8192 the backward splits its inner range over several programs on an H100 / H200: the deterministic
    mode sums the per-split buffers in order, so two runs agree to the bit."""
    import kclip.kernels.contrastive_distill as cd

    inputs = _contrastive_case(8192, 768, torch.bfloat16, 100.0, e=1024, device="cuda")
    assert cd._num_splits(triton.cdiv(8192, 64) * 2 * 3, 8192, torch.device("cuda")) > 1
    first, again = _run(inputs, "triton", deterministic=True), _run(inputs, "triton", deterministic=True)
    assert all(torch.equal(f, a) for f, a in zip(first, again, strict=True))


@pytest.mark.gpu
def test_gpu_fp16_at_a_batch_where_probabilities_are_subnormal():
    """B = 16384: probabilities near 1/B lie below fp16's normal range; the kernels keep them in fp32."""
    inputs = _contrastive_case(16384, 512, torch.float16, 100.0, e=64, device="cuda")
    got, want, torch_fp16 = _run(inputs, "triton"), _reference64(inputs), _run(inputs, "reference")
    for g, w, t in zip(got, want, torch_fp16, strict=True):
        assert torch.isfinite(g).all()
        assert _max_err(g, w) <= 2 * _max_err(t, w) + 4 * EPS[torch.float16] * (1 + w.abs().max().item())


@pytest.mark.gpu
def test_gpu_soft_label_ce_topk_bf16_and_the_deferred_check():
    for k, t in ((100, 8), (65536, 16)):
        logits, (idx, w) = _soft_case(4096, k, torch.bfloat16, topk=t, device="cuda", seed=k)
        got = _ce_run(logits, (idx, w), "triton")
        want = _ce_run(logits.double(), (idx, w.double()), "reference")
        torch_low = _ce_run(logits, (idx, w), "reference")
        for g, w_, t_ in zip(got, want, torch_low, strict=True):
            assert _max_err(g, w_) <= 2 * _max_err(t_, w_) + 4 * EPS[torch.bfloat16] * (1 + w_.abs().max().item())
    from kclip import losses

    idx[7, 3] = k  # one index out of range: no error in the step, one where the loss is read
    soft_label_cross_entropy(logits, (idx, w), backend="triton")
    with pytest.raises(ValueError, match="row 7 of"):
        losses.raise_deferred_errors()


@pytest.mark.gpu
def test_gpu_soft_label_ce_bf16():
    for k in (100, 1000, 16384):
        logits, targets = _soft_case(4096, k, torch.bfloat16, device="cuda", seed=k)
        got = _ce_run(logits, targets, "triton")
        want = _ce_run(logits.double(), targets.double(), "reference")
        torch_low = _ce_run(logits, targets, "reference")
        for g, w, t in zip(got, want, torch_low, strict=True):
            assert _max_err(g, w) <= 2 * _max_err(t, w) + 4 * EPS[torch.bfloat16] * (1 + w.abs().max().item())
