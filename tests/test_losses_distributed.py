"""The local-loss form across 2 processes (gloo, CPU) against one process holding the whole batch.

Each rank computes the loss of its rows against the gathered features (open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)``). Documented scaling, checked here: the mean over ranks of the
losses is the single-process loss; each rank's feature gradients are W times the single-process gradients of its rows
(the all-gather's backward sums over ranks, before DDP's 1/W averaging); the mean over ranks of the logit-scale
gradients is the single-process one.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
B_LOCAL, D, E = 5, 16, 12


def _batch():
    g = torch.Generator().manual_seed(0)
    n = WORLD * B_LOCAL
    image = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    projected = torch.randn(n, E, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, E, generator=g, dtype=torch.float64)
    return image, text, torch.tensor(20.0, dtype=torch.float64), projected, teacher


def _worker(rank, port, backend, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from kclip.losses import contrastive_distill_loss

        image, text, scale, projected, teacher = _batch()
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        dtype = torch.float32 if backend == "triton" else torch.float64
        leaves = [t.to(dtype).clone().requires_grad_() for t in (image[rows], text[rows], scale, projected[rows])]
        out = contrastive_distill_loss(*leaves, teacher[rows].to(dtype), backend=backend, local_loss=True)
        (out["contrastive_loss"] + out["distill_loss"]).backward()
        queue.put((rank, out["contrastive_loss"].item(), out["distill_loss"].item(),
                   [t.grad.double().tolist() for t in leaves]))  # fmt: skip
        # Both ranks done with gloo before either tears it down: rank 0 hosts the store, and a rank
        # that exits while its peer is still in destroy_process_group aborts in gloo's threads
        # ("terminate called without an active exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_local_loss_matches_single_process(backend):
    from kclip.losses import reference

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, backend, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(WORLD):
        r, loss, distill, grads = queue.get(timeout=120)
        results[r] = (loss, distill, [torch.tensor(g, dtype=torch.float64) for g in grads])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    image, text, scale, projected, teacher = _batch()
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, projected)]
    single = reference.contrastive_distill_loss(*leaves, teacher)
    (single["contrastive_loss"] + single["distill_loss"]).backward()
    tol = 1e-5 if backend == "triton" else 1e-10

    losses = [results[r][0] for r in range(WORLD)]
    distills = [results[r][1] for r in range(WORLD)]
    assert sum(losses) / WORLD == pytest.approx(single["contrastive_loss"].item(), abs=tol)
    assert sum(distills) / WORLD == pytest.approx(single["distill_loss"].item(), abs=tol)
    for r in range(WORLD):
        rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        for got, leaf in zip(results[r][2][:2], leaves[:2], strict=True):
            torch.testing.assert_close(got, WORLD * leaf.grad[rows], atol=tol, rtol=tol)
        torch.testing.assert_close(results[r][2][3], WORLD * leaves[3].grad[rows], atol=tol, rtol=tol)
    scale_grads = torch.stack([results[r][2][2] for r in range(WORLD)])
    torch.testing.assert_close(scale_grads.mean(), leaves[2].grad, atol=tol, rtol=tol)
