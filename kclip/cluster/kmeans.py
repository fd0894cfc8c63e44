"""k-means with a FAISS-shaped API, on kclip._C (CPU and CUDA) or the PyTorch reference.

The algorithm: greedy k-means++ on a subsample (or random or given centroids), then Lloyd iterations until the
relative decrease of the objective falls to `tol` or `n_iter` updates are done. Distances come from
||x||^2 - 2 x.c + ||c||^2 through a GEMM-shaped kernel that never builds an N x K matrix; empty clusters are
re-seeded by splitting the largest one. Data larger than memory is read in chunks of rows: `assign` and
`soft_assign` always stream, `fit` streams when asked (`fit(x, streaming=True)`) or fits a subsample
(`max_points_per_centroid`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from kclip._compiled import compiled_module, compiled_status
from kclip.cluster.reference import ReferenceOps

log = logging.getLogger(__name__)

_CHUNK_BYTES = 256 << 20  # float32 bytes of rows prepared at once when streaming
_SUPPORTED = ("float16", "bfloat16", "float32", "float64")
_SPLIT_EPS = 1.0 / 1024.0  # relative perturbation of a split centroid, as FAISS uses


@dataclasses.dataclass(frozen=True)
class IterationStats:
    """One Lloyd iteration (FAISS's ClusteringIterationStats).

    Attributes:
        iteration: 0-based index; the last record is the final assignment.
        objective: sum of squared distances of every point to its assigned centroid in this iteration.
        seconds: wall time of the iteration (assignment, update, splits).
        imbalance: k * sum(size^2) / n^2 of the assignment: 1 when all clusters are equal.
        splits: empty clusters re-seeded by splitting in this iteration's update.
    """

    iteration: int
    objective: float
    seconds: float
    imbalance: float
    splits: int


# ---- input handling -------------------------------------------------------------------------------------------


def _dtype_name(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    return str(x.dtype)


class _Rows:
    """A 2-D float array from numpy (memory maps too), torch (CPU or CUDA) or cupy, read by rows."""

    def __init__(self, x: Any, name: str = "x"):
        if not isinstance(x, (np.ndarray, torch.Tensor)):
            if hasattr(x, "__cuda_array_interface__"):
                x = torch.as_tensor(x, device="cuda")  # cupy and other device arrays, without a copy
            else:
                x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D array [n, d], got shape {tuple(x.shape)}")
        if _dtype_name(x) not in _SUPPORTED:
            raise ValueError(f"{name}: unsupported dtype {_dtype_name(x)}; use one of {', '.join(_SUPPORTED)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: is empty (0 rows)")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: has width 0")
        self.x, self.name = x, name
        self.n, self.d = int(x.shape[0]), int(x.shape[1])
        self.is_cuda = isinstance(x, torch.Tensor) and x.is_cuda

    def rows(self, start: int, stop: int) -> Any:
        return self.x[start:stop]

    def take(self, index: np.ndarray) -> Any:
        if isinstance(self.x, torch.Tensor):
            return self.x[torch.as_tensor(index, device=self.x.device)]
        return self.x[index]

    def chunk_rows(self) -> int:
        return max(1, _CHUNK_BYTES // (4 * self.d))


def _check_finite(x: Any, name: str, first_row: int = 0) -> None:
    """Raise ValueError naming the first row holding NaN or inf (one host sync for device arrays)."""
    ok = torch.isfinite(x).all(dim=1) if isinstance(x, torch.Tensor) else np.isfinite(x).all(axis=1)
    if not bool(ok.all()):
        bad = int(torch.nonzero(~ok)[0, 0]) if isinstance(x, torch.Tensor) else int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{name}: contains NaN or inf (first at row {first_row + bad})")


def _normalize_rows(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x / torch.linalg.vector_norm(x.float(), dim=1, keepdim=True).clamp_min(1e-12).to(x.dtype)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12).astype(x.dtype)


# ---- backends -------------------------------------------------------------------------------------------------


class CpuOps:
    """The k-means steps on kclip._C's CPU kernels; data prepared as float32 C-contiguous numpy arrays."""

    name = "cpu"

    def __init__(self, module):
        self.C = module
        self._norms: dict[int, tuple[weakref.ref, np.ndarray]] = {}

    def prepare(self, rows: Any) -> np.ndarray:
        if isinstance(rows, torch.Tensor):
            return rows.detach().to("cpu", torch.float32).contiguous().numpy()
        return np.ascontiguousarray(rows, dtype=np.float32)

    def _x_norm(self, x: np.ndarray) -> np.ndarray:
        """The rows' squared norms of a prepared chunk, computed once: Lloyd's loop passes the same prepared
        chunks every iteration, and recomputing them was a pass over x each time (at 20k x 4096 here the iteration
        that computes them took 184-192 ms, the later ones 148-172). The ops live for one fit or one assign call
        and hold only weak references to the chunks."""
        hit = self._norms.get(id(x))
        if hit is not None and hit[0]() is x:
            return hit[1]
        self._norms = {key: v for key, v in self._norms.items() if v[0]() is not None}
        norms = self.C.cpu_row_sq_norms(x)
        self._norms[id(x)] = (weakref.ref(x), norms)
        return norms

    @staticmethod
    def _host(c: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(c.detach().cpu().numpy(), dtype=np.float32)

    def assign(self, x: np.ndarray, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, dist = self.C.cpu_assign(x, self._host(centroids), self._x_norm(x))
        return torch.from_numpy(labels), torch.from_numpy(dist)

    def accumulate(self, x: np.ndarray, labels: torch.Tensor, k: int, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = self.C.cpu_accumulate(x, labels.numpy(), k)
        if out is None:
            return torch.from_numpy(sums), torch.from_numpy(counts)
        out[0].add_(torch.from_numpy(sums))
        out[1].add_(torch.from_numpy(counts))
        return out

    def assign_accumulate(self, x: np.ndarray, centroids: torch.Tensor, k: int, out=None):
        """assign() then accumulate() in one call: (dist, (sums, counts))."""
        _, dist, sums, counts = self.C.cpu_assign_accumulate(x, self._host(centroids), self._x_norm(x))
        sums, counts = torch.from_numpy(sums), torch.from_numpy(counts)
        if out is not None:
            sums, counts = out[0].add_(sums), out[1].add_(counts)
        return torch.from_numpy(dist), (sums, counts)

    def kmeanspp(self, x: np.ndarray, k: int, seed: int, n_trials: int) -> torch.Tensor:
        return torch.from_numpy(self.C.cpu_kmeanspp(x, k, seed, n_trials))

    def soft_assign(self, x: np.ndarray, centroids: torch.Tensor, temperature: float, top_k: int | None):
        out = self.C.cpu_soft_assign(x, self._host(centroids), temperature, top_k or 0)
        return torch.from_numpy(out) if top_k is None else (torch.from_numpy(out[0]), torch.from_numpy(out[1]))


class CudaOps:
    """The k-means steps on kclip._C's CUDA kernels; data prepared as contiguous torch CUDA tensors in their
    own float dtype (float64 becomes float32), on torch's current stream. k-means++ runs on the host (see
    KMeans._init_centroids), over a subsample."""

    name = "cuda"
    _MAX_DEVICE_TOP_K = 64
    _DIST_BYTES = 256 << 20  # workspace for soft assignment distances

    def __init__(self, module, device: torch.device):
        self.C, self.device = module, device
        self._cached: tuple | None = None

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def prepare(self, rows: Any) -> torch.Tensor:
        if isinstance(rows, np.ndarray):  # read-only memory maps are copied once on the host; torch wants writable
            rows = torch.from_numpy(np.require(rows, requirements=["C", "W"]))
        t = rows.to(self.device, non_blocking=True)
        if t.dtype == torch.float64:
            t = t.to(torch.float32)
        return t.contiguous()

    def _centroids(self, x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Uploaded once per centroid tensor and dtype, not once per chunk: at K=65536, D=4096 that is 512 MB.
        if self._cached is None or self._cached[0] is not centroids or self._cached[1] != x.dtype:
            c = centroids.to(self.device, x.dtype).contiguous()
            self._cached = (centroids, x.dtype, c, c.float().square().sum(1))  # norms of the values the kernel reads
        return self._cached[2], self._cached[3]

    def assign(self, x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, c_norm = self._centroids(x, centroids)
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=self.device)
        dist = torch.empty(x.shape[0], dtype=torch.float32, device=self.device)
        with torch.cuda.device(self.device):  # the kernels launch on the current device, x's own
            self.C.cuda_assign(x, c, c_norm, labels, dist, self._stream())
        return labels, dist

    def accumulate(self, x: torch.Tensor, labels: torch.Tensor, k: int, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cluster float32 sums and counts on the device; with `out`, added into it by the kernel itself."""
        if out is None:
            out = (
                torch.zeros(k, x.shape[1], dtype=torch.float32, device=self.device),
                torch.zeros(k, dtype=torch.int64, device=self.device),
            )
        with torch.cuda.device(self.device):
            self.C.cuda_accumulate(x, labels, out[0], out[1], self._stream())
        return out

    def soft_assign(self, x: torch.Tensor, centroids: torch.Tensor, temperature: float, top_k: int | None):
        c, c_norm = self._centroids(x, centroids)
        n, k = x.shape[0], c.shape[0]
        step = max(1, self._DIST_BYTES // (4 * k))
        dense = torch.empty(n, k, dtype=torch.float32, device=self.device) if top_k is None else None
        if top_k is not None:
            idx = torch.empty(n, top_k, dtype=torch.int64, device=self.device)
            w = torch.empty(n, top_k, dtype=torch.float32, device=self.device)
        work = torch.empty(min(step, n), k, dtype=torch.float32, device=self.device)
        with torch.cuda.device(self.device):  # the kernels launch on the current device
            for s in range(0, n, step):
                e = min(n, s + step)
                dist = dense[s:e] if dense is not None else work[: e - s]
                self.C.cuda_distances(x[s:e], c, c_norm, dist, self._stream())
                if top_k is None:
                    self.C.cuda_soft_assign(dist, temperature, 0, dense_out=dist, stream=self._stream())
                elif top_k <= self._MAX_DEVICE_TOP_K:
                    self.C.cuda_soft_assign(
                        dist, temperature, top_k, topk_idx=idx[s:e], topk_w=w[s:e], stream=self._stream()
                    )
                else:  # wide top-k: the device kernel selects at most 64, torch.topk takes over
                    top = torch.topk(-dist / temperature, top_k, dim=1, sorted=True)
                    idx[s:e], w[s:e] = top.indices, torch.softmax(top.values, dim=1)
        return dense if top_k is None else (idx, w)


# ---- backend selection ----------------------------------------------------------------------------------------


def _cuda_problem() -> str:
    """Why the compiled CUDA path cannot run here, or "" when it can."""
    module, why = compiled_status()
    if module is None:
        return why
    if not module.cuda_compiled:
        return "kclip._C was built without its CUDA part (no CUDA compiler at build time)"
    status = module.cuda_device_status()
    if status["device_count"] == 0:
        return status["error"] or "no CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU-only torch build?)"
    return ""


def backend_info() -> dict[str, Any]:
    """Which k-means backends can run here, and why not where not.

    Returns:
        dict with `cpu` (compiled CPU path importable), `cpu_isa`, `cuda_compiled`, `cuda_device` (a usable
        GPU), `cuda_device_count`, `driver_version`, `runtime_version`, `cuda_error` ("" when usable) and
        `compiled_error` ("" when kclip._C imports).
    """
    module, why = compiled_status()
    info: dict[str, Any] = {
        "cpu": module is not None,
        "cpu_isa": module.cpu_isa if module is not None else None,
        "cuda_compiled": bool(module is not None and module.cuda_compiled),
        "cuda_device": False,
        "cuda_device_count": 0,
        "driver_version": 0,
        "runtime_version": 0,
        "cuda_error": why,
        "compiled_error": why,
    }
    if module is not None:
        status = module.cuda_device_status()
        info.update(
            cuda_device_count=status["device_count"],
            driver_version=status["driver_version"],
            runtime_version=status["runtime_version"],
        )
        info["cuda_error"] = _cuda_problem()
        info["cuda_device"] = info["cuda_error"] == ""
    return info


def _select_ops(device: str, data_on_cuda: bool):
    if device == "reference":
        return ReferenceOps("cuda" if data_on_cuda else "cpu")
    if device == "auto":
        if not _cuda_problem():
            return CudaOps(compiled_module("k-means"), torch.device("cuda", torch.cuda.current_device()))
        device = "cpu"
    if device.startswith("cuda"):
        problem = _cuda_problem()
        if problem:
            raise RuntimeError(f"device={device!r}: the CUDA k-means cannot run here: {problem}")
        dev = torch.device(device)
        return CudaOps(compiled_module("k-means"), dev if dev.index is not None else torch.device("cuda", 0))
    if device == "cpu":
        module = compiled_module("k-means on the CPU")
        return CpuOps(module) if module is not None else ReferenceOps("cpu")
    raise ValueError(f"device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'reference', got {device!r}")


# ---- Lloyd ----------------------------------------------------------------------------------------------------


def split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor) -> int:
    """Re-seed every empty cluster by splitting the currently largest one, in place.

    The two halves are the old centroid moved by +/- (1/1024)(|c| + rms(c)) with alternating signs along the
    coordinates, and the sizes are split in two, so the next assignment separates them. Never leaves a NaN or
    a centroid at the origin.

    Shapes: centroids [k, d] float64 (float32 on a CUDA device), counts [k] int64, on one device. Returns the
    number of splits.
    """
    splits = 0
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0
    for j in torch.nonzero(counts == 0).flatten().tolist():
        big = int(torch.argmax(counts))  # ties: the lowest index
        if counts[big] < 2:
            break  # no cluster has two points to give: nothing sensible to split
        c = centroids[big]
        delta = _SPLIT_EPS * (c.abs() + c.square().mean().sqrt() + 1e-12) * sign
        centroids[j] = c + delta
        centroids[big] = c - delta
        counts[j] = counts[big] // 2
        counts[big] -= counts[j]
        splits += 1
    return splits


def lloyd(
    ops,
    chunks: Callable[[], Iterable[Any]],
    centroids: torch.Tensor,
    *,
    n_iter: int,
    tol: float,
    spherical: bool,
    progress: bool = False,
) -> tuple[torch.Tensor, float, list[IterationStats]]:
    """Lloyd iterations over the prepared chunks that `chunks()` yields (one pass per iteration).

    Stops when (previous - current) objective <= tol * previous, or after n_iter updates; the returned objective
    and the last stats record belong to the returned centroids.

    On the CPU the centroids are updated on the host in float64 (bitwise reproducible for a seed); with the CUDA
    ops they stay on the device in float32, where the sums are, so an iteration moves no K x D array across PCIe
    (at K = 65536, D = 4096 that was 1 GB each way) and syncs once, for the objective and the counts.

    Shapes: centroids [k, d] (any float dtype) -> (centroids float32 [k, d] on the CPU, objective, stats).
    """
    on_device = ops.name == "cuda"
    work = torch.float32 if on_device else torch.float64
    centroids = centroids.to(ops.device if on_device else "cpu", work).clone()
    k, d = centroids.shape
    stats: list[IterationStats] = []
    previous = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_iter, desc="k-means", unit="it")
    for it in range(n_iter + 1):
        t0 = time.perf_counter()
        # a new tensor every iteration (also on the device, where it is a copy): the ops cache by identity
        c32 = centroids.to(torch.float32, copy=True)
        # Objective, sums and counts stay on the data's device for the whole pass: one host sync per iteration.
        acc = objective = None
        fused = getattr(ops, "assign_accumulate", None)
        for x in chunks():
            if fused is not None:
                dist, acc = fused(x, c32, k, out=acc)
            else:
                labels, dist = ops.assign(x, c32)
                acc = ops.accumulate(x, labels, k, out=acc)
            part = dist.sum(dtype=torch.float64)
            objective = part if objective is None else objective + part
        sums, counts = (acc[0].float(), acc[1]) if on_device else (acc[0].to(torch.float64).cpu(), acc[1].cpu())
        # the host sync: the objective, the point count and the squared counts in one transfer
        parts = (objective.double(), counts.sum().double(), counts.double().square().sum())
        objective, n, sq = torch.stack([t.to(objective.device) for t in parts]).tolist()
        n = int(n)
        imbalance = float(k * sq / (n * n))
        if it == n_iter or (previous is not None and previous - objective <= tol * previous):
            stats.append(IterationStats(it, objective, time.perf_counter() - t0, imbalance, 0))
            break
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(work)
        splits = split_empty_clusters(centroids, counts.clone())
        if spherical:
            centroids = _normalize_rows(centroids)
        stats.append(IterationStats(it, objective, time.perf_counter() - t0, imbalance, splits))
        previous = objective
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{objective:.4g}")
    if bar is not None:
        bar.close()
    return centroids.to(torch.float32).cpu(), stats[-1].objective, stats


# ---- the public estimator -------------------------------------------------------------------------------------


class KMeans:
    """k-means clustering, FAISS-style.

    Args:
        n_clusters: k, the number of centroids (>= 1).
        n_iter: at most this many Lloyd updates (default 25, FAISS's niter).
        tol: stop when the objective falls by at most this fraction of its previous value (default 1e-4; 0 runs
            until the objective stops falling or n_iter is reached).
        seed: seeds the subsampling and the initialisation (default 0); a seed gives bitwise-identical centroids
            on the CPU across runs and thread counts.
        init: "k-means++" (greedy, on `init_sample_size` points), "random" (k distinct points), or an array of
            initial centroids [k, d].
        device: "auto" (CUDA when usable, else CPU), "cpu", "cuda", "cuda:N", or "reference" (pure PyTorch).
        spherical: L2-normalise the points and keep the centroids on the unit sphere (cosine k-means).
        max_points_per_centroid: fit on a random subsample of at most k * this many points (FAISS default 256;
            here None, all points).
        init_sample_size: points k-means++ considers (default min(n, max(64 k, 8192))); its cost grows as
            sample * k * log(k) * d.
        progress: show a progress bar over the iterations.

    Attributes (after fit):
        centroids: float32 [k, d] on the CPU.
        objective: sum of squared distances of the fitted points to their centroids.
        stats: one IterationStats per iteration.
        init_seconds: time spent choosing the initial centroids.
        backend: "cpu", "cuda" or "reference".
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        n_iter: int = 25,
        tol: float = 1e-4,
        seed: int = 0,
        init: str | Any = "k-means++",
        device: str = "auto",
        spherical: bool = False,
        max_points_per_centroid: int | None = None,
        init_sample_size: int | None = None,
        progress: bool = False,
    ):
        if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool) or n_clusters < 1:
            raise ValueError(f"n_clusters: must be a positive integer, got {n_clusters!r}")
        if not isinstance(n_iter, (int, np.integer)) or n_iter < 0:
            raise ValueError(f"n_iter: must be a non-negative integer, got {n_iter!r}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol: must be a finite number >= 0, got {tol!r}")
        if isinstance(init, str) and init not in ("k-means++", "random"):
            raise ValueError(f"init: expected 'k-means++', 'random' or an array of centroids, got {init!r}")
        if max_points_per_centroid is not None and max_points_per_centroid < 1:
            raise ValueError(f"max_points_per_centroid: must be >= 1 or None, got {max_points_per_centroid!r}")
        if init_sample_size is not None and init_sample_size < n_clusters:
            raise ValueError(f"init_sample_size: must be >= n_clusters={n_clusters}, got {init_sample_size!r}")
        self.n_clusters = int(n_clusters)
        self.n_iter = int(n_iter)
        self.tol = float(tol)
        self.seed = int(seed)
        self.init = init
        self.device = device
        self.spherical = spherical
        self.max_points_per_centroid = max_points_per_centroid
        self.init_sample_size = init_sample_size
        self.progress = progress
        self.centroids: torch.Tensor | None = None
        self.objective: float | None = None
        self.stats: list[IterationStats] = []
        self.init_seconds: float = 0.0
        self.backend: str | None = None

    # -- helpers --

    def _prepare(self, ops, rows: Any, name: str, first_row: int) -> Any:
        x = ops.prepare(rows)
        _check_finite(x, name, first_row)
        return _normalize_rows(x) if self.spherical else x

    def _host_f32(self, rows: Any) -> np.ndarray:
        if isinstance(rows, torch.Tensor):
            return rows.detach().to("cpu", torch.float32).contiguous().numpy()
        return np.ascontiguousarray(rows, dtype=np.float32)

    def _init_centroids(self, ops, src: _Rows, rng: np.random.Generator) -> torch.Tensor:
        k = self.n_clusters
        if not isinstance(self.init, str):
            c = torch.as_tensor(np.asarray(self.init) if not isinstance(self.init, torch.Tensor) else self.init)
            if tuple(c.shape) != (k, src.d):
                raise ValueError(f"init: expected initial centroids of shape ({k}, {src.d}), got {tuple(c.shape)}")
            c = c.detach().cpu().to(torch.float64)
            _check_finite(c, "init")
            return _normalize_rows(c) if self.spherical else c
        if self.init == "random":
            idx = np.sort(rng.choice(src.n, size=k, replace=False))
            return torch.as_tensor(self._host_f32(self._prepare(ops, src.take(idx), src.name, 0)))
        sample = self.init_sample_size or min(src.n, max(64 * k, 8192))
        idx = np.sort(rng.choice(src.n, size=min(sample, src.n), replace=False))
        x = self._host_f32(self._prepare(ops, src.take(idx), src.name, 0))
        n_trials = 2 + int(math.log(k))
        flops = 2.0 * len(idx) * k * n_trials * src.d
        if flops > 1e13:  # about a minute and a half on a 2-core CPU at 110 GFLOP/s
            log.warning(
                "k-means++ over %d points with k=%d, d=%d costs about %.1e FLOPs on the host; "
                "init='random' (FAISS's default) or a smaller init_sample_size starts at once",
                len(idx), k, src.d, flops,
            )  # fmt: skip
        module = compiled_module("k-means++")
        host_ops = CpuOps(module) if module is not None and ops.name != "reference" else ReferenceOps("cpu")
        chosen = host_ops.kmeanspp(x if host_ops.name == "cpu" else torch.from_numpy(x), k, self.seed, n_trials)
        return torch.from_numpy(x)[chosen]

    def _chunks(self, ops, src: _Rows):
        step = src.chunk_rows()
        for s in range(0, src.n, step):
            yield s, self._prepare(ops, src.rows(s, min(src.n, s + step)), src.name, s)

    def _check_fitted(self) -> torch.Tensor:
        if self.centroids is None:
            raise RuntimeError("KMeans: call fit() before assign() or soft_assign()")
        return self.centroids

    # -- API --

    def fit(self, x: Any, *, streaming: bool = False) -> KMeans:
        """Cluster the rows of x.

        Args:
            x: points [n, d]: numpy (memory maps too), torch (CPU or CUDA) or cupy; float16, bfloat16, float32
                or float64.
            streaming: read the points in chunks at every iteration instead of holding the prepared set in
                memory (for data larger than host or device memory).

        Returns:
            self, with `centroids`, `objective`, `stats`, `init_seconds` and `backend` set.
        """
        src = _Rows(x)
        k = self.n_clusters
        if src.n < k:
            raise ValueError(f"x: has {src.n} rows, fewer than n_clusters={k}")
        ops = _select_ops(self.device, src.is_cuda)
        self.backend = ops.name
        rng = np.random.default_rng(self.seed)
        if self.max_points_per_centroid is not None and src.n > k * self.max_points_per_centroid:
            keep = np.sort(rng.choice(src.n, size=k * self.max_points_per_centroid, replace=False))
            log.info("k-means: fitting a subsample of %d of %d points", len(keep), src.n)
            src = _Rows(src.take(keep))

        t0 = time.perf_counter()
        init = self._init_centroids(ops, src, rng)
        self.init_seconds = time.perf_counter() - t0

        if streaming:

            def chunks():
                return (chunk for _, chunk in self._chunks(ops, src))
        else:
            prepared = [chunk for _, chunk in self._chunks(ops, src)]

            def chunks():
                return prepared

        self.centroids, self.objective, self.stats = lloyd(
            ops, chunks, init, n_iter=self.n_iter, tol=self.tol, spherical=self.spherical, progress=self.progress
        )
        return self

    def _run(self, x: Any, step: Callable[[Any, Any], Any]) -> tuple[list[Any], bool]:
        centroids = self._check_fitted()
        src = _Rows(x)
        if src.d != centroids.shape[1]:
            raise ValueError(f"x: has width {src.d}, the centroids have width {centroids.shape[1]}")
        ops = _select_ops(self.device, src.is_cuda)
        return [step(ops, chunk) for _, chunk in self._chunks(ops, src)], src.is_cuda

    @staticmethod
    def _place(t: torch.Tensor, on_cuda: bool) -> torch.Tensor:
        return t if on_cuda else t.cpu()

    def assign(self, x: Any, *, return_distances: bool = False):
        """Nearest centroid of each row of x (ties to the lower index).

        Returns:
            labels int64 [n] (on x's device for CUDA input, else the CPU), and with return_distances the squared
            distances float32 [n].
        """
        parts, on_cuda = self._run(x, lambda ops, chunk: ops.assign(chunk, self.centroids))
        labels = self._place(torch.cat([p[0] for p in parts]), on_cuda)
        if not return_distances:
            return labels
        return labels, self._place(torch.cat([p[1] for p in parts]).float(), on_cuda)

    def soft_assign(self, x: Any, temperature: float, top_k: int | None = None):
        """Soft concept labels: softmax(-||x - c_j||^2 / temperature) over the centroids.

        Args:
            x: points [n, d].
            temperature: tau > 0; smaller is harder (tau -> 0 gives one-hot labels).
            top_k: keep only the top_k largest entries per row, renormalised to sum to 1.

        Returns:
            dense float32 [n, k], or (indices int64 [n, top_k], weights float32 [n, top_k]) sorted by descending
            weight; on x's device for CUDA input, else the CPU.
        """
        k = self._check_fitted().shape[0]
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
        if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= k):
            raise ValueError(f"top_k: must be an integer in [1, {k}] or None, got {top_k!r}")
        parts, on_cuda = self._run(x, lambda ops, chunk: ops.soft_assign(chunk, self.centroids, temperature, top_k))
        if top_k is None:
            return self._place(torch.cat([p.float() for p in parts]), on_cuda)
        return (
            self._place(torch.cat([p[0] for p in parts]), on_cuda),
            self._place(torch.cat([p[1].float() for p in parts]), on_cuda),
        )
