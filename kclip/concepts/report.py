"""The concept report: report.json (sizes, member captions, label statistics, the classifier's training record)
and report.png (a 2-D PCA projection of the rows coloured by concept, and the histogram of concept sizes)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from kclip._atomic import atomic_path
from kclip.teacher.store import TeacherStore, write_json

log = logging.getLogger(__name__)

PLOT_ROWS = 4000


def _captions(data: str | None, wanted: set[str], full_check: bool) -> tuple[dict[str, str], str | None]:
    """Captions of `wanted` keys from the dataset, and why none could be read (None when read)."""
    if data is None:
        return {}, "the store records no dataset path"
    from kclip.data.shards import DataError
    from kclip.teacher.captions import caption_source, iter_captions

    found: dict[str, str] = {}
    try:
        for key, caption in iter_captions(caption_source(data)):
            if key in wanted:
                found[key] = caption
                if len(found) == len(wanted) and not full_check:
                    break
    except (DataError, OSError) as e:
        return found, f"{data}: {e}"
    return found, None


def projection_2d(x: np.ndarray, rows: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """PCA to 2-D of the given rows (and the centroids, through the same axes): ([n, 2], [K, 2], variance shares)."""
    sample = np.asarray(x[rows], dtype=np.float64)
    mean = sample.mean(0)
    _, s, vt = np.linalg.svd(sample - mean, full_matrices=False)
    axes = vt[:2]  # [2, D]
    share = (np.square(s[:2]) / max(np.square(s).sum(), 1e-300)).tolist()
    return (sample - mean) @ axes.T, (centroids - mean) @ axes.T, share


def _plot(
    path: Path, xy: np.ndarray, colour: np.ndarray, cxy: np.ndarray, sizes: np.ndarray, meta: dict, share
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(sizes)
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.4, 1]})
    cmap = plt.get_cmap("tab20" if k <= 20 else "nipy_spectral")
    ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap=cmap, vmin=0, vmax=max(k - 1, 1), s=4, alpha=0.6, linewidths=0)
    ax.scatter(cxy[:, 0], cxy[:, 1], c="black", marker="x", s=18, linewidths=0.8, label="centroids")
    ax.set_title(f"{len(xy)} rows, PCA of the {meta['space']} space, coloured by concept (K={k})")
    ax.set_xlabel(f"PC1 ({100 * share[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * share[1]:.1f}% of variance)" if len(share) > 1 else "PC2")
    ax.legend(loc="upper right", fontsize=8)
    hx.hist(sizes, bins=min(40, max(5, k // 2)), color="#4477aa", edgecolor="white")
    hx.axvline(sizes.mean(), color="black", linestyle="--", linewidth=1, label=f"mean {sizes.mean():.0f}")
    hx.set_title(f"concept sizes (min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()})")
    hx.set_xlabel("samples in the concept")
    hx.set_ylabel("concepts")
    hx.legend(fontsize=8)
    fig.suptitle(f"{meta['count']} captions, tau={meta['temperature']:.4g}, teacher {meta.get('teacher_model')}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(
    out: Path,
    *,
    store: TeacherStore,
    x: np.ndarray,
    labels: np.ndarray,
    sizes: np.ndarray,
    centroids: np.ndarray,
    members: list[np.ndarray],
    meta: dict[str, Any],
    tau_stats: dict[str, float],
    train_stats: dict[str, Any],
    kmeans_stats: list,
    data: str | os.PathLike | None,
    data_checked: str | None,
    seed: int,
) -> dict[str, Any]:
    """Write report.json and report.png into `out`; returns the report record."""
    n = len(labels)
    member_keys = [[store.keys[i].decode() for i in m] for m in members]
    wanted = {key for keys in member_keys for key in keys}
    captions, why = _captions(os.fspath(data) if data is not None else None, wanted, full_check=False)
    if why:
        log.warning("concept report without member captions: %s", why)
    weights = _label_stats(out, meta)
    record: dict[str, Any] = {
        **{key: meta[key] for key in ("k", "count", "space", "spherical", "temperature", "temperature_rule")},
        "temperature_stats": tau_stats,
        "labels": meta["labels"],
        "label_stats": weights,
        "objective": meta["objective"],
        "kmeans": {
            "iterations": len(kmeans_stats),
            "backend": meta["kmeans_backend"],
            "objective_per_iteration": [s.objective for s in kmeans_stats],
            "imbalance": kmeans_stats[-1].imbalance if kmeans_stats else None,
        },
        "sizes": {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
            "per_concept": sizes.tolist(),
        },
        "classifier": train_stats,
        "captions_from": data_checked or (os.fspath(data) if data is not None and not why else None),
        "captions_missing_because": why,
        "concepts": [
            {
                "id": c,
                "size": int(sizes[c]),
                "members": [{"key": key, "caption": captions.get(key)} for key in member_keys[c]],
            }
            for c in np.argsort(-sizes, kind="stable").tolist()
        ],
    }
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, PLOT_ROWS), replace=False))
    record["png"] = None
    try:
        xy, cxy, share = projection_2d(x, rows, centroids)
        record["projection"] = {"method": "PCA", "rows": len(rows), "variance_share": share}
        _plot(out / "report.png", xy, labels[rows], cxy, sizes, meta, share)
        record["png"] = "report.png"
    except ImportError as e:
        log.warning("no report.png: matplotlib is missing (%s): pip install 'kclip[demo]'", e)
        record["png_missing_because"] = f"matplotlib is missing ({e}): pip install 'kclip[demo]'"
    write_json(out / "report.json", record)
    return record


def _label_stats(out: Path, meta: dict[str, Any]) -> dict[str, float]:
    """Median largest weight and mean entropy (nats) of the soft labels, over up to 20000 rows."""
    if meta["labels"] == "dense":
        w = np.load(out / "labels.npy", mmap_mode="r")
    else:
        w = np.load(out / "topk_weight.npy", mmap_mode="r")
    w = np.asarray(w[: min(len(w), 20000)], dtype=np.float64)
    entropy = -(w * np.log(np.clip(w, 1e-12, None))).sum(1)
    return {
        "median_top1": float(np.median(w.max(1))),
        "mean_entropy_nats": float(entropy.mean()),
        "max_entropy_nats": float(np.log(meta["k"])),
    }
