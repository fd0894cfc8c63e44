"""The outputs of `kclip eval` (docs/contracts.md, "Evaluation"), each written to a temporary name and renamed:

OUT/<model>/<task>-<dataset>.json   one result in CLIP_benchmark's shape: {"dataset", "model", "pretrained",
                                    "task", "metrics", "language"} plus kclip's fields (split, samples, ...)
OUT/summary.json                    every result, the checkpoints, the settings, skipped tasks, timings
OUT/summary.md                      the tables, models side by side (text EM as the paper's table)
OUT/metrics.png                     the headline metrics as grouped bars (where matplotlib imports)
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from kclip._atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

# (task, metric, short label) of the headline numbers: the bar chart's, and the first rows of each table.
HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("zeroshot_retrieval", "image_retrieval_recall@1", "text→image R@1"),
    ("zeroshot_retrieval", "text_retrieval_recall@1", "image→text R@1"),
    ("zeroshot_classification", "acc1", "zero-shot acc@1"),
    ("attribute_probe", "attribute_map", "attribute mAP"),
    ("attribute_probe", "attribute_zeroshot_acc1", "attribute-prompt acc@1"),
    ("text_exact_match", "exact_match", "text EM"),
)
TASK_TITLES = {
    "zeroshot_retrieval": "Retrieval",
    "zeroshot_classification": "Zero-shot classification",
    "attribute_probe": "Attribute probes",
    "text_exact_match": "Text-encoder exact match (caption reconstruction)",
}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _models(records: list[dict]) -> list[str]:
    out: list[str] = []
    for r in records:
        if r["model"] not in out:
            out.append(r["model"])
    return out


def pct(value: Any, std: Any = None) -> str:
    if isinstance(value, float):
        text = f"{100 * value:.1f}"
        return f"{text} ± {100 * std:.1f}" if isinstance(std, float) else text
    return "–" if value is None else str(value)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _task_table(records: list[dict], task: str) -> list[str]:
    rows = [r for r in records if r["task"] == task]
    models = _models(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by = {(r["model"], r["dataset"]): r for r in rows}
    metrics = [m for m, v in rows[0]["metrics"].items() if isinstance(v, float) and not m.endswith("_std")]
    body = []
    for d in datasets:
        for m in metrics:
            body.append([d, m] + [pct(by[(x, d)]["metrics"].get(m)) if (x, d) in by else "–" for x in models])
    return md_table(["dataset", "metric (%)", *models], body)


def _em_tables(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["task"] == "text_exact_match"]
    models = _models(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by = {(r["model"], r["dataset"]): r for r in rows}
    header = ["text encoder"]
    for d in datasets:
        header += [f"EM {d}", f"token F1 {d}"]
    body = []
    for x in models:
        line = [x]
        for d in datasets:
            m = by[(x, d)]["metrics"] if (x, d) in by else {}
            line += [pct(m.get("exact_match"), m.get("exact_match_std") if m.get("seeds", 1) > 1 else None),
                     pct(m.get("token_f1"), m.get("token_f1_std") if m.get("seeds", 1) > 1 else None)]  # fmt: skip
        body.append(line)
    first = rows[0]
    out = md_table(header, body)
    out += ["", f"{first['samples']} captions per split, adapters trained on {first['train_captions']} training "
            f"captions, {first['metrics']['seeds']} seed(s) (mean ± standard deviation over seeds)."]  # fmt: skip
    for d in datasets:
        tags = by[(models[0], d)]["metrics"].get("exact_match_by_tag")
        if not tags:
            continue
        counts = by[(models[0], d)]["metrics"]["captions_by_tag"]
        out += ["", f"EM by phenomenon tag, {d} (captions with the tag):", ""]
        body = [[f"{t} ({counts[t]})"] + [pct(by[(x, d)]["metrics"]["exact_match_by_tag"].get(t)) for x in models]
                for t in tags]  # fmt: skip
        out += md_table(["tag", *models], body)
    return out


def markdown(summary: dict[str, Any]) -> str:
    records = summary["records"]
    lines = ["# kclip eval", ""]
    ckpts = [[c["label"], c["kind"], c["model"], pct(c["epoch"]), f"`{c['path']}`"] for c in summary["checkpoints"]]
    lines += md_table(["label", "kind", "architecture", "epoch", "checkpoint"], ckpts)
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items())
    lines += ["", f"Data `{summary['data']}`, device {summary['device']}; time: {secs}.", ""]
    for task, title in TASK_TITLES.items():
        if not any(r["task"] == task for r in records):
            continue
        lines += [f"## {title}", ""]
        lines += _em_tables(records) if task == "text_exact_match" else _task_table(records, task)
        lines.append("")
    if summary["skipped"]:
        lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in summary["skipped"].items()] + [""]
    return "\n".join(lines)


def draw_bars(panels: list[tuple[str, dict[str, tuple[float, float | None]]]], order: list[str], path: Path,
              labels: dict[str, str] | None = None) -> bool:  # fmt: skip
    """Grouped bars, one panel per (title, {row: (value, spread or None)}), values in [0, 1] drawn as percent with
    the spread as an error bar; a row keeps its colour (its place in `order`) in every panel. False where
    matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib does not import: no %s", path.name)
        return False
    if not panels:
        return False
    labels = labels or {}
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, (title, vals) in zip(axes.flat, panels, strict=False):
        xs = [m for m in order if m in vals]
        errs = [100 * (vals[m][1] or 0.0) for m in xs]
        bars = ax.bar(range(len(xs)), [100 * vals[m][0] for m in xs], yerr=errs if any(errs) else None, capsize=3,
                      color=[colours[order.index(m) % 10] for m in xs])  # fmt: skip
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(xs)), [labels.get(m, m) for m in xs], rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def bar_chart(summary: dict[str, Any], path: Path) -> bool:
    """The headline metrics as grouped bars, one panel per (metric, dataset); False where matplotlib is missing."""
    records = summary["records"]
    panels = []
    for task, metric, label in HEADLINE:
        for d in dict.fromkeys(r["dataset"] for r in records if r["task"] == task):
            vals = {r["model"]: (r["metrics"][metric], None) for r in records
                    if r["task"] == task and r["dataset"] == d and metric in r["metrics"]}  # fmt: skip
            if vals:
                panels.append((f"{label}\n{d}", vals))
    return draw_bars(panels, _models(records), path)


def write_reports(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write every output (module docstring) under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for r in summary["records"]:
        folder = out / slug(r["model"])
        folder.mkdir(exist_ok=True)
        path = folder / f"{r['task']}-{slug(r['dataset'])}.json"
        atomic_write_text(path, json.dumps(r, indent=2) + "\n")
        results.append(str(path))
    paths = {"results": results, "summary_json": str(out / "summary.json"), "summary_md": str(out / "summary.md")}
    if bar_chart(summary, out / "metrics.png"):
        paths["plot"] = str(out / "metrics.png")
    atomic_write_text(out / "summary.md", markdown(summary))
    atomic_write_text(out / "summary.json", json.dumps({**summary, "outputs": paths}, indent=2) + "\n")
    return paths
