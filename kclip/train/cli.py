"""`kclip train` (and `python -m kclip.train`, for torchrun)."""

from __future__ import annotations

import argparse
import json


def _train(args: argparse.Namespace) -> int:
    from kclip.train.loop import train
    from kclip.train.params import parse_train_args

    # parsed again: a --config file's values go under the flags given on the command line
    summary = train(parse_train_args(args.train_argv, args.train_parser))
    if summary["last"]:
        print(json.dumps({k: summary[k] for k in ("name", "run_dir", "step", "epoch", "stopped")} | summary["last"]))
    return 0


def register(subparsers) -> None:
    """Add `kclip train` to the kclip command line."""
    from kclip.train.params import add_train_arguments

    p = subparsers.add_parser(
        "train",
        help="train Knowledge-CLIP (or the plain-CLIP baseline with --alpha 0 --beta 0); runs under torchrun",
        description="The three losses of Knowledge-CLIP on an open_clip model, with open_clip's flags, "
        "checkpoints that resume exactly (--resume latest) and torchrun for several devices or machines.",
    )
    add_train_arguments(p)
    p.set_defaults(func=_train, train_parser=p)
