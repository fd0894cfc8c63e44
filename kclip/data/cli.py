"""`kclip data synth | index | inspect`."""

from __future__ import annotations

import argparse
import json
import logging
import time

from kclip.data.shards import SPLIT_SEP, named_splits

log = logging.getLogger(__name__)


def _synth(args: argparse.Namespace) -> int:
    from kclip.data.synth import synth

    t0 = time.perf_counter()
    record = synth(
        args.out,
        args.num_samples,
        num_heldout=args.num_heldout,
        num_compositional=args.num_compositional,
        seed=args.seed,
        image_size=args.image_size,
        shard_size=args.shard_size,
        workers=args.workers,
        progress=not args.quiet,
    )
    counts = ", ".join(f"{k} {v}" for k, v in record["counts"].items())
    print(f"wrote {args.out}: {counts} samples ({time.perf_counter() - t0:.1f} s)")
    splits = ",".join(s for s, n in record["counts"].items() if n > 0)
    if args.index:
        path = f"{args.out}{SPLIT_SEP}{splits}"
        return _index(argparse.Namespace(**{**vars(args), "path": path, "index_dir": None, "json": False}))
    print(f"next: kclip data index {args.out}{SPLIT_SEP}{splits}")
    return 0


def _print_bad(summary: dict, limit: int) -> None:
    shown = 0
    for report in summary["shards"]:
        for bad in report["bad"]:
            if shown == limit:
                print(f"  ... {summary['bad_samples'] - limit} more (--show-bad N)")
                return
            print(f"  {report['shard']} {bad['key']}: {bad['reason']}")
            shown += 1


def _index(args: argparse.Namespace) -> int:
    from kclip.data.index import index_dataset

    splits = named_splits(args.path)  # refuses a dataset root before any work
    summaries = {}
    for name, path in splits:
        t0 = time.perf_counter()
        summary = index_dataset(path, index_dir=args.index_dir, workers=args.workers, progress=not args.quiet)
        summaries[name] = summary
        if not args.json:
            print(
                f"{name}: indexed {len(summary['shards'])} shards in {time.perf_counter() - t0:.1f} s: "
                f"{summary['samples']} samples, {summary['good_samples']} indexed, {summary['bad_samples']} left out"
            )
            for reason, n in summary["reasons"].items():
                print(f"  {n:8d}  {reason}")
            _print_bad(summary, args.show_bad)
    if args.json:
        print(json.dumps(summaries[splits[0][0]] if len(splits) == 1 else summaries, indent=1))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from kclip.data.pipeline import detect_format

    splits = named_splits(args.path)
    summaries = {}
    for name, path in splits:
        if detect_format(path) == "csv":
            summary = _inspect_csv(args, path)
        else:
            from kclip.data.index import inspect_dataset

            summary = inspect_dataset(path, index_dir=args.index_dir, workers=args.workers, progress=not args.quiet)
        summaries[name] = summary
        if args.json:
            continue
        indexed = summary.get("indexed_shards")
        where = f"{len(summary['shards'])} shards ({indexed} indexed)" if indexed is not None else "CSV"
        print(f"{path}: {where}, {summary['samples']} samples, {summary['bad_samples']} bad")
        for reason, n in summary["reasons"].items():
            print(f"  {n:8d}  {reason}")
        _print_bad(summary, args.show_bad)
        if indexed is not None and indexed < len(summary["shards"]):
            print(f"not indexed: {len(summary['shards']) - indexed} shards; run `kclip data index {path}`")
    if args.json:
        print(json.dumps(summaries[splits[0][0]] if len(splits) == 1 else summaries, indent=1))
    return 0


def _inspect_csv(args: argparse.Namespace, path: str) -> dict:
    from collections import Counter

    from tqdm.auto import tqdm

    from kclip.data.csvfile import CsvSpec
    from kclip.data.loader import plan_csv
    from kclip.data.shards import check_sample

    spec = CsvSpec(args.csv_img_key, args.csv_caption_key, args.csv_sep, args.csv_key, args.csv_root)
    rows = plan_csv(path, spec)
    total, bad = len(rows), []
    for r in tqdm(range(total), unit="row", desc="inspect", disable=args.quiet):
        (sample,) = rows.read([r])
        _, why = check_sample(sample)
        if why is not None:
            bad.append({"key": sample.key, "reason": why})
    reasons = Counter(b["reason"].split(":", 1)[0] for b in bad)
    report = {"shard": path, "samples": total, "good_samples": total - len(bad), "bad": bad}
    return {
        "shards": [report],
        "samples": total,
        "good_samples": total - len(bad),
        "bad_samples": len(bad),
        "reasons": dict(reasons),
    }


def register(subparsers) -> None:
    """Add `kclip data ...` to the kclip command line."""
    data = subparsers.add_parser("data", help="make, index and inspect datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workers", type=int, default=None, help="processes (default: the usable CPU cores)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "synth",
        help="write the embedded synthetic compositional dataset (JPEG webdataset shards, img2dataset layout)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=20000, help="training samples (20000)")
    p.add_argument("--num-heldout", type=int, default=None, help="held-out samples (num-samples / 10)")
    p.add_argument("--num-compositional", type=int, default=None, help="compositional samples (num-samples / 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="image side, pixels (128)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (1000)")
    p.add_argument("--index", action="store_true", help="run `kclip data index` on the output afterwards")
    p.add_argument("--show-bad", type=int, default=20, help=argparse.SUPPRESS)
    common(p)
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "index",
        help="decode-check every sample and write DALI index files that leave the bad ones out",
        description="Reads every sample once: its image must decode and its caption exist. Writes S.idx (DALI's "
        "wds2idx format, good samples only) and S_index.json (what was left out and why) beside each shard S.tar.",
    )
    p.add_argument(
        "path",
        help="shards: a directory of them, a split (DIR/train or DIR:train), splits each on its own "
        "(DIR:train,heldout), a .tar, or brace patterns joined by '::'",
    )
    p.add_argument("--index-dir", default=None, help="write the index files here instead of beside the shards")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--show-bad", type=int, default=20, help="bad samples to list (20)")
    common(p)
    p.set_defaults(func=_index)

    p = sub.add_parser("inspect", help="number of samples, the bad ones and why (shards or a CSV)")
    p.add_argument("path", help="shards or splits (as for index) or an open_clip-style .csv/.tsv")
    p.add_argument("--index-dir", default=None, help="where the index files are, when not beside the shards")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--show-bad", type=int, default=20, help="bad samples to list (20)")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-sep", default="\t")
    p.add_argument("--csv-key", default=None, help="column of sample keys (default: the row number)")
    p.add_argument("--csv-root", default=None, help="folder of relative image paths (default: the CSV's)")
    common(p)
    p.set_defaults(func=_inspect)
