"""k-means benchmark: seconds per Lloyd iteration, initialisation seconds and final objective, kclip against peers.

Providers (all fit the same points from the same initial centroids, with tol=0 and a fixed number of updates):
  CPU run:  kclip (kclip._C on the CPU), reference (kclip's pure-PyTorch reference), sklearn (Lloyd), faiss (faiss-cpu)
  CUDA run: kclip (kclip._C's CUDA kernels), kclip-tile64 (the same with KCLIP_CUDA_TILE_ROWS=64: 16-bit distance
            tiles of 64 rows, register-staged, where kclip takes 128-row cp.async tiles on enough rows), torch-chunked,
            faiss-gpu (where importable)

torch-chunked is the chunked PyTorch baseline (matmul + argmin + index_add over row chunks): kclip's reference
steps (`kclip.cluster.reference.ReferenceOps(native=True)`, driven by kclip's own Lloyd loop) on CUDA tensors,
computing the distances' product in the input dtype (bfloat16 matmuls for bfloat16 points), as such a k-means on
16-bit data does; the `reference` row of the CPU run up-casts to float32. Baselines are imported, never
re-written here.

What is timed:
  - seconds_per_iter: a provider's own time for its whole fit from the given centroids divided by the number of
    centroid updates; every provider also runs one assignment pass after its last update (kclip: the sum of its
    IterationStats seconds over len(stats) - 1 updates; sklearn: wall time of fit() over n_iter_; faiss: its
    cumulative iteration time with niter = n_iter + 1, whose last objective belongs to the n_iter-th update, over
    n_iter). Median and p20/p80 over `repeat` fits, after an untimed warm-up fit on the first rows. Without a
    time budget (the CPU default) the providers' fits of a shape are taken in turn, so that a drift of the
    machine's speed hits them alike (meta "order": "interleaved"; --sequential for one provider after another),
    each after a pause of QUIET_S so that the previous provider's spinning thread pools are asleep.
  - fit_seconds: wall time of the fit call, data preparation included (kclip converts and checks the points first).
  - init_seconds: k-means++ on the same sample of points (kclip's default sample, min(n, max(64 k, 8192)) rows):
    kclip's KMeans(init="k-means++") against sklearn.cluster.kmeans_plusplus (same greedy rule, 2 + ln k trials).
    init_objective is the objective of those initial centroids on all n points. The kclip initial centroids are
    the common start of every provider's Lloyd run.
  - floor_seconds: the GEMM floor 2 N K D / (measured matmul rate) of one assignment pass; over_floor =
    seconds_per_iter / floor_seconds; gflops = 2 N K D / seconds_per_iter. The rate is measured on a [rows, D] x
    [D, K] product: float32 torch.matmul and numpy.matmul on the CPU (the faster is the floor), bfloat16
    torch.matmul on a GPU (floor_seconds_same_dtype uses the row's dtype).
  - peak_mem_mib: memory beyond what was held before the fit (see _common.peak_memory): torch's CUDA allocator on
    the first measured fit on a GPU; on the CPU the process's peak RSS in one more, untimed, fit.

With --budget-s (default on CUDA, where the device check runs this under a hard timeout) the warm-up fit doubles
as a probe: a row whose estimated time exceeds its share of the budget runs fewer updates, then fewer points; a
row that cannot afford even that reports the probe itself. Rows record the n and n_iter they ran (n_requested
and n_iter_requested the planned ones), and objectives are compared only between rows of equal n and n_iter.

Run:
    python bench/bench_kmeans.py --smoke                  # CI, CPU, < 1 minute
    python bench/bench_kmeans.py --device cpu             # the CPU shapes, a few minutes on 2 cores
    python bench/bench_kmeans.py --device cuda --out $OUT/bench_kmeans.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import (
    add_common_args,
    cpu_cores,
    cuda_sync,
    format_table,
    output_path,
    peak_memory,
    quantiles_ms,
    refuse_device,
    resolve_device,
    setup_logging,
    time_cpu,
    time_gpu,
    write_rows,
)

log = logging.getLogger("bench.kmeans")


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int
    d: int
    k: int
    n_iter: int  # centroid updates per fit
    init: str  # "k-means++" or "random"

    @property
    def key(self) -> str:
        return f"{self.n}x{self.d}x{self.k}"


# The one shared list of shapes.
SHAPES: dict[str, list[Shape]] = {
    "smoke": [Shape(5_000, 16, 8, 3, "k-means++")],
    "cpu": [
        Shape(100_000, 64, 128, 25, "k-means++"),
        Shape(200_000, 128, 256, 10, "k-means++"),  # 10 updates keep the whole CPU run within a few minutes
        # the method's own shapes: K = 100 concepts over 20k teacher rows, at the widths of SmolLM2-135M (the
        # embedded teacher) and Llama-2-7B
        Shape(20_000, 576, 100, 10, "k-means++"),
        Shape(20_000, 4096, 100, 10, "k-means++"),
    ],
    "cuda": [
        Shape(1_000_000, 4096, 1024, 10, "k-means++"),
        # k-means++ adds one centroid at a time, each step a pass over its sample: at K=65536 kclip's default sample
        # is all 1M points, 65536 sequential steps of 2 (2 + ln K) N D FLOPs, ~7e15 FLOPs on the host where kclip's
        # k-means++ runs: hours. This shape starts from K distinct random points (FAISS's default init).
        Shape(1_000_000, 4096, 65536, 3, "random"),
    ],
}
DTYPES = {"cpu": ("float32",), "cuda": ("bfloat16", "float32")}
PROVIDERS = {
    "cpu": ("kclip", "reference", "sklearn", "faiss"),
    "cuda": ("kclip", "kclip-tile64", "torch-chunked", "faiss-gpu"),
}
REPEAT = {"smoke": 1, "cpu": 3, "cuda": 1}
BUDGET_S = {"cuda": 140.0}  # the device check gives this script 180 s in all
# A pause before each interleaved fit: thread pools spin on after their work (OpenBLAS's for ~0.1 s, libgomp's
# briefly), and on 2 cores a pool spinning from the previous provider's fit took half the next one's CPU (a kclip
# pass measured 35 ms right after a numpy matmul, 20 ms after a pause; the matmul 23 ms after kclip, 16 after one).
QUIET_S = 0.3
FLOOR_ROWS = {"cpu": 16_384, "cuda": 32_768}  # rows of the [rows, D] x [D, K] product timed for the floor


# ---- providers ------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """A provider that cannot run here; the message says why (kept in meta["skipped"])."""


@dataclasses.dataclass
class Fit:
    objective: float
    updates: int  # centroid updates done
    seconds: float  # the provider's own time for the fit (see the module docstring)
    backend: str


@dataclasses.dataclass
class Provider:
    name: str
    fit: Callable[[Any, np.ndarray, int], Fit]  # (points [n, d], initial centroids float32 [k, d], n_iter)
    threads: int | None
    compute_dtype: Callable[[str], str]
    accepts: Callable[[str], str] = lambda dtype: ""  # "" or why this provider cannot take the dtype


def _omp_threads() -> int:
    try:
        return int(os.environ["OMP_NUM_THREADS"])
    except (KeyError, ValueError):
        return cpu_cores()


def _host_f32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _kmeans_fit(device: str) -> Callable[[Any, np.ndarray, int], Fit]:
    from kclip.cluster import KMeans

    def fit(x: Any, c0: np.ndarray, n_iter: int) -> Fit:
        km = KMeans(c0.shape[0], n_iter=n_iter, tol=0.0, init=c0, device=device).fit(x)
        # The last IterationStats record is the assignment after the last update.
        return Fit(float(km.objective), len(km.stats) - 1, sum(s.seconds for s in km.stats), km.backend)

    return fit


def _kclip_tile64_fit(x: Any, c0: np.ndarray, n_iter: int) -> Fit:
    """kclip's CUDA fit with the 16-bit distance kernels held to 64-row tiles (kmeans_cuda.h, wmma_tile_rows)."""
    before = os.environ.get("KCLIP_CUDA_TILE_ROWS")
    os.environ["KCLIP_CUDA_TILE_ROWS"] = "64"
    try:
        return _kmeans_fit("cuda")(x, c0, n_iter)
    finally:
        if before is None:
            del os.environ["KCLIP_CUDA_TILE_ROWS"]
        else:
            os.environ["KCLIP_CUDA_TILE_ROWS"] = before


