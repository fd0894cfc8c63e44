"""Helpers shared by every benchmark script: environment record, timing, peak memory, JSON output, CLI flags.

Every `bench/bench_<op>.py` imports this module as `_common` (the script's own folder is first on sys.path when it
runs as `python bench/bench_<op>.py`), keeps its own shared list of shapes, and writes one JSON file
{"meta": {...environment()..., ...}, "rows": [...]}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kclip._atomic import atomic_path

if TYPE_CHECKING:
    import torch

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# Distributions whose versions every result carries (those not installed are left out).
_VERSIONED = (
    "kclip",
    "torch",
    "triton",
    "numpy",
    "scikit-learn",
    "faiss-cpu",
    "faiss-gpu",
    "faiss-gpu-cu12",
    "faiss-gpu-cu11",
    "open_clip_torch",
    "nvidia-dali-cuda130",
    "cupy-cuda13x",
)
# Environment variables that change what a benchmark measures (thread pools, BLAS kernels, kclip switches).
_RECORDED_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "OMP_WAIT_POLICY",
    "CUDA_VISIBLE_DEVICES",
    "TRITON_INTERPRET",
    "KCLIP_REQUIRE_COMPILED",
    "KCLIP_CPU_ONLY",
)


# ---- environment ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _versions() -> dict[str, str]:
    out = {}
    for dist in _VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def git_revision() -> str:
    """`git rev-parse --short HEAD` of the repository, with "+dirty" for uncommitted changes; "unknown" outside a
    checkout (the device machine gets the working tree without .git)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "") if rev else "unknown"


@functools.cache
def _static_environment() -> dict[str, Any]:
    import torch

    cores = cpu_cores()
    return {
        "cpu": f"{cpu_model()} ({cores} cores)",
        "cpu_cores": cores,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),  # OS and kernel, no host name
        "versions": _versions(),
        "git_revision": git_revision(),
        "env": {k: os.environ[k] for k in _RECORDED_ENV if k in os.environ},
    }


