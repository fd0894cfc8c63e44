"""`kclip export`."""

from __future__ import annotations

import argparse


def _export(args: argparse.Namespace) -> int:
    from kclip.models.export import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out)
    print(
        f"wrote {args.out}: {summary['model']} (epoch {summary['epoch']}), {summary['tensors']} tensors; load it "
        f"with open_clip.create_model('local-dir:{args.out}')"
    )
    return 0


def register(subparsers) -> None:
    """Add `kclip export` to the kclip command line."""
    p = subparsers.add_parser(
        "export",
        help="a training checkpoint's CLIP as an open_clip model folder",
        description="Write the clip part of a kclip training checkpoint (without W_e and C) as "
        "DIR/open_clip_pytorch_model.bin, DIR/open_clip_config.json and DIR/ARCH.json, loadable by "
        "open_clip.create_model('local-dir:DIR') or open_clip.create_model(ARCH, pretrained=DIR/...bin) "
        "(after open_clip.add_model_config(DIR) for an architecture open_clip does not ship, e.g. kclip-tiny).",
    )
    p.add_argument("checkpoint", help="a training checkpoint (e.g. LOGS/NAME/checkpoints/epoch_N.pt)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.set_defaults(func=_export)
