"""The Knowledge-CLIP model: an open_clip CLIP, the distillation head W_e and the frozen concept classifier C.

Importing kclip.models loads nothing heavy: each name below is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# open_clip's precisions (open_clip_train's --precision), here so that building the command line imports no torch: amp*
# keep fp32 weights under autocast; fp16/bf16 cast the weights except the LayerNorms; pure_* cast everything.
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")

_EXPORTS = {
    "KnowledgeCLIP": "kclip.models.knowledge_clip",
    "ModelError": "kclip.models.knowledge_clip",
    "build_model": "kclip.models.knowledge_clip",
    "make_distill_head": "kclip.models.knowledge_clip",
    "missing_pretrained": "kclip.models.knowledge_clip",
    "model_embed_dim": "kclip.models.knowledge_clip",
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