def environment(device_kind: str | None = None) -> dict[str, Any]:
    """Where a benchmark ran: device, versions, git revision and a UTC timestamp (no host name).

    Args:
        device_kind: "cpu" or "cuda", the kind benchmarked; None picks "cuda" when torch sees a GPU.

    Returns:
        dict with `device` (the GPU's name for "cuda", else the CPU model and core count), `device_kind`, `cpu`,
        `gpu`, `versions`, `git_revision`, `timestamp` and a few more (thread counts, relevant environment).
    """
    static = _static_environment()
    kind = device_kind or ("cuda" if static["gpu"] else "cpu")
    device = static["gpu"] if kind == "cuda" and static["gpu"] else static["cpu"]
    return {
        "device": device,
        "device_kind": kind,
        **static,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # Other work on the machine skews CPU timings: the 1-minute load average when the record was made.
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ---- timing ---------------------------------------------------------------------------------------------------


def quantiles_ms(samples_ms: Sequence[float]) -> dict[str, float]:
    """{"median", "p20", "p80"} of timing samples (any unit; the callers use ms)."""
    q = np.percentile(np.asarray(samples_ms, dtype=np.float64), [50, 20, 80])
    return {"median": float(q[0]), "p20": float(q[1]), "p80": float(q[2])}


def time_gpu(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> dict[str, float]:
    """Time a CUDA callable with CUDA events through `triton.testing.do_bench` (it clears the L2 cache between
    runs and synchronises). Returns {"median", "p20", "p80"} in ms."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median": float(median), "p20": float(p20), "p80": float(p80)}


def time_cpu(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Time a host callable with time.perf_counter: `warmup` untimed calls, then `repeat` timed ones.
    Returns {"median", "p20", "p80"} in ms over the repeats."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles_ms(samples)


def cuda_sync() -> None:
    """torch.cuda.synchronize() where a GPU is in use; a no-op elsewhere (never initialises CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---- peak memory ----------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    return None


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL("libc.so.6")


def _release_free_heap() -> None:
    """Make the next peak visible in RSS even where it reuses memory already freed by this process (glibc only).

    glibc serves an allocation from memory the process freed before asking the OS for more, and by default raises
    its mmap threshold (up to 32 MiB) after the first large free, so arrays of a previous fit sit freed in the heap
    and a second fit's would show no RSS growth. Fixing the threshold at 128 KiB (large arrays get their own mmap,
    returned on free) and trimming the heap (free pages go back to the OS) makes every allocation fault its pages in
    again, as in a fresh process: slower, so peak_memory's body should not be the timed run. A no-op off glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)


def _steady_heap() -> None:
    """Undo _release_free_heap's page-faulting setting: glibc as after its dynamic threshold has grown to its
    maximum (large arrays reuse the heap), so that the runs timed after a memory measurement are not slowed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD, glibc's dynamic maximum on 64-bit
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD, twice that, as the dynamic rule sets it


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process: Linux >= 4.0, `echo 5 > /proc/self/clear_refs`."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class _RssSampler(threading.Thread):
    """Polls psutil's RSS every few ms: catches peaks longer than the period, misses shorter ones."""

    def __init__(self, period_s: float = 0.005):
        super().__init__(daemon=True)
        import psutil

        self._proc, self._period = psutil.Process(), period_s
        self._stop_event = threading.Event()
        self.peak = self._proc.memory_info().rss

    def run(self) -> None:
        while not self._stop_event.wait(self._period):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self._proc.memory_info().rss)


@contextlib.contextmanager
def peak_memory(device_kind: str) -> Iterator[dict[str, Any]]:
    """Peak memory used by the body beyond what was held when it started, in MiB.

    Yields a dict filled on exit with `peak_mem_mib` and `mem_method`:
      - "cuda.max_memory_allocated": torch's caching allocator on the current GPU (memory that libraries allocate
        outside torch, faiss-gpu for one, is not seen);
      - "vmhwm": the process's peak RSS, exact: the kernel's mark is reset first (Linux /proc/self/clear_refs);
      - "psutil-sampled": RSS polled every 5 ms (a lower bound);
      - "ru_maxrss": growth of the process's lifetime peak RSS (a lower bound, 0 when an earlier peak was higher).
    Host RSS covers every allocator (numpy, BLAS, OpenMP, C++), which tracemalloc would not; memory the process
    freed earlier is handed back to the OS first (see _release_free_heap) so that reusing it still counts.
    """
    out: dict[str, Any] = {"peak_mem_mib": None, "mem_method": None}
    if device_kind == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out.update(
            peak_mem_mib=(torch.cuda.max_memory_allocated() - base) / 2**20, mem_method="cuda.max_memory_allocated"
        )
        return
    _release_free_heap()
    try:
        if _reset_peak_rss():
            base = _status_kib("VmRSS") or 0
            yield out
            out.update(peak_mem_mib=max(0, (_status_kib("VmHWM") or 0) - base) / 1024, mem_method="vmhwm")
            return
        yield from _fallback_peak(out)
    finally:
        _steady_heap()


def _fallback_peak(out: dict[str, Any]) -> Iterator[dict[str, Any]]:
    try:
        sampler = _RssSampler()
    except ImportError:
        sampler = None
    if sampler is not None:
        base = sampler.peak
        sampler.start()
        try:
            yield out
        finally:
            peak = sampler.stop()
        out.update(peak_mem_mib=max(0, peak - base) / 2**20, mem_method="psutil-sampled")
        return
    kib = 1 if sys.platform != "darwin" else 1 / 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield out
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    out.update(peak_mem_mib=grown * kib / 1024, mem_method="ru_maxrss")


# ---- output ---------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write {"meta": environment() + meta, "rows": rows} as JSON, atomically (temporary file in the same folder,
    then renamed), so that a run killed half-way leaves the previous complete file. Each row is stamped with
    the device and git revision so that rows from several files can be pooled.

    Args:
        path: the JSON file; its folder is created.
        rows: result rows, JSON-serialisable dicts.
        meta: script-level facts (shapes, skipped providers and why, flags); `device_kind` picks the device named.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment(meta.get("device_kind"))
    stamped = [{"device": env["device"], "git_revision": env["git_revision"], **row} for row in rows]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump({"meta": {**env, **meta}, "rows": stamped}, f, indent=1, default=_json_default)
        f.write("\n")
    return path


# ---- command line ---------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--smoke (tiny shapes, few repeats: what CI runs on the CPU), --out PATH, --device {auto,cpu,cuda}."""
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes and a few repeats: a CPU check that the script works"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default bench/results/<script>-<device kind>.json; -smoke.json with --smoke)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda where torch sees a GPU"
    )
    return parser


