"""The Knowledge-CLIP model: an open_clip CLIP, the distillation head W_e and the frozen concept classifier C.

Importing kclip.models loads nothing heavy: each name below is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PRECISIONS": "kclip.models.knowledge_clip",
    "KnowledgeCLIP": "kclip.models.knowledge_clip",
    "ModelError": "kclip.models.knowledge_clip",
    "build_model": "kclip.models.knowledge_clip",
    "make_distill_head": "kclip.models.knowledge_clip",
    "param_groups": "kclip.models.knowledge_clip",
    "register_model_configs": "kclip.models.knowledge_clip",
    "ExportError": "kclip.models.export",
    "export_checkpoint": "kclip.models.export",
    "strip_prefixes": "kclip.models.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kclip.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
