"""`kclip concepts fit`."""

from __future__ import annotations

import argparse


def _fit(args: argparse.Namespace) -> int:
    from kclip.concepts.fit import fit_concepts

    meta = fit_concepts(
        args.embeddings,
        args.out,
        args.k,
        temperature=args.temperature,
        top_k=args.top_k,
        spherical=args.spherical,
        seed=args.seed,
        space=args.space,
        n_iter=args.iterations,
        device=args.device,
        data=args.data,
        split=args.split,
        embed_dim=args.embed_dim,
        classifier=args.classifier,
        classifier_epochs=args.classifier_epochs,
        progress=not args.quiet,
    )
    print(
        f"wrote {args.out}: K={meta['k']} concepts over {meta['count']} captions"
        f"{' of the split ' + meta['split'] if meta['split'] else ''} ({meta['space']} space), "
        f"tau={meta['temperature']:.4g} ({meta['labels']} labels), {meta['seconds']['total']:.1f} s"
    )
    return 0


def register(subparsers) -> None:
    """Add `kclip concepts ...` to the kclip command line."""
    concepts = subparsers.add_parser("concepts", help="k-means concepts, soft labels and classifier C")
    sub = concepts.add_subparsers(dest="concepts_command", required=True)
    p = sub.add_parser(
        "fit",
        help="cluster a teacher store into K concepts; soft labels, classifier C and a report",
        description="k-means over the teacher's caption embeddings (standardised by default), soft labels "
        "softmax(-||e - c_k||^2 / tau) joined by sample key, the concept classifier C trained on the teacher rows "
        "against them and frozen, and report.json / report.png.",
    )
    p.add_argument("--embeddings", required=True, help="a complete teacher store (kclip teacher embed)")
    p.add_argument("--k", type=int, required=True, help="number of concepts (the paper: 100)")
    p.add_argument("--out", required=True, help="the concepts directory")
    p.add_argument("--temperature", type=float, default=None, help="tau (default: derived from the data)")
    p.add_argument("--top-k", type=int, default=None, help="store top-k labels (default: dense up to K=256, else 16)")
    p.add_argument("--spherical", action="store_true", help="cosine k-means (pair with --space normalized)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--space", choices=("standardized", "normalized", "raw"), default="standardized", help="see kclip.concepts.fit"
    )
    p.add_argument("--iterations", type=int, default=25, help="Lloyd iterations at most (25)")
    p.add_argument("--device", default="auto", help="k-means device: auto, cpu, cuda, reference")
    p.add_argument(
        "--split",
        default=None,
        help="the store's split to fit on, e.g. train (required where the store covers several splits)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="the dataset (or split) the store was made from: checks its keys (default: the store's, captions only)",
    )
    p.add_argument("--embed-dim", type=int, default=512, help="CLIP embedding width the classifier reads (512)")
    p.add_argument("--classifier", choices=("mlp", "linear"), default="mlp", help="C: width->64->K MLP, or linear")
    p.add_argument("--classifier-epochs", type=int, default=20)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_fit)