def refuse_device(path: str | os.PathLike, meta: dict[str, Any], device: str, why_not: str) -> int:
    """Record that the asked-for device cannot run here (an empty result with the reason) and return exit code 1."""
    meta.setdefault("skipped", {})[meta.get("device_kind") or device] = why_not
    write_rows(path, [], meta)
    logging.getLogger("bench").error("--device %s: %s (wrote %s)", device, why_not, path)
    return 1


def resolve_device(choice: str) -> tuple[str, str]:
    """("cpu" | "cuda", reason) for --device: "auto" picks cuda where torch sees a GPU. For an explicit "cuda" that
    cannot run, returns ("cuda", why) so the caller can record the skip; the reason is "" when usable."""
    import torch

    if choice == "cpu":
        return "cpu", ""
    if torch.cuda.is_available():
        return "cuda", ""
    if choice == "auto":
        return "cpu", ""
    return "cuda", "torch sees no CUDA device (a CPU-only torch build, or no GPU here)"


def output_path(args: argparse.Namespace, script: str, device_kind: str) -> Path:
    """--out, or bench/results/<script>-<device kind>.json (-smoke.json for --smoke, so CI never overwrites the
    measured results)."""
    if args.out is not None:
        return Path(args.out)
    return RESULTS / f"{script}-{device_kind}{'-smoke' if args.smoke else ''}.json"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: columns are (header, row key, format spec); missing values print as "-"."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, spec) if spec else str(value)

    table = [[h for h, _, _ in columns]] + [[cell(r, k, s) for _, k, s in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def finish(out: str | os.PathLike, rows: Sequence[dict[str, Any]], meta: dict[str, Any], start: float,
           columns: Sequence[tuple[str, str, str]]) -> None:  # fmt: skip
    """The end of a benchmark: total time into meta, the JSON written, the table, the skipped providers, the path."""
    meta["total_s"] = time.perf_counter() - start
    write_rows(out, rows, meta)
    print(format_table(rows, columns))
    for key, why in meta["skipped"].items():
        print(f"skipped {key}: {why}")
    print(f"wrote {out}")


# ---- floors of model passes ---------------------------------------------------------------------------------------


def compute_dtype(precision: str, kind: str) -> torch.dtype:
    """The dtype the matmuls of `precision` run in (kclip.train.loop.autocast_for's rule)."""
    import torch

    if precision in ("amp_bf16", "amp_bfloat16", "bf16", "pure_bf16"):
        return torch.bfloat16
    if precision in ("fp16", "pure_fp16") or (precision == "amp" and kind == "cuda"):
        return torch.float16
    return torch.bfloat16 if precision == "amp" else torch.float32


def matmul_rate(model: str, batch: int, dtype: torch.dtype, kind: str) -> dict[str, Any]:
    """Measured FLOP/s of the vision tower's first MLP product, [B x tokens, width] x [width, 4 width]."""
    import open_clip
    import torch

    from kclip.models import register_model_configs

    register_model_configs()
    v = open_clip.get_model_config(model)["vision_cfg"]
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    rows, width, mlp = batch * tokens, v["width"], int(v["width"] * v.get("mlp_ratio", 4.0))
    a = torch.randn(rows, width, dtype=dtype, device=kind)
    w = torch.randn(mlp, width, dtype=dtype, device=kind)
    fn = lambda: torch.nn.functional.linear(a, w)
    t = time_gpu(fn) if kind == "cuda" else time_cpu(fn, repeat=20, warmup=3)
    rate = 2 * rows * width * mlp / (t["median"] * 1e-3)
    return {"shape": [rows, width, mlp], "dtype": str(dtype).removeprefix("torch."), "gflops": rate / 1e9}
