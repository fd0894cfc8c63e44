"""`kclip run`: the whole method end to end (kclip.run.pipeline), with a report."""

from __future__ import annotations

import argparse
from pathlib import Path


def _overrides(args: argparse.Namespace) -> dict:
    """The command line's changes to the config, as a config overlay."""
    import yaml

    from kclip.run.config import RunConfigError

    over: dict = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise RunConfigError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. train.epochs=3")
        over.setdefault(section, {})[name] = yaml.safe_load(text)
    for section, key, value in (("data", "source", args.data), ("teacher", "model", args.teacher),
                                ("eval", "attribute_data", args.attribute_data)):  # fmt: skip
        if value is not None:
            over.setdefault(section, {})[key] = value
    if args.name is not None:
        over["name"] = args.name
    return over


def _run(args: argparse.Namespace) -> int:
    from kclip.run.config import load_run_config, merge
    from kclip.run.pipeline import Run, fmt_seconds

    cfg = load_run_config(args.preset, args.config)
    cfg = merge(cfg, _overrides(args), "the command line")
    root = Path(args.runs_dir) / cfg["name"]
    run = Run(cfg, root, ablate=args.ablate, seeds=args.seeds, device=args.device, progress=not args.no_progress,
              echo=print)  # fmt: skip
    try:
        result = run.run()
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to resume {root} from its last finished step")
        return 130
    if result["stopped"]:
        return 130
    work = sum(result["seconds"].values())
    print(f"wall time {fmt_seconds(result['wall_seconds'])} (work recorded for the run: {fmt_seconds(work)})")
    print(f"report: {result['report']}")
    return 0


def register(subparsers) -> None:
    """Add `kclip run` to the kclip command line."""
    p = subparsers.add_parser(
        "run",
        help="the whole method end to end (data, teacher, concepts, baseline and Knowledge-CLIP, eval) with a report",
        description="Generates (or splits) the data, embeds the captions with the LLM teacher, fits the concepts, "
        "trains the plain-CLIP baseline and Knowledge-CLIP on the same seed and budget, evaluates both and writes "
        "RUNS/NAME/report.md. Every stage skips what is already done, so running the same command again resumes.",
    )
    p.add_argument("--preset", choices=("smoke", "default", "large"), default="default",
                   help="smoke: under 3 minutes on 2 CPU cores (CI); default: the embedded default, within 15 "
                   "minutes; large: 5x the data, more epochs and probe steps")  # fmt: skip
    p.add_argument("--config", default=None, help="a run config YAML over the preset (configs/tiny.yaml, "
                   "configs/paper.yaml); sections data, teacher, concepts, train, eval, budget")  # fmt: skip
    p.add_argument("--name", default=None, help="the run's folder under --runs-dir (default: the preset's name)")
    p.add_argument("--runs-dir", default="runs", help="where runs are written (./runs)")
    p.add_argument("--data", default=None, help="data.source: a webdataset folder or dataset root instead of "
                   "the synthetic set")  # fmt: skip
    p.add_argument("--teacher", default=None, help="teacher.model: smollm2, a .gguf, a model folder or a hub id")
    p.add_argument("--attribute-data", default=None, metavar="NAME:DIR[,NAME:DIR]",
                   help="eval.attribute_data: AWA2 / CUB in their released layouts")  # fmt: skip
    p.add_argument("--ablate", action="store_true", help="also train with each loss term off in turn")
    p.add_argument("--seeds", type=int, default=1, help="train every model with this many seeds (mean ± std)")
    p.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu or cuda")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change one config value, e.g. --set train.epochs=3 (repeatable)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