def _torch_chunked_fit(x: Any, c0: np.ndarray, n_iter: int) -> Fit:
    """kclip's Lloyd loop over the reference steps in the points' own dtype (module docstring)."""
    from kclip.cluster.kmeans import lloyd
    from kclip.cluster.reference import ReferenceOps

    ops = ReferenceOps(x.device if isinstance(x, torch.Tensor) else "cpu", native=True)
    points = ops.prepare(x)
    _, objective, stats = lloyd(ops, lambda: [points], torch.from_numpy(c0), n_iter=n_iter, tol=0.0, spherical=False)
    return Fit(float(objective), len(stats) - 1, sum(s.seconds for s in stats), "reference")


def _faiss_fit(gpu: bool) -> Callable[[Any, np.ndarray, int], Fit]:
    import faiss

    def fit(x: Any, c0: np.ndarray, n_iter: int) -> Fit:
        km = faiss.Kmeans(
            c0.shape[1],
            c0.shape[0],
            niter=n_iter + 1,  # faiss's objective i belongs to the centroids after i updates
            seed=0,
            max_points_per_centroid=10**9,  # no subsampling: every provider sees the same points
            min_points_per_centroid=1,  # no warning for the small warm-up fits
            spherical=False,
            gpu=gpu,
        )
        km.train(_host_f32(x), init_centroids=c0)
        stats = km.iteration_stats  # "time" is cumulative from the start of train
        return Fit(float(stats[-1]["obj"]), len(stats) - 1, float(stats[-1]["time"]), "faiss-gpu" if gpu else "faiss")

    return fit


