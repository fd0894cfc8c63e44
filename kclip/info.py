"""What `kclip info` reports: versions, and which accelerated backends can run here and why not."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton() -> dict[str, Any]:
    if importlib.util.find_spec("triton") is None:
        return {"usable": False, "why": "triton is not installed"}
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    import torch

    if interpret:
        return {"usable": True, "interpreter": True, "why": "TRITON_INTERPRET=1: kernels run on the CPU, slowly"}
    if not torch.cuda.is_available():
        return {"usable": False, "interpreter": False, "why": "no CUDA device (set TRITON_INTERPRET=1 to interpret)"}
    return {"usable": True, "interpreter": False, "why": ""}


def _dali() -> dict[str, Any]:
    try:
        spec = importlib.util.find_spec("nvidia.dali")
    except ModuleNotFoundError:  # no nvidia namespace package at all
        spec = None
    if spec is None:
        return {"usable": False, "why": "nvidia-dali is not installed (pip install 'kclip[gpu]')"}
    return {"usable": True, "why": "", "version": _version("nvidia-dali-cuda130")}


def _cupy() -> dict[str, Any]:
    if importlib.util.find_spec("cupy") is None:
        return {"usable": False, "why": "cupy is not installed (pip install 'kclip[gpu]')"}
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises its own CUDARuntimeError types
        return {"usable": False, "why": f"cupy imports but finds no device: {exc}"}
    return {"usable": n > 0, "why": "" if n > 0 else "no CUDA device"}


def collect() -> dict[str, Any]:
    """Everything `kclip info` prints, as a dict (also written as JSON by `kclip info --json`)."""
    import torch

    from kclip.cluster import backend_info

    km = backend_info()
    return {
        "kclip": _version("kclip"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in ("torch", "triton", "numpy", "open_clip_torch", "transformers")},
        "torch_cuda": torch.version.cuda,
        "compiled_cpu": {"usable": km["cpu"], "isa": km["cpu_isa"], "why": km["compiled_error"]},
        "compiled_cuda": {
            "usable": km["cuda_compiled"],
            "why": "" if km["cuda_compiled"] else (km["compiled_error"] or "built without a CUDA compiler"),
        },
        "cuda_device": {
            "usable": km["cuda_device"],
            "count": km["cuda_device_count"],
            "driver_version": km["driver_version"],
            "runtime_version": km["runtime_version"],
            "why": km["cuda_error"],
        },
        "triton": _triton(),
        "dali": _dali(),
        "cupy": _cupy(),
    }


def format_report(info: dict[str, Any]) -> str:
    lines = [f"kclip {info['kclip']}  (python {info['python']}, {info['platform']})"]
    lines.append("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()))
    for key in ("compiled_cpu", "compiled_cuda", "cuda_device", "triton", "dali", "cupy"):
        entry = info[key]
        mark = "yes" if entry["usable"] else "no "
        extra = {k: v for k, v in entry.items() if k not in ("usable", "why") and v not in (None, "")}
        detail = " ".join(f"{k}={v}" for k, v in extra.items())
        why = f"  ({entry['why']})" if entry.get("why") else ""
        lines.append(f"  {key:<14} {mark} {detail}{why}")
    return "\n".join(lines)
