"""`kclip eval`."""

from __future__ import annotations

import argparse

from kclip.eval.errors import EvalError


def _eval(args: argparse.Namespace) -> int:
    from kclip.eval.report import HEADLINE
    from kclip.eval.runner import evaluate, settings_from_args

    if args.seeds < 1:
        raise EvalError(f"--seeds {args.seeds}: must be at least 1")
    summary = evaluate(args.checkpoint, args.data, args.out, settings_from_args(args))
    for task, metric, label in HEADLINE:
        for r in summary["records"]:
            if r["task"] == task and metric in r["metrics"]:
                print(f"{r['model']:>16}  {r['dataset']:<24} {label:<24} {100 * r['metrics'][metric]:6.2f}")
    for key, why in summary["skipped"].items():
        print(f"skipped {key}: {why}")
    print(f"{summary['seconds']['total']:.1f} s; wrote {summary['outputs']['summary_md']}")
    return 0


def register(subparsers) -> None:
    """Add `kclip eval` to the kclip command line."""
    from kclip.eval.names import TASKS

    p = subparsers.add_parser(
        "eval",
        help="retrieval, zero-shot, attribute probes and text-encoder exact match of one or more checkpoints",
        description="Evaluate kclip training checkpoints (or run folders) and exported open_clip folders side by "
        "side: results in CLIP_benchmark's JSON shape per checkpoint, task and dataset, a Markdown summary and a "
        "bar chart under --out.",
    )
    p.add_argument("task", nargs="*", metavar="TASK", help=f"tasks to run (default all: {', '.join(TASKS)})")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]PATH",
                   help="a kclip checkpoint (.pt), a training run folder or an exported open_clip folder; repeat "
                   "to compare")  # fmt: skip
    p.add_argument("--data", help="the dataset root (one folder of indexed shards per split, as `kclip data synth`)")
    p.add_argument("--splits", default="heldout,compositional", help="splits evaluated, each on its own")
    p.add_argument("--train-split", default="train", help="the split the probes and adapters learn from")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (as the positional TASKs)")
    p.add_argument("--out", default="eval", help="output folder (default ./eval)")
    p.add_argument("--teacher-store", default=None, help="a teacher store for the teacher's text-EM row")
    p.add_argument("--tokenizer", default=None,
                   help="transformers tokenizer folder for text EM (default: the synthetic grammar)")  # fmt: skip
    p.add_argument("--attribute-data", default=None, metavar="NAME:DIR[,NAME:DIR]",
                   help="AWA2 / CUB in their released layouts, e.g. awa2:/data/AwA2,cub:/data/CUB")  # fmt: skip
    p.add_argument("--seeds", type=int, default=1, help="repeat text EM with this many seeds (mean ± std)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="data workers of the feature passes")
    p.add_argument("--device", default="auto", help="auto (CUDA where available), cpu or cuda[:N]")
    p.add_argument("--probe-max-train", type=int, default=5000, help="training images of a probe at most (0: all)")
    p.add_argument("--autoencoder-steps", type=int, default=500, help="text EM: T5 autoencoder steps")
    p.add_argument("--adapter-steps", type=int, default=250, help="text EM: steps of each adapter")
    p.add_argument("--max-train-captions", type=int, default=10000, help="text EM: training captions (0: all)")
    p.add_argument("--max-eval-captions", type=int, default=1000, help="text EM: captions per split (0: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)