def _sklearn_fit(x: Any, c0: np.ndarray, n_iter: int) -> Fit:
    from sklearn.cluster import KMeans as SkKMeans

    km = SkKMeans(n_clusters=c0.shape[0], init=c0, n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd")
    t0 = time.perf_counter()
    km.fit(x)
    return Fit(float(km.inertia_), int(km.n_iter_), time.perf_counter() - t0, "sklearn")


def setup_provider(name: str, kind: str) -> Provider:
    """The provider `name` for a `kind` ("cpu" or "cuda") run; raises Unavailable with the reason."""
    f32 = lambda dtype: "float32"
    if name == "kclip":
        from kclip.cluster import backend_info

        info = backend_info()
        if kind == "cuda" and not info["cuda_device"]:
            raise Unavailable(f"kclip's CUDA k-means cannot run: {info['cuda_error']}")
        if kind == "cpu" and not info["cpu"]:
            raise Unavailable(f"kclip._C is missing ({info['compiled_error']}); the reference row is the fallback")
        return Provider(
            name, _kmeans_fit(kind), _omp_threads(), (lambda dtype: dtype) if kind == "cuda" else f32, lambda d: ""
        )
    if name == "kclip-tile64":
        if kind != "cuda":
            raise Unavailable("the distance tile size is a choice of the CUDA kernels")
        base = setup_provider("kclip", kind)
        return dataclasses.replace(base, name=name, fit=_kclip_tile64_fit)
    if name == "reference":
        # KMeans(device="reference") follows the data: CPU tensors on the CPU run.
        return Provider(name, _kmeans_fit("reference"), torch.get_num_threads() if kind == "cpu" else None, f32)
    if name == "torch-chunked":
        return Provider(name, _torch_chunked_fit, None, lambda dtype: dtype)
    if name == "sklearn":
        try:
            import sklearn.cluster  # noqa: F401
        except ImportError as exc:
            raise Unavailable(f"scikit-learn is not installed ({exc})") from None
        return Provider(name, _sklearn_fit, _omp_threads(), f32)
    if name in ("faiss", "faiss-gpu"):
        try:
            import faiss
        except ImportError as exc:
            raise Unavailable(f"faiss is not installed ({exc})") from None
        gpu = name == "faiss-gpu"
        if gpu and (not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0):
            raise Unavailable("faiss has no GPU support here (faiss-cpu, or no GPU visible to faiss)")
        return Provider(
            name,
            _faiss_fit(gpu),
            faiss.omp_get_max_threads(),
            f32,
            lambda dtype: "" if dtype == "float32" else "faiss takes float32 points only",
        )
    raise ValueError(f"unknown provider {name!r}")


# ---- data, initial centroids, GEMM floor ----------------------------------------------------------------------


def make_points(shape: Shape, kind: str, seed: int) -> Any:
    """A mixture of k unit Gaussians around unit-variance centres: float32 [n, d], numpy (CPU) or torch (CUDA)."""
    n, d, k = shape.n, shape.d, shape.k
    if kind == "cuda":
        g = torch.Generator(device="cuda").manual_seed(seed)
        centres = torch.randn(k, d, generator=g, device="cuda")  # [k, d]
        x = torch.empty(n, d, device="cuda")  # [n, d]
        step = max(1, (1 << 28) // d)  # 1 GiB of float32 at a time
        for s in range(0, n, step):
            e = min(n, s + step)
            labels = torch.randint(k, (e - s,), generator=g, device="cuda")
            x[s:e] = centres[labels] + torch.randn(e - s, d, generator=g, device="cuda")
        return x
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d), dtype=np.float32)
    x = centres[rng.integers(0, k, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    return x


def _take(x: Any, idx: np.ndarray) -> Any:
    return x[torch.as_tensor(idx, device=x.device)] if isinstance(x, torch.Tensor) else x[idx]


def _objective(x: Any, centroids: np.ndarray) -> float:
    """Sum of squared distances of x to its nearest centroid, through kclip's reference on x's device."""
    from kclip.cluster.reference import assign_reference

    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
    _, dist = assign_reference(xt, torch.as_tensor(centroids, device=xt.device))
    return float(dist.sum(dtype=torch.float64))


def initial_centroids(
    shape: Shape, x32: Any, kind: str, providers: dict[str, Provider], seed: int, repeat: int, budget_s: float | None
) -> tuple[np.ndarray, dict[str, dict[str, Any]], dict[str, str]]:
    """The common initial centroids float32 [k, d], and per provider its k-means++ {init_seconds, init_objective,
    init_sample}.

    Args:
        budget_s: seconds kclip's k-means++ may take (None: no limit). It is first timed on 1/16 of the sample; where
            the whole sample would not fit, a smaller one (the same for every provider) is used, and noted.

    Returns (c0, init results by provider, skipped init measurements by provider with the reason).
    """
    n, k = shape.n, shape.k
    rng = np.random.default_rng(seed)
    skipped: dict[str, str] = {}
    if shape.init == "random" or "kclip" not in providers:
        if shape.init != "random":
            skipped["kclip init"] = "kclip unavailable: Lloyd starts from random points instead of its k-means++"
        return _host_f32(_take(x32, np.sort(rng.choice(n, size=k, replace=False)))), {}, skipped
    from kclip.cluster import KMeans

    sample = min(n, max(64 * k, 8192))  # kclip's default init_sample_size
    xs = _take(x32, np.sort(rng.choice(n, size=sample, replace=False)))  # [sample, d]

    def kmeans_pp(device: str, rows: int, times: int) -> tuple[float, np.ndarray]:
        seconds, centroids = [], None
        for _ in range(times):
            # n_iter=0: only the initialisation (and one assignment of the sample), centroids = the initial ones.
            km = KMeans(k, n_iter=0, seed=seed, init="k-means++", init_sample_size=rows, device=device)
            km.fit(xs[:rows])
            seconds.append(km.init_seconds)
            centroids = km.centroids.numpy()
        return quantiles_ms(seconds)["median"], centroids

    rows, note = sample, ""
    if budget_s is not None and sample // 16 >= k:
        probe_s, c0 = kmeans_pp(kind, sample // 16, 1)  # k-means++ costs ~ rows * k * (2 + ln k) * d
        if 16 * probe_s > budget_s:
            rows = max(sample // 16, int(sample * budget_s / (16 * probe_s)))
            note = f"k-means++ on {rows} of its default {sample} points: ~{16 * probe_s:.0f} s would exceed the budget"
            log.warning("%s: %s", shape.key, note)
    init_s, c0 = kmeans_pp(kind, rows, repeat)
    out: dict[str, dict[str, Any]] = {
        "kclip": {"init_seconds": init_s, "init_objective": _objective(x32, c0), "init_sample": rows}
    }
    log.info("%s: kclip k-means++ on %d points: %.3f s", shape.key, rows, init_s)
    if "reference" in providers:
        init_s, c = kmeans_pp("reference", rows, 1)  # the float64 fallback: slow, timed once
        out["reference"] = {"init_seconds": init_s, "init_objective": _objective(x32, c), "init_sample": rows}
    if "torch-chunked" in providers:
        skipped["torch-chunked init"] = "the reference k-means++ runs on the host in float64: too slow at this size"
    if "sklearn" in providers:
        from sklearn.cluster import kmeans_plusplus

        xh = _host_f32(xs[:rows])
        seconds = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            c, _ = kmeans_plusplus(xh, k, random_state=seed)  # n_local_trials = 2 + int(ln k), as kclip
            seconds.append(time.perf_counter() - t0)
        init_s = quantiles_ms(seconds)["median"]
        out["sklearn"] = {"init_seconds": init_s, "init_objective": _objective(x32, c), "init_sample": rows}
        log.info("%s: sklearn kmeans_plusplus: %.3f s", shape.key, init_s)
    if note:
        for record in out.values():
            record["init_note"] = note
    return c0, out, skipped


def gemm_floor(shape: Shape, kind: str) -> dict[str, Any]:
    """Measured matmul rates (GFLOP/s) on a [rows, D] x [D, K] product, and the one that sets the floor."""
    rows, d, k = min(shape.n, FLOOR_ROWS[kind]), shape.d, shape.k
    flops = 2.0 * rows * d * k
    rates: dict[str, float] = {}
    if kind == "cpu":
        a, b = torch.randn(rows, d), torch.randn(d, k)
        out = torch.empty(rows, k)
        rates["torch.matmul float32"] = flops / time_cpu(lambda: torch.matmul(a, b, out=out), repeat=5)["median"] / 1e6
        an, bn, on = a.numpy(), b.numpy(), out.numpy()
        rates["numpy.matmul float32"] = flops / time_cpu(lambda: np.matmul(an, bn, out=on), repeat=5)["median"] / 1e6
        source = max(rates, key=rates.__getitem__)
        same = {"float32": rates[source]}
    else:
        same = {}
        for dtype in (torch.bfloat16, torch.float32):
            a = torch.randn(rows, d, device="cuda", dtype=dtype)
            b = torch.randn(d, k, device="cuda", dtype=dtype)
            out = torch.empty(rows, k, device="cuda", dtype=dtype)
            name = str(dtype).removeprefix("torch.")
            rate = flops / time_gpu(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out))["median"] / 1e6
            rates[f"torch.matmul {name}"] = same[name] = rate
            del a, b, out
        source = "torch.matmul bfloat16"
    log.info("%s: matmul %s", shape.key, ", ".join(f"{s} {r:.0f} GFLOP/s" for s, r in rates.items()))
    return {"rows": rows, "gflops": rates, "floor_source": source, "floor_gflops": rates[source], "same_dtype": same}


# ---- one provider on one shape --------------------------------------------------------------------------------


class Budget:
    """Shares a wall-clock budget (None: unlimited) between the rows still to run."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.rows_left = 1

    def share(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic()) / max(1, self.rows_left)


def _timed(fn: Callable[[], Fit]) -> tuple[Fit, float]:
    cuda_sync()
    t0 = time.perf_counter()
    fit = fn()
    cuda_sync()
    return fit, time.perf_counter() - t0


def run_provider(
    p: Provider, x: Any, c0: np.ndarray, shape: Shape, dtype: str, kind: str, repeat: int, budget: Budget
) -> dict[str, Any]:
    """Warm up (or probe), plan within the budget, fit `repeat` times; returns the result row."""
    n, k = shape.n, shape.k
    share = budget.share()
    n_probe = min(n, max(k, n // 16 if share is not None else 4096))
    # The warm-up pays the first-call costs (thread pools, CUDA modules, cuBLAS handles); with n_iter=1 it is two
    # assignment passes over n_probe rows, which estimates one pass over all n.
    probe, probe_wall = _timed(lambda: p.fit(x[:n_probe], c0, 1))
    pass_s = probe_wall / 2 * n / n_probe
    n_run, n_iter, reps, note = n, shape.n_iter, repeat, ""
    if share is not None:
        passes = max(0.0, share - probe_wall) / max(pass_s, 1e-9)
        if passes >= shape.n_iter + 1:
            reps = max(1, min(repeat, int(passes // (shape.n_iter + 1))))
        elif passes >= 3:
            n_iter, note = int(passes) - 1, "n_iter cut to fit the time budget"
        else:
            n_iter, n_run, note = 2, max(k, int(n * passes / 3)), "n and n_iter cut to fit the time budget"
        log.info("%s %s %s: ~%.2f s per pass over %d points, budget %.1f s", p.name, shape.key, dtype, pass_s, n, share)
    fits, walls, mem = [], [], {"peak_mem_mib": None, "mem_method": None}
    if n_run <= n_probe and n_run < n:
        fits, walls, n_run, n_iter, note = [probe], [probe_wall], n_probe, 1, "the warm-up probe only: over budget"
    else:
        xr = x[:n_run]
        for r in range(reps):
            if r == 0 and kind == "cuda":
                with peak_memory(kind) as mem:
                    fit, wall = _timed(lambda: p.fit(xr, c0, n_iter))
            else:
                fit, wall = _timed(lambda: p.fit(xr, c0, n_iter))
            fits.append(fit)
            walls.append(wall)
        if kind == "cpu":  # an untimed fit: seeing the host peak makes every allocation fault its pages in
            with peak_memory(kind) as mem:
                p.fit(xr, c0, n_iter)
    return _result_row(p, shape, dtype, fits, walls, mem, n_run, n_iter, note)


def run_providers_interleaved(
    providers: list[Provider], x: Any, c0: np.ndarray, shape: Shape, dtype: str, kind: str, repeat: int
) -> list[dict[str, Any]]:
    """run_provider for several providers without a time budget, their fits taken in turn (a, b, c, a, b, c, ...)
    so that a drift of the machine's speed over the run (this 2-core VM's varies by a quarter over minutes) hits
    every provider alike instead of whichever ran during the slow minute. A provider that fails is left out of the
    rows and its error returned in its place."""
    n_probe = min(shape.n, max(shape.k, 4096))
    fits: dict[str, list[Fit]] = {}
    walls: dict[str, list[float]] = {}
    failed: dict[str, Exception] = {}
    for p in providers:  # the warm-ups: first-call costs
        try:
            p.fit(x[:n_probe], c0, 1)
            fits[p.name], walls[p.name] = [], []
        except Exception as exc:
            failed[p.name] = exc
    for _ in range(repeat):
        for p in providers:
            if p.name in failed:
                continue
            time.sleep(QUIET_S)
            try:
                fit, wall = _timed(lambda p=p: p.fit(x, c0, shape.n_iter))
            except Exception as exc:
                failed[p.name] = exc
                continue
            fits[p.name].append(fit)
            walls[p.name].append(wall)
    rows = []
    for p in providers:
        if p.name in failed:
            rows.append(failed[p.name])
            continue
        mem = {"peak_mem_mib": None, "mem_method": None}
        if kind == "cpu":  # as in run_provider: one more, untimed, fit for the host peak
            with peak_memory(kind) as mem:
                p.fit(x, c0, shape.n_iter)
        rows.append(_result_row(p, shape, dtype, fits[p.name], walls[p.name], mem, shape.n, shape.n_iter, ""))
    return rows


def _result_row(
    p: Provider,
    shape: Shape,
    dtype: str,
    fits: list[Fit],
    walls: list[float],
    mem: dict[str, Any],
    n_run: int,
    n_iter: int,
    note: str,
) -> dict[str, Any]:
    k = shape.k
    per_iter = quantiles_ms([f.seconds / max(f.updates, 1) for f in fits])
    flops = 2.0 * n_run * shape.d * k
    return {
        "provider": p.name,
        "backend": fits[-1].backend,
        "n": n_run,
        "d": shape.d,
        "k": k,
        "dtype": dtype,
        "compute_dtype": p.compute_dtype(dtype),
        "init": shape.init,
        "n_iter": n_iter,
        "updates": fits[-1].updates,
        "n_requested": shape.n,
        "n_iter_requested": shape.n_iter,
        "repeat": len(fits),
        "seconds_per_iter": per_iter["median"],
        "seconds_per_iter_p20": per_iter["p20"],
        "seconds_per_iter_p80": per_iter["p80"],
        "fit_seconds": quantiles_ms(walls)["median"],
        "objective": fits[-1].objective,
        "gflops": flops / per_iter["median"] / 1e9,
        **mem,
        "threads": p.threads,
        "note": note,
    }


def _finish_row(row: dict[str, Any], floor: dict[str, Any], init: dict[str, Any] | None) -> None:
    flops = 2.0 * row["n"] * row["d"] * row["k"]
    row["floor_seconds"] = flops / (floor["floor_gflops"] * 1e9)
    row["floor_source"] = floor["floor_source"]
    row["floor_gflops"] = floor["floor_gflops"]
    row["over_floor"] = row["seconds_per_iter"] / row["floor_seconds"]
    same = floor["same_dtype"].get(row["compute_dtype"])
    row["floor_seconds_same_dtype"] = flops / (same * 1e9) if same else None
    for key in ("init_seconds", "init_objective", "init_sample"):
        row[key] = init[key] if init else None
    if init and init.get("init_note"):
        row["note"] = "; ".join(filter(None, (row["note"], init["init_note"])))


def _compare_objectives(rows: list[dict[str, Any]]) -> None:
    """objective_rel_diff = (objective - kclip's) / kclip's, between rows that ran the same n and n_iter."""
    ref = next((r for r in rows if r["provider"] == "kclip"), None)
    for r in rows:
        same = ref is not None and (r["n"], r["n_iter"]) == (ref["n"], ref["n_iter"])
        r["objective_rel_diff"] = (r["objective"] - ref["objective"]) / ref["objective"] if same else None


# ---- main -----------------------------------------------------------------------------------------------------

TABLE = (
    ("provider", "provider", ""),
    ("n", "n", ""),
    ("d", "d", ""),
    ("k", "k", ""),
    ("dtype", "dtype", ""),
    ("upd", "updates", ""),
    ("s/iter", "seconds_per_iter", ".4g"),
    ("p20", "seconds_per_iter_p20", ".4g"),
    ("p80", "seconds_per_iter_p80", ".4g"),
    ("init s", "init_seconds", ".4g"),
    ("objective", "objective", ".7g"),
    ("rel diff", "objective_rel_diff", "+.1e"),
    ("GFLOP/s", "gflops", ".4g"),
    ("floor s", "floor_seconds", ".3g"),
    ("x floor", "over_floor", ".3g"),
    ("peak MiB", "peak_mem_mib", ".0f"),
    ("thr", "threads", ""),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--repeat", type=int, default=None, help="measured fits per row (default 3 CPU, 1 CUDA)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget for the whole run; rows shrink to fit it (default 140 on CUDA, none on the CPU)",
    )
    parser.add_argument("--providers", default=None, help="comma-separated subset of the providers to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="all of one provider's fits before the next provider's (the default without a budget takes the "
        "providers' fits in turn; with a budget the run is always sequential, each row planned within it)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every instruction set it tries

    kind, why_not = resolve_device(args.device)
    out = output_path(args, "bench_kmeans", kind)
    mode = "smoke" if args.smoke else kind
    shapes = SHAPES[mode]
    repeat = args.repeat or REPEAT[mode]
    budget_s = args.budget_s if args.budget_s is not None else (None if args.smoke else BUDGET_S.get(kind))
    budget = Budget(budget_s)
    meta: dict[str, Any] = {
        "script": "bench_kmeans",
        "device_kind": kind,
        "smoke": args.smoke,
        "repeat": repeat,
        "budget_s": budget_s,
        "seed": args.seed,
        "shapes": [dataclasses.asdict(s) for s in shapes],
        "dtypes": list(DTYPES[kind]),
        "skipped": {},
        "gemm_floor": {},
    }
    meta["order"] = "interleaved" if budget.deadline is None and not args.sequential else "sequential"
    rows: list[dict[str, Any]] = []
    if why_not:
        return refuse_device(out, meta, args.device, why_not)

    wanted = PROVIDERS[kind] if args.providers is None else tuple(args.providers.split(","))
    providers: dict[str, Provider] = {}
    for name in wanted:
        try:
            providers[name] = setup_provider(name, kind)
        except Unavailable as exc:
            meta["skipped"][name] = str(exc)
            log.warning("skipping %s: %s", name, exc)
    meta["providers"] = list(providers)
    budget.rows_left = sum(
        1 for _ in shapes for dtype in DTYPES[kind] for p in providers.values() if not p.accepts(dtype)
    )

    for shape in shapes:
        x32 = make_points(shape, kind, args.seed)  # [n, d] float32
        init_budget = None if budget.deadline is None else min(40.0, 0.25 * (budget.deadline - time.monotonic()))
        init_repeat = 1 if budget_s else repeat
        try:
            c0, inits, skipped = initial_centroids(shape, x32, kind, providers, args.seed, init_repeat, init_budget)
        except Exception as exc:  # a broken k-means++ must not cost the Lloyd rows: start from random points
            log.exception("%s: k-means++ failed", shape.key)
            idx = np.sort(np.random.default_rng(args.seed).choice(shape.n, size=shape.k, replace=False))
            c0, inits = _host_f32(_take(x32, idx)), {}
            skipped = {"init": f"k-means++ failed ({type(exc).__name__}: {exc}); Lloyd starts from random points"}
        meta["skipped"].update({f"{name} {shape.key}": why for name, why in skipped.items()})
        floor = meta["gemm_floor"][shape.key] = gemm_floor(shape, kind)
        for dtype in DTYPES[kind]:
            x = x32 if dtype == "float32" else x32.to(getattr(torch, dtype))
            group: list[dict[str, Any]] = []
            accepted = []
            for p in providers.values():
                if why := p.accepts(dtype):
                    meta["skipped"][f"{p.name} {dtype}"] = why
                else:
                    accepted.append(p)
            if meta["order"] == "interleaved":
                log.info("%s %s: %s, fits in turn ...", shape.key, dtype, ", ".join(p.name for p in accepted))
                results = run_providers_interleaved(accepted, x, c0, shape, dtype, kind, repeat)
            else:
                results = None
            for i, p in enumerate(accepted):
                try:
                    if results is not None:
                        row = results[i]
                        if isinstance(row, Exception):
                            raise row
                    else:
                        log.info("%s %s %s ...", p.name, shape.key, dtype)
                        row = run_provider(p, x, c0, shape, dtype, kind, repeat, budget)
                except Exception as exc:  # one provider failing must not lose the others' rows
                    log.error("%s %s %s failed", p.name, shape.key, dtype, exc_info=exc)
                    meta["skipped"][f"{p.name} {shape.key} {dtype}"] = f"failed: {type(exc).__name__}: {exc}"
                    continue
                finally:
                    budget.rows_left -= 1
                _finish_row(row, floor, inits.get(p.name))
                group.append(row)
                _compare_objectives(group)
                log.info(
                    "%s %s %s: %.4f s/iter (%.2fx floor), objective %.6g",
                    p.name,
                    shape.key,
                    dtype,
                    row["seconds_per_iter"],
                    row["over_floor"],
                    row["objective"],
                )
                write_rows(out, rows + group, meta)  # after every row: a timeout keeps what was measured
            rows += group
            del x
        del x32
        if kind == "cuda":
            torch.cuda.empty_cache()

    write_rows(out, rows, meta)
    print(format_table(rows, TABLE))
    for r in rows:
        if r["note"]:
            print(f"note {r['provider']} {r['n']}x{r['d']}x{r['k']} {r['dtype']}: {r['note']}")
    for key, why in meta["skipped"].items():
        print(f"skipped {key}: {why}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
