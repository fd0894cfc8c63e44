"""The frozen LLM teacher: pooled caption embeddings from a Llama-family model, stored once per dataset.

Importing kclip.teacher loads nothing heavy (no transformers): each name below is imported from its module on first
use.
"""

from __future__ import annotations

import importlib
from typing import Any

# Choices of `kclip teacher embed`, here so that building the command line imports no torch.
DEFAULT_MODEL = "smollm2"
POOLINGS = ("mean", "last")
DTYPE_NAMES = ("bf16", "fp16", "fp32")

_EXPORTS = {
    "Embedder": "kclip.teacher.model",
    "Teacher": "kclip.teacher.model",
    "TeacherError": "kclip.teacher.model",
    "load_teacher": "kclip.teacher.model",
    "missing_model": "kclip.teacher.model",
    "pool_hidden": "kclip.teacher.model",
    "smollm2_gguf": "kclip.teacher.model",
    "StoreError": "kclip.teacher.store",
    "TeacherStore": "kclip.teacher.store",
    "finalize": "kclip.teacher.store",
    "embed": "kclip.teacher.embed",
    "caption_source": "kclip.teacher.captions",
    "iter_captions": "kclip.teacher.captions",
}

__all__ = sorted([*_EXPORTS, "DEFAULT_MODEL", "POOLINGS", "DTYPE_NAMES"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kclip.teacher' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
