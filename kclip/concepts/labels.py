"""Reading a concepts directory: soft labels joined by sample key, the centroids, the frozen classifier C."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kclip.concepts.fit import ConceptsError, read_meta


class Concepts:
    """A concepts directory written by `kclip concepts fit` (docs/contracts.md), memory-mapped.

    Attributes:
        meta: meta.json; k: concepts; keys: S{L} [N] sorted sample keys; centroids: float32 [K, D].
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.k = int(self.meta["k"])
        self.keys = np.load(self.root / "keys.npy", mmap_mode="r")
        self.centroids = np.load(self.root / "centroids.npy")
        if self.meta["labels"] == "dense":
            self._dense = np.load(self.root / "labels.npy", mmap_mode="r")
        else:
            self._idx = np.load(self.root / "topk_index.npy", mmap_mode="r")
            self._w = np.load(self.root / "topk_weight.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.keys)

    def index_of(self, keys: Sequence[str] | np.ndarray) -> np.ndarray:
        """Rows of `keys` (binary search); raises ConceptsError for a key the labels do not cover."""
        q = np.asarray(keys)
        q = q if q.dtype.kind == "S" else np.char.encode(q.astype(str), "ascii")
        long = np.char.str_len(q) > self.keys.dtype.itemsize
        q = q.astype(self.keys.dtype)
        idx = np.searchsorted(self.keys, q)
        ok = (idx < len(self.keys)) & ~long
        ok[ok] = self.keys[idx[ok]] == q[ok]
        if not ok.all():
            raise ConceptsError(
                f"{self.root}: {int((~ok).sum())} keys have no concept label (e.g. {q[~ok][0].decode()!r}); the "
                "concepts were fitted on another teacher store"
            )
        return idx

    def labels(self, keys: Sequence[str] | np.ndarray) -> np.ndarray:
        """Dense float32 soft labels [B, K] of `keys` (top-k labels scattered into K columns)."""
        idx = self.index_of(keys)
        if self.meta["labels"] == "dense":
            return np.asarray(self._dense[idx], dtype=np.float32)
        out = np.zeros((len(idx), self.k), dtype=np.float32)
        np.put_along_axis(out, np.asarray(self._idx[idx], dtype=np.int64), np.asarray(self._w[idx], np.float32), 1)
        return out

    def classifier(self, map_location="cpu"):
        """The frozen concept classifier C (kclip.concepts.classifier.ConceptClassifier)."""
        from kclip.concepts.classifier import load_classifier

        return load_classifier(self.root / "classifier.pt", map_location)
