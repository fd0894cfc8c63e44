"""Data: the embedded synthetic dataset, readers of webdataset shards, CSV, AWA2 and CUB, the DALI pipeline and
its CPU twin.

Importing kclip.data loads nothing heavy (no DALI, torchvision, PIL or torch): each name below is imported from
its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "kclip.data.shards",
    "resolve_shards": "kclip.data.shards",
    "Grammar": "kclip.data.synth",
    "index_dataset": "kclip.data.index",
    "inspect_dataset": "kclip.data.index",
    "indexed_shards": "kclip.data.index",
    "TransformConfig": "kclip.data.transforms",
    "CsvSpec": "kclip.data.csvfile",
    "build_loader": "kclip.data.pipeline",
    "detect_format": "kclip.data.pipeline",
    "read_awa2": "kclip.data.awa2",
    "read_cub": "kclip.data.cub",
    "read_synth": "kclip.data.synth_attributes",
    "AttributeData": "kclip.data.attributes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kclip.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
