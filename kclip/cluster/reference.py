"""Pure-PyTorch reference of kclip's k-means steps, mirroring the compiled ones by name.

Used by the tests and the benchmarks, and as the CPU fallback where kclip._C is missing. Distances use the
same expanded form as the kernels, ||x||^2 - 2 x.c + ||c||^2 clamped at 0, computed in chunks of rows so that
no N x K matrix larger than a chunk exists; sums are float64.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 24  # distances held at once: 64 MB of float32


def _row_chunks(n: int, k: int):
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def sq_distances_reference(x: torch.Tensor, centroids: torch.Tensor, native: bool = False) -> torch.Tensor:
    """Squared distances of rows to centroids, float32 (float64 when x is float64).

    Args:
        native: compute the product x·cᵀ in x's own dtype (bfloat16 / float16 matmuls, as a chunked PyTorch
            k-means on 16-bit data does) and combine it with the norms in float32; default: up-cast first.

    Shapes: x [n, d], centroids [k, d] -> [n, k].
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if native and x.dtype in (torch.float16, torch.bfloat16):
        c = centroids.to(x.dtype)
        dots = (x @ c.T).to(dtype)  # [n, k]: the product in x's dtype (tensor cores), its result up-cast
        x32, c32 = x.to(dtype), c.to(dtype)
        d = (x32 * x32).sum(1, keepdim=True) - 2.0 * dots + (c32 * c32).sum(1)[None, :]
        return d.clamp_min_(0.0)
    x, c = x.to(dtype), centroids.to(dtype)
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]  # [n, k]
    return d.clamp_min_(0.0)


def assign_reference(
    x: torch.Tensor, centroids: torch.Tensor, native: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row (ties to the lower index), in chunks of rows (`native`: as in
    `sq_distances_reference`).

    Shapes: x [n, d], centroids [k, d] -> labels int64 [n], squared distances [n].
    """
    n, k = x.shape[0], centroids.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    for s, e in _row_chunks(n, k):
        dist[s:e], labels[s:e] = sq_distances_reference(x[s:e], centroids, native).min(dim=1)
    return labels, dist


def accumulate_reference(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (float64 [k, d]) and sizes (int64 [k])."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x.to(torch.float64))
    counts = torch.bincount(labels, minlength=k)
    return sums, counts


def soft_assign_reference(
    x: torch.Tensor, centroids: torch.Tensor, temperature: float, top_k: int | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(-||x - c_j||^2 / temperature) over the centroids.

    Shapes: dense [n, k]; with top_k, (indices int64 [n, top_k], weights [n, top_k]) sorted by descending
    weight and renormalised to sum to 1 over the kept entries.
    """
    n, k = x.shape[0], centroids.shape[0]
    if top_k is None:
        out = torch.empty(n, k, dtype=torch.float32, device=x.device)
        for s, e in _row_chunks(n, k):
            out[s:e] = torch.softmax(-sq_distances_reference(x[s:e], centroids) / temperature, dim=1)
        return out
    idx = torch.empty(n, top_k, dtype=torch.int64, device=x.device)
    w = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    for s, e in _row_chunks(n, k):
        logits = -sq_distances_reference(x[s:e], centroids) / temperature  # [rows, k]
        # A stable sort keeps the lower index first among equal distances, as the kernels do.
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :top_k]
        idx[s:e] = order
        w[s:e] = torch.softmax(logits.gather(1, order), dim=1)
    return idx, w


class ReferenceOps:
    """The k-means steps in PyTorch, on whatever device the data is on (the fallback and the test oracle).

    Args:
        device: where the steps run.
        native: keep 16-bit points in their dtype and compute the distances' product in it (the chunked PyTorch
            peer of bench/bench_kmeans.py); default: points up-cast to float32.
    """

    name = "reference"

    def __init__(self, device: str | torch.device = "cpu", native: bool = False):
        self.device = torch.device(device)
        self.native = native

    def prepare(self, rows) -> torch.Tensor:
        t = torch.as_tensor(rows, device=self.device)
        if t.dtype == torch.float64 or (self.native and t.dtype in (torch.float16, torch.bfloat16)):
            return t
        return t.to(torch.float32)

    def assign(self, x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return assign_reference(x, centroids.to(self.device), self.native)

    def accumulate(self, x: torch.Tensor, labels: torch.Tensor, k: int, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = accumulate_reference(x, labels, k)
        if out is None:
            return sums, counts
        out[0].add_(sums)
        out[1].add_(counts)
        return out

    def kmeanspp(self, x: torch.Tensor, k: int, seed: int, n_trials: int) -> torch.Tensor:
        return kmeanspp_reference(x, k, seed, n_trials)

    def soft_assign(self, x, centroids, temperature, top_k):
        return soft_assign_reference(x, centroids.to(self.device), temperature, top_k)


def kmeanspp_reference(x: torch.Tensor, k: int, seed: int, n_trials: int) -> torch.Tensor:
    """Greedy k-means++ (n_trials candidates per step, the one lowering the potential most is kept).

    The same algorithm as kclip._C.cpu_kmeanspp, drawing from torch's generator instead of SplitMix64, so
    the two choose different (equally valid) seeds. Shapes: x [n, d] -> indices int64 [k].
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.to(torch.float64)
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    closest = sq_distances_reference(x, x[chosen[0] : chosen[0] + 1])[:, 0]  # [n]
    for _ in range(1, k):
        total = closest.sum()
        if total > 0:
            cand = torch.multinomial(closest / total, n_trials, replacement=True, generator=gen)
        else:
            cand = torch.randint(n, (n_trials,), generator=gen)
        d = torch.minimum(closest[:, None], sq_distances_reference(x, x[cand]))  # [n, n_trials]
        best = int(d.sum(0).argmin())
        chosen.append(int(cand[best]))
        closest = d[:, best]
    return torch.tensor(chosen, dtype=torch.int64)
