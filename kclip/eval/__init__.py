"""Evaluation of Knowledge-CLIP and its baselines: retrieval and zero-shot classification (CLIP_benchmark's JSON),
attribute probes (AWA2, CUB, the synthetic set) and text-encoder exact match by caption reconstruction; one module
per task, orchestrated by kclip.eval.runner (`kclip eval`)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalError": "kclip.eval.errors",
    "EvalSettings": "kclip.eval.runner",
    "TASKS": "kclip.eval.names",
    "evaluate": "kclip.eval.runner",
    "Encoder": "kclip.eval.encoders",
    "load_encoder": "kclip.eval.encoders",
    "EMConfig": "kclip.eval.text_em",
    "recall_at_k": "kclip.eval.retrieval",
    "classify": "kclip.eval.zeroshot",
    "fit_probe": "kclip.eval.attributes",
    "average_precision": "kclip.eval.attributes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kclip.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
