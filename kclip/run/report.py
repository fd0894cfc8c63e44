"""RUN/report.md: the paper's tables with every trained model side by side (mean ± standard deviation over the
training seeds where there are several), the stage times against their budgets, and the plots:

    RUN/plots/loss_curves.png   each loss term against the step, one line per training run
    RUN/plots/metrics.png       the headline metrics as bars, with the spread over seeds as error bars
    RUN/plots/concepts.png      the concept map (a 2-D projection of the teacher rows coloured by concept)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kclip._atomic import atomic_path, atomic_write_text
from kclip.eval.report import HEADLINE, draw_bars, md_table, pct
from kclip.run.config import STAGES
from kclip.run.pipeline import VARIANT_TITLES, fmt_seconds

if TYPE_CHECKING:
    from kclip.run.pipeline import Run

log = logging.getLogger(__name__)

TERMS = ("contrastive_loss", "distill_loss", "concept_loss", "total")
# (task, metric, column label) of each of the report's tables.
TEXT_TABLE = (("text_exact_match", "exact_match", "EM"), ("text_exact_match", "token_f1", "token F1"))
IMAGE_TABLE = (
    ("attribute_probe", "attribute_map", "attribute mAP"),
    ("attribute_probe", "mean_balanced_accuracy", "balanced acc."),
    ("attribute_probe", "attribute_zeroshot_acc1", "attribute-prompt acc@1"),
)
ALIGN_TABLE = (
    ("zeroshot_retrieval", "image_retrieval_recall@1", "text→image R@1"),
    ("zeroshot_retrieval", "text_retrieval_recall@1", "image→text R@1"),
    ("zeroshot_classification", "acc1", "zero-shot acc@1"),
)


def aggregate(records: list[dict], groups: dict[str, str]) -> dict[tuple[str, str, str, str], list[float]]:
    """{(row, task, dataset, metric): [value per seed]}: each record's model label mapped to its row by `groups`
    (the training runs of one variant over seeds share a row); labels not in `groups` (T5, teacher) are rows."""
    out: dict[tuple[str, str, str, str], list[float]] = {}
    for r in records:
        row = groups.get(r["model"], r["model"])
        for metric, value in r["metrics"].items():
            if isinstance(value, float):
                out.setdefault((row, r["task"], r["dataset"], metric), []).append(value)
    return out


def mean_std(values: list[float] | None) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _cell(values: list[float] | None) -> str:
    return pct(*mean_std(values))


def metric_table(agg: dict, rows: list[str], titles: dict[str, str], columns: tuple, datasets: list[str]) -> list[str]:
    """Rows (models) against (dataset, metric) columns; only columns some row has a value for."""
    cols = [(t, m, label, d) for d in datasets for t, m, label in columns
            if any((r, t, d, m) in agg for r in rows)]  # fmt: skip
    if not cols:
        return []
    header = ["model"] + [f"{label} {d}" for _, _, label, d in cols]
    body = [[titles.get(r, r)] + [_cell(agg.get((r, t, d, m))) for t, m, _, d in cols] for r in rows
            if any((r, t, d, m) in agg for t, m, _, d in cols)]  # fmt: skip
    return md_table(header, body)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl, the last record of each step (a resumed run appends the steps it repeats)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "total" in rec:
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def loss_curves(curves: dict[str, list[dict]], variants: dict[str, str], path: Path) -> bool:
    """One panel per loss term, one line per training run (a variant's colour for all its seeds)."""
    plt = _pyplot()
    terms = [t for t in TERMS if any(t in rec for recs in curves.values() for rec in recs)]
    if not terms:
        return False
    order = list(dict.fromkeys(variants.values()))
    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.0), squeeze=False)
    for ax, term in zip(axes[0], terms, strict=True):
        for label, recs in curves.items():
            pts = [(r["step"], r[term]) for r in recs if term in r]
            if pts:
                x, y = zip(*pts, strict=True)
                first = label == variants[label]
                ax.plot(x, y, color=colours[order.index(variants[label]) % 10], lw=1.4 if first else 0.8,
                        alpha=1.0 if first else 0.6, label=label)  # fmt: skip
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def metric_bars(agg: dict, rows: list[str], titles: dict[str, str], datasets: list[str], path: Path) -> bool:
    """The headline metrics, one panel per (metric, dataset), a bar per row with the spread over seeds."""
    panels = []
    for task, metric, label in HEADLINE:
        for d in datasets:
            vals = {r: mean_std(agg.get((r, task, d, metric))) for r in rows if (r, task, d, metric) in agg}
            if vals:
                panels.append((f"{label}\n{d}", vals))
    return draw_bars(panels, rows, path, titles)


