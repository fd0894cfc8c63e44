"""The `kclip` command line.

Each part of kclip registers its own subcommands (a `register(subparsers)` function in the module named in
_COMMANDS), so this file stays a table of contents; `kclip info` lives here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

# Modules whose register(subparsers) adds subcommands, in the order they appear in --help.
_COMMANDS: tuple[str, ...] = (
    "kclip.run.cli",
    "kclip.data.cli",
    "kclip.teacher.cli",
    "kclip.concepts.cli",
    "kclip.train.cli",
    "kclip.models.cli",
    "kclip.eval.cli",
)


def _info(args: argparse.Namespace) -> int:
    from kclip.info import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kclip", description="Knowledge-CLIP: train and evaluate, fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, and which accelerated backends are usable here and why not")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(func=_info)
    for name in _COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":  # `kclip train --config FILE` parses its flags again over the file's values
        args.train_argv = argv[argv.index("train") + 1 :]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from kclip.errors import KclipError

    try:
        return args.func(args)
    except KclipError as e:  # bad input: the message says what and why; no traceback
        print(f"kclip {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
