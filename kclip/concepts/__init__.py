"""Offline concepts of Knowledge-CLIP: k-means over the teacher's caption embeddings, soft concept labels per
sample, and the frozen concept classifier C.

Importing kclip.concepts loads nothing heavy: each name below is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Concepts": "kclip.concepts.labels",
    "ConceptsError": "kclip.concepts.fit",
    "fit_concepts": "kclip.concepts.fit",
    "temperature_from_data": "kclip.concepts.fit",
    "to_space": "kclip.concepts.fit",
    "ClassifierConfig": "kclip.concepts.classifier",
    "ConceptClassifier": "kclip.concepts.classifier",
    "load_classifier": "kclip.concepts.classifier",
    "train_classifier": "kclip.concepts.classifier",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kclip.concepts' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
