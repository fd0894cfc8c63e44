"""`kclip concepts fit`: k-means over the teacher store, soft concept labels, the classifier C, a report.

The space. Mean-pooled LLM embeddings are strongly anisotropic: on the embedded default (SmolLM2-135M, mean
pooling, synthetic captions) the mean row has norm 33.5 against a row norm of 35.5, unrelated captions have
cosine 0.89 on average, and per-dimension spreads range over 18x (std 0.2 to 3.6), so distances in the raw space
measure a few loud dimensions. kclip clusters in the **standardized** space by default, e -> (e - mean) / std
with the store's stats: the space the text encoder is distilled into, where the mean cosine of two captions is 0.
"normalized" centres and L2-normalises the rows ((e - mean) / ||e - mean||; pair it with --spherical for cosine
k-means); "raw" uses the stored rows as they are.

The temperature. Soft labels are softmax(-||e - c_k||^2 / tau). Unless given, tau is set from the data: on up to
20000 rows, tau is the value at which the median row's largest label weight is halfway between a uniform label and
a one-hot one, 0.5 + 0.5 / K (found by bisection in log tau; the largest weight falls monotonically as tau grows).
So labels are as soft as the spread of squared distances to the nearest centroids makes them, whatever the scale
of the space or the number of concepts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kclip._atomic import atomic_path
from kclip.errors import KclipError
from kclip.teacher.store import StoreError, TeacherStore, write_json

log = logging.getLogger(__name__)

FORMAT = "kclip.concepts"
VERSION = 1
SPACES = ("standardized", "normalized", "raw")
DENSE_MAX_K = 256  # dense labels up to this many concepts, top-k beyond
DEFAULT_TOP_K = 16
TEMPERATURE_ROWS = 20000
MEMBERS_PER_CONCEPT = 5
IN_MEMORY_BYTES = 2 << 30  # float32 bytes of the mapped store kept in memory; beyond, a float16 file is streamed
CLASSIFIER_MAX_ROWS = 200_000
_CHUNK_ROWS_BYTES = 64 << 20


class ConceptsError(KclipError, ValueError):
    """Bad input to `kclip concepts fit`; the message names it."""


# ---- the space ------------------------------------------------------------------------------------------------


def to_space(rows: np.ndarray, mean: np.ndarray, std: np.ndarray, space: str) -> np.ndarray:
    """Map store rows [n, D] (any float dtype) into the concept space; float32 [n, D]."""
    x = np.asarray(rows, dtype=np.float32)
    if space == "raw":
        return x.copy() if x is rows else x
    if space == "standardized":
        return (x - mean) / std
    if space == "normalized":
        c = x - mean
        return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    raise ValueError(f"space: expected one of {SPACES}, got {space!r}")


def _chunks(n: int, width: int):
    step = max(1, _CHUNK_ROWS_BYTES // (4 * width))
    for s in range(0, n, step):
        yield s, min(n, s + step)


# ---- the temperature ------------------------------------------------------------------------------------------


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """||x_i - c_k||^2 [n, k] in float64 (a sample small enough for it), clamped at 0."""
    x, c = x.double(), c.double()
    return (x.square().sum(1, keepdim=True) - 2 * x @ c.T + c.square().sum(1)).clamp_min_(0)


def temperature_from_data(x: np.ndarray, centroids: np.ndarray) -> tuple[float, str, dict[str, float]]:
    """The data-derived tau (see the module docstring) for rows x [n, D] (a sample) and centroids [K, D].

    Returns:
        (tau, the rule in words, {"target_top1", "median_top1", "median_gap"}): median_gap is the median over rows
        of the squared-distance gap between the nearest and the second-nearest centroid.
    """
    k = centroids.shape[0]
    target = 0.5 + 0.5 / k
    rule = (
        f"median over {x.shape[0]} rows of the largest soft-label weight = 0.5 + 0.5/K = {target:.4g} "
        "(bisection in log tau)"
    )
    d = sq_distances(torch.from_numpy(x), torch.from_numpy(centroids))  # [n, K]
    gaps = d - d.min(1, keepdim=True).values  # [n, K] >= 0, 0 at the nearest
    if k == 1:
        return 1.0, "K = 1: every label is 1 whatever tau; tau = 1", {"target_top1": 1.0, "median_top1": 1.0}
    second = gaps.kthvalue(2, dim=1).values  # [n]
    median_gap = float(second.median())
    positive = gaps[gaps > 0]
    if positive.numel() == 0:
        return 1.0, "all rows equidistant from every centroid: tau = 1", {"target_top1": target, "median_top1": 1 / k}

    def median_top1(tau: float) -> float:
        return float((1.0 / torch.exp(-gaps / tau).sum(1)).median())

    scale = float(positive.median())
    lo, hi = math.log(scale * 1e-6), math.log(scale * 1e6)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if median_top1(math.exp(mid)) > target:
            lo = mid  # too hard: raise tau
        else:
            hi = mid
    tau = math.exp(0.5 * (lo + hi))
    return tau, rule, {"target_top1": target, "median_top1": median_top1(tau), "median_gap": median_gap}


# ---- fitting --------------------------------------------------------------------------------------------------


def _mapped_rows(store: TeacherStore, space: str, out: Path) -> tuple[np.ndarray, Path | None]:
    """The whole store in the concept space: in memory when it fits IN_MEMORY_BYTES as float32, else a float16
    memory-mapped file in `out` (returned to be removed). Refuses rows with NaN or inf, naming the key."""
    n, d = store.count, store.width
    on_disk = n * d * 4 > IN_MEMORY_BYTES
    tmp = out / ".space.f16" if on_disk else None
    x = np.memmap(tmp, dtype="<f2", mode="w+", shape=(n, d)) if on_disk else np.empty((n, d), dtype=np.float32)
    for s, e in _chunks(n, d):
        raw = np.asarray(store.embeddings[s:e], dtype=np.float32)
        ok = np.isfinite(raw).all(axis=1)
        if not ok.all():
            i = s + int(np.flatnonzero(~ok)[0])
            raise ConceptsError(
                f"{store.root}: the row of key {store.keys[i].decode()!r} (row {i}) holds NaN or inf; the store is "
                "damaged: embed it again"
            )
        x[s:e] = to_space(raw, store.mean, store.std, space)
    return x, tmp


def _members(labels: np.ndarray, dist: np.ndarray, k: int, per: int) -> list[np.ndarray]:
    """Per concept, the rows of its `per` members nearest to its centroid."""
    order = np.lexsort((dist, labels))  # by concept, then by distance
    starts = np.searchsorted(labels[order], np.arange(k))
    ends = np.searchsorted(labels[order], np.arange(k), side="right")
    return [order[s : min(e, s + per)] for s, e in zip(starts, ends, strict=True)]


def fit_concepts(
    store_path: str | os.PathLike,
    out: str | os.PathLike,
    k: int,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    spherical: bool = False,
    seed: int = 0,
    space: str = "standardized",
    n_iter: int = 25,
    device: str = "auto",
    data: str | os.PathLike | None = None,
    split: str | None = None,
    embed_dim: int = 512,
    classifier: str = "mlp",
    classifier_epochs: int = 20,
    report: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Cluster a teacher store into K concepts and write the concepts directory (docs/contracts.md).

    Args:
        store_path: a complete teacher store.
        out: the concepts directory (created; its files are replaced).
        k: the number of concepts.
        temperature: tau of the soft labels; None derives it from the data (module docstring).
        top_k: store each label's top_k largest weights (renormalised) instead of dense rows; None: dense up to
            K = 256, top-16 beyond.
        spherical: cosine k-means (rows and centroids on the unit sphere); natural with space="normalized".
        seed: k-means initialisation and subsampling, the classifier's initialisation.
        space: "standardized" (default), "normalized" or "raw" (module docstring).
        n_iter: Lloyd iterations at most.
        device: k-means device ("auto", "cpu", "cuda", "reference").
        data: the dataset (the split), for member captions in the report and a key check; None: the store's
            recorded data path, used for captions only where readable.
        split: the split of the store to fit on (required where the store covers several): only its rows shape
            the centroids, the temperature and C, and only its keys get labels; the rows standardise with its
            statistics. Held-out captions keep their teacher rows in the store but never shape the concepts.
        embed_dim: E, the CLIP embedding width the classifier's head reads.
        classifier: "mlp" (E -> 64 -> K) or "linear".
        classifier_epochs: epochs of the classifier's training.
        report: write report.json and report.png.
        progress: progress bar over the k-means iterations.

    Returns:
        the meta.json record.

    Raises:
        StoreError: the store is missing, incomplete, has no such split, or does not match `data`;
        ConceptsError: a store of several splits without `split`, K out of range, NaN rows, bad options.
    """
    from kclip.cluster import KMeans
    from kclip.concepts.classifier import save_classifier, train_classifier

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    store = _split_view(store_path, split)
    n, d = store.count, store.width
    if space not in SPACES:
        raise ConceptsError(f"--space {space}: expected one of {', '.join(SPACES)}")
    if not isinstance(k, int) or k < 1:
        raise ConceptsError(f"--k {k}: must be a positive integer")
    if k > n:
        raise ConceptsError(f"--k {k} is larger than the {n} samples of the store {store.root}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ConceptsError(f"--temperature {temperature}: must be a finite number > 0")
    if top_k is not None and not 1 <= top_k <= k:
        raise ConceptsError(f"--top-k {top_k}: must be in [1, K={k}]")
    dense = top_k is None and k <= DENSE_MAX_K
    if not dense and top_k is None:
        top_k = min(k, DEFAULT_TOP_K)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_checked = None
    if data is not None:
        data_checked = _check_data(store, data)

    t0 = time.perf_counter()
    x, tmp = _mapped_rows(store, space, out)
    timings["map"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        km = KMeans(
            k,
            n_iter=n_iter,
            seed=seed,
            device=device,
            spherical=spherical,
            max_points_per_centroid=256,
            progress=progress,
        )
        km.fit(x, streaming=tmp is not None)
        centroids = km.centroids.numpy()  # [K, D]
        timings["kmeans"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        sample_rows = min(n, TEMPERATURE_ROWS, max(k + 1, (1 << 25) // k))
        sample = np.sort(rng.choice(n, size=sample_rows, replace=False))
        xs = np.asarray(x[sample], dtype=np.float32)
        if spherical:
            xs = xs / np.maximum(np.linalg.norm(xs, axis=1, keepdims=True), 1e-12)
        if temperature is None:
            tau, rule, tau_stats = temperature_from_data(xs, centroids)
        else:
            tau, rule, tau_stats = float(temperature), "given (--temperature)", {}
        timings["temperature"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        labels, dist = km.assign(x, return_distances=True)
        labels, dist = labels.numpy().astype(np.int64), dist.numpy()
        sizes = np.bincount(labels, minlength=k)
        _write_labels(out, km, x, tau, dense, top_k)
        timings["labels"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        train_idx = (
            np.arange(n) if n <= CLASSIFIER_MAX_ROWS else np.sort(rng.choice(n, CLASSIFIER_MAX_ROWS, replace=False))
        )
        xc = np.asarray(x[train_idx], dtype=np.float32)
        yc = _dense_labels(out, dense, k, train_idx)
        model, train_stats = train_classifier(
            xc, yc, embed_dim=embed_dim, kind=classifier, epochs=classifier_epochs, seed=seed
        )
        save_classifier(out / "classifier.pt", model, train_stats, {"input_space": space, "spherical": spherical})
        timings["classifier"] = time.perf_counter() - t0

        with atomic_path(out / "centroids.npy") as p, open(p, "wb") as f:
            np.save(f, centroids.astype(np.float32))
        with atomic_path(out / "keys.npy") as p, open(p, "wb") as f:
            np.save(f, np.asarray(store.keys))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "k": k,
            "width": d,
            "space": space,
            "spherical": spherical,
            "temperature": tau,
            "temperature_rule": rule,
            "labels": "dense" if dense else "topk",
            "top_k": None if dense else top_k,
            "seed": seed,
            "embed_dim": embed_dim,
            "objective": km.objective,
            "count": n,
            "store": str(Path(store_path).resolve()),
            "split": store.split,
            "teacher_model": store.meta.get("model"),
            "iterations": len(km.stats),
            "kmeans_backend": km.backend,
        }
        if report:
            from kclip.concepts.report import write_report

            t0 = time.perf_counter()
            members = _members(labels, dist, k, MEMBERS_PER_CONCEPT)
            write_report(
                out,
                store=store,
                x=x,
                labels=labels,
                sizes=sizes,
                centroids=centroids,
                members=members,
                meta=meta,
                tau_stats=tau_stats,
                train_stats=train_stats,
                kmeans_stats=km.stats,
                data=data if data is not None else _recorded_data(store),
                data_checked=data_checked,
                seed=seed,
            )
            timings["report"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        meta["seconds"] = timings
        write_json(out / "meta.json", meta)
    finally:
        if tmp is not None:
            del x
            tmp.unlink(missing_ok=True)
    log.info(
        "concepts: K=%d over %d rows (%s space), tau %.4g, classifier accuracy %.3f, %.1f s",
        k,
        n,
        space,
        tau,
        train_stats["accuracy"],
        timings["total"],
    )
    return meta


def _write_labels(out: Path, km, x: np.ndarray, tau: float, dense: bool, top_k: int | None) -> None:
    """labels.npy (dense float16 [N, K]) or topk_index.npy / topk_weight.npy (int32 / float16 [N, top_k]),
    written in chunks; the other format's files are removed."""
    n, k = x.shape[0], km.n_clusters
    names = ["labels.npy"] if dense else ["topk_index.npy", "topk_weight.npy"]
    stale = {"labels.npy", "topk_index.npy", "topk_weight.npy"} - set(names)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    paths = [out / name for name in names]
    tmps = [p.with_name(f".{p.name}.tmp") for p in paths]
    try:
        if dense:
            arrays = [np.lib.format.open_memmap(tmps[0], mode="w+", dtype=np.float16, shape=(n, k))]
        else:
            arrays = [
                np.lib.format.open_memmap(tmps[0], mode="w+", dtype=np.int32, shape=(n, top_k)),
                np.lib.format.open_memmap(tmps[1], mode="w+", dtype=np.float16, shape=(n, top_k)),
            ]
        for s, e in _chunks(n, max(x.shape[1], k)):
            soft = km.soft_assign(np.asarray(x[s:e]), tau, top_k if not dense else None)
            if dense:
                arrays[0][s:e] = soft.numpy().astype(np.float16)
            else:
                arrays[0][s:e] = soft[0].numpy().astype(np.int32)
                arrays[1][s:e] = soft[1].numpy().astype(np.float16)
        for a in arrays:
            a.flush()
        del arrays
        for t, p in zip(tmps, paths, strict=True):
            os.replace(t, p)
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)


def _dense_labels(out: Path, dense: bool, k: int, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), K] labels of the given rows, from the files just written."""
    if dense:
        return np.asarray(np.load(out / "labels.npy", mmap_mode="r")[rows], dtype=np.float32)
    idx = np.load(out / "topk_index.npy", mmap_mode="r")[rows]
    w = np.asarray(np.load(out / "topk_weight.npy", mmap_mode="r")[rows], dtype=np.float32)
    y = np.zeros((len(rows), k), dtype=np.float32)
    np.put_along_axis(y, idx.astype(np.int64), w, axis=1)
    return y / y.sum(1, keepdims=True)


def _split_view(store_path: str | os.PathLike, split: str | None) -> TeacherStore:
    """The store, or the view of its split `split`; a store of several splits must be given one."""
    store = TeacherStore(store_path)
    if split is None and len(store.splits) > 1:
        raise ConceptsError(
            f"{store.root}: a store of the splits {', '.join(store.splits)}; name the one to fit on, as "
            f"--split {store.splits[0]} (other splits must never shape the concepts)"
        )
    return store if split is None else TeacherStore(store_path, split)


def _recorded_data(store: TeacherStore) -> str | None:
    """The dataset the store (or its split) was embedded from, as it recorded it."""
    if store.split is not None:
        return store.meta["splits"][store.split].get("data")
    return store.meta.get("data")


def _check_data(store: TeacherStore, data: str | os.PathLike) -> str:
    """Raise StoreError unless the store holds exactly the dataset's keys."""
    from kclip.teacher.captions import caption_source, iter_captions

    keys = [key for key, _ in iter_captions(caption_source(data))]
    store.check_keys(keys, what=f"the dataset {os.fspath(data)}")
    if len(keys) != store.count:
        held = f"its split {store.split!r} holds" if store.split is not None else "holds"
        raise StoreError(
            f"{store.root}: {held} {store.count} rows but the dataset {os.fspath(data)} has {len(keys)} samples; "
            "the store was made from other data"
        )
    return os.fspath(data)


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a concepts directory; raises ConceptsError when there is none or of another format."""
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise ConceptsError(f"{root}: not a concepts directory (no meta.json); make one with `kclip concepts fit`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ConceptsError(f"{root}: not a concepts directory (format {meta.get('format')!r})")
    return meta