def _stage_table(run: Run) -> list[str]:
    body = []
    for stage in STAGES:
        if stage == "report":
            total, ran = None, True  # being written now
        else:
            total, ran = run.stage_seconds(stage), run.stage_ran(stage)
        budget = run.cfg["budget"].get(stage)
        over = " (over)" if budget and total is not None and total > budget else ""
        body.append([stage, fmt_seconds(total) + over, fmt_seconds(budget), "ran" if ran else "skipped (done)"])
    return md_table(["stage", "time", "budget", "this call"], body)


def _training_table(run: Run, curves: dict[str, list[dict]]) -> list[str]:
    body = []
    for m in run.models:
        recs = curves.get(m.label) or [{}]
        last = recs[-1]
        w = {**{k: run.cfg["train"].get(k) for k in ("alpha", "beta", "gamma")}, **m.weights}
        weights = f"{w['alpha']:g} / {w['beta']:g} / {w['gamma']:g}"
        body.append([m.label, VARIANT_TITLES[m.variant], str(m.seed), weights, str(last.get("step", "–"))]
                    + [f"{last[t]:.4f}" if t in last else "–" for t in TERMS]
                    + [f"{last['samples_per_s']:.1f}" if "samples_per_s" in last else "–",
                       fmt_seconds(run.state.seconds(f"train/{m.label}"))])  # fmt: skip
    header = ["run", "model", "seed", "α / β / γ", "steps", *TERMS, "samples/s", "time"]
    return md_table(header, body)


