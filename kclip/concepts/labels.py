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
        meta: meta.json; k: concepts; keys: S{L} [N] sorted sample keys (those of the split fitted on);
        centroids: float32 [K, D]; embed_dim: E, the CLIP embedding width classifier C reads.
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
        embed_dim = self.meta.get("embed_dim")  # recorded since the split-aware fit; before, only in classifier.pt
        if embed_dim is None:
            from kclip.concepts.classifier import load_classifier

            embed_dim = load_classifier(self.root / "classifier.pt").config.embed_dim
        self.embed_dim = int(embed_dim)

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

    def topk(self, keys: Sequence[str] | np.ndarray, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Soft labels of `keys` in the top-k form of `kclip.losses.soft_label_cross_entropy`: (indices int64
        [B, T], weights float32 [B, T]), by descending weight, each row's weights summing to 1.

        Args:
            keys: sample keys.
            top_k: T; None: the stored top_k (top-k labels) or all K (dense labels). A T below the stored one
                keeps the T largest weights, renormalised.

        Raises:
            ConceptsError: a key without a label, or a T beyond what is stored.
        """
        idx = self.index_of(keys)
        stored = self.k if self.meta["labels"] == "dense" else int(self.meta["top_k"])
        t = stored if top_k is None else top_k
        if not 1 <= t <= stored:
            raise ConceptsError(
                f"{self.root}: top_k {t} outside [1, {stored}] ({self.meta['labels']} labels"
                + (f", top-{stored} stored); refit with a larger --top-k" if self.meta["labels"] == "topk" else ")")
            )
        if self.meta["labels"] == "dense":
            dense = np.asarray(self._dense[idx], dtype=np.float32)
            order = np.argsort(-dense, axis=1, kind="stable")[:, :t]
            weights = np.take_along_axis(dense, order, axis=1)
        else:
            order = np.asarray(self._idx[idx, :t], dtype=np.int64)
            weights = np.asarray(self._w[idx, :t], dtype=np.float32)
        weights = weights / np.maximum(weights.sum(1, keepdims=True), np.finfo(np.float32).tiny)
        return order.astype(np.int64), weights

    def check_embed_dim(self, width: int, what: str = "the CLIP model") -> None:
        """Raise ConceptsError unless classifier C reads `width`-wide image features (`what` names their source)."""
        if int(width) != self.embed_dim:
            raise ConceptsError(
                f"{self.root}: classifier C reads {self.embed_dim}-d image features (fitted with --embed-dim "
                f"{self.embed_dim}), but {what} has a {width}-d embedding; refit the concepts with "
                f"`kclip concepts fit --embed-dim {width}` or choose a model of width {self.embed_dim}"
            )

    def classifier(self, map_location="cpu", *, embed_dim: int | None = None, what: str = "the CLIP model"):
        """The frozen concept classifier C (kclip.concepts.classifier.ConceptClassifier); with `embed_dim`, first
        checks that it matches C's input width (check_embed_dim)."""
        from kclip.concepts.classifier import load_classifier

        if embed_dim is not None:
            self.check_embed_dim(embed_dim, what)
        return load_classifier(self.root / "classifier.pt", map_location)