def _concepts_lines(run: Run, plots: Path) -> list[str]:
    folder = run.root / "concepts"
    lines = []
    try:
        rep = json.loads((folder / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ["No concept report (concepts/report.json is missing)."]
    sizes, clf = rep["sizes"], rep.get("classifier") or {}
    acc = clf.get("val_accuracy", clf.get("accuracy"))
    lines += [f"K = {rep['k']} concepts over {rep['count']} training captions ({rep['space']} teacher space), "
              f"τ = {rep['temperature']:.4g}; sizes min {sizes['min']}, median {sizes['median']:g}, max "
              f"{sizes['max']}, {sizes['empty']} empty. The frozen classifier C gives a teacher row's concept "
              f"{pct(acc)}% of the time on held-back training rows.", ""]  # fmt: skip
    body = []
    for c in rep["concepts"][:5]:
        caps = [m["caption"] for m in c["members"] if m.get("caption")][:2]
        body.append([str(c["id"]), str(c["size"]), "; ".join(f"“{x}”" for x in caps) or "–"])
    lines += md_table(["concept", "captions", "nearest captions"], body)
    if (folder / "report.png").is_file():
        shutil.copyfile(folder / "report.png", plots / "concepts.png")
        lines += ["", "![concept map](plots/concepts.png)"]
    return lines


def write_report(run: Run) -> dict[str, Any]:
    """Write RUN/report.md and RUN/plots/*.png from the run's state, training logs and evaluation."""
    root, cfg = run.root, run.cfg
    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    summary = json.loads((root / "eval" / "summary.json").read_text())
    records = summary["records"]
    groups = {m.label: m.variant for m in run.models}
    agg = aggregate(records, groups)
    variants = list(dict.fromkeys(m.variant for m in run.models))
    titles = {**VARIANT_TITLES, "T5": "T5 autoencoder (upper bound)", "teacher": f"teacher ({cfg['teacher']['model']})"}
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    seeds = sorted({m.seed for m in run.models})
    curves = {m.label: read_metrics(root / "logs" / m.label / "metrics.jsonl") for m in run.models}

    d = cfg["data"]
    total = sum(run.stage_seconds(s) or 0.0 for s in STAGES)
    lines = [f"# Knowledge-CLIP run `{cfg['name']}`", ""]
    lines += [f"Preset `{cfg['preset']}`" + (f", config `{cfg['config_file']}`" if cfg.get("config_file") else "")
              + f"; data {'kclip synthetic set' if d['source'] == 'synth' else '`' + str(d['source']) + '`'} "
              f"({', '.join(f'{k} {v}' for k, v in (run.state.steps.get('data', {}).get('samples') or {}).items())}); "
              f"teacher `{cfg['teacher']['model']}`; model `{cfg['train'].get('model')}`, "
              f"{cfg['train'].get('epochs')} epoch(s) of batch {cfg['train'].get('batch-size')}; "
              f"device {summary.get('device')}; training seed(s) {', '.join(map(str, seeds))}"
              + (" (mean ± standard deviation over seeds)" if len(seeds) > 1 else "")
              + f". Work time in all: {fmt_seconds(total)}.", ""]  # fmt: skip
    lines += ["## Text encoder: caption reconstruction exact match (%)", "",
              "A T5 autoencoder of the training captions with its decoder frozen; for each text encoder only an "
              "adapter from its frozen embedding into the decoder is trained (Kamath et al. 2023; the paper's "
              "Table 1). `compositional` holds colour-shape pairs never seen in training.", ""]  # fmt: skip
    text_rows = ["T5", "teacher", *variants]
    lines += metric_table(agg, text_rows, titles, TEXT_TABLE, datasets) or ["(text EM was not run)"]
    lines += ["", "## Image encoder: attribute classification (%)", "",
              "A linear probe per attribute on the frozen image features (trained on the training split), and "
              "zero-shot classification by attribute prompts.", ""]  # fmt: skip
    lines += metric_table(agg, variants, titles, IMAGE_TABLE, datasets) or ["(attribute probes were not run)"]
    lines += ["", "## Retrieval and zero-shot classification (%)", ""]
    lines += metric_table(agg, variants, titles, ALIGN_TABLE, datasets) or ["(retrieval and zero-shot were not run)"]
    if any(v in variants for v in ("no-distill", "no-concept", "no-contrastive")):
        lines += ["", "## Ablation: each term off in turn (points against Knowledge-CLIP)", ""]
        lines += _ablation_table(agg, variants, titles, datasets)
    if run.cfg["eval"].get("seeds", 1) > 1 or len(seeds) > 1:
        lines += ["", "The spread (±) is the standard deviation over the seeds: a difference smaller than it is noise."]
    lines += ["", "## Training", ""] + _training_table(run, curves)
    if loss_curves(curves, groups, plots / "loss_curves.png"):
        lines += ["", "![loss curves](plots/loss_curves.png)"]
    if metric_bars(agg, text_rows, titles, datasets, plots / "metrics.png"):
        lines += ["", "![headline metrics](plots/metrics.png)"]
    lines += ["", "## Concepts", ""] + _concepts_lines(run, plots)
    lines += ["", "## Stages", ""] + _stage_table(run)
    if summary.get("skipped"):
        lines += ["", "Skipped in evaluation:"] + [f"- {k}: {v}" for k, v in summary["skipped"].items()]
    lines += ["", "Every result in CLIP_benchmark's JSON: `eval/<model>/`; all tables per task: `eval/summary.md`; "
              "training logs: `logs/<run>/metrics.jsonl`.", ""]  # fmt: skip
    atomic_write_text(root / "report.md", "\n".join(lines))
    return {"report": str(root / "report.md")}


def _ablation_table(agg: dict, variants: list[str], titles: dict[str, str], datasets: list[str]) -> list[str]:
    cols = [(t, m, label, d) for t, m, label in (*TEXT_TABLE[:1], *IMAGE_TABLE[:1], *ALIGN_TABLE) for d in datasets
            if ("kclip", t, d, m) in agg]  # fmt: skip
    header = ["model"] + [f"{label} {d}" for _, _, label, d in cols]
    body = []
    for v in variants:
        if v == "kclip":
            continue
        row = [titles.get(v, v)]
        for t, m, _, d in cols:
            ref, mine = mean_std(agg.get(("kclip", t, d, m)))[0], mean_std(agg.get((v, t, d, m)))[0]
            row.append("–" if ref is None or mine is None else f"{100 * (mine - ref):+.1f}")
        body.append(row)
    return md_table(header, body)
