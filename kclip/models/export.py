"""`kclip export`: a training checkpoint's CLIP as a plain open_clip model folder.

A training checkpoint is a ``torch.save``'d dict in open_clip_train's layout (``epoch``, ``name``, ``state_dict``,
``optimizer``, ``scaler``, ...) whose ``state_dict`` is a KnowledgeCLIP's (keys possibly prefixed by DDP's
``module.`` or torch.compile's ``_orig_mod.``) and whose ``config`` names the architecture (``config["model"]``).

The folder holds what open_clip's ``local-dir:`` loader expects (open_clip.factory.create_model):

- ``open_clip_pytorch_model.bin``: the ``clip.`` part of the state dict, prefixes removed (W_e and C are
  training-time parts and are left out);
- ``open_clip_config.json``: ``{"model_cfg": <the architecture's config>, "preprocess_cfg": {...}}``, as
  open_clip's own save_config_for_hf writes it;
- ``<ARCH>.json``: the bare architecture config, so that ``open_clip.add_model_config(DIR)`` registers an
  architecture open_clip does not ship (kclip-tiny) where kclip is not installed.

So both ``open_clip.create_model(ARCH, pretrained="DIR/open_clip_pytorch_model.bin")`` and
``open_clip.create_model("local-dir:DIR")`` give the trained model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kclip._atomic import atomic_path
from kclip.errors import KclipError

WEIGHTS = "open_clip_pytorch_model.bin"
CONFIG = "open_clip_config.json"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's
_PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")


class ExportError(KclipError, ValueError):
    """A checkpoint that cannot be exported; the message names it and why."""


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` with DDP's "module." and torch.compile's "_orig_mod." key prefixes removed (in any nesting)."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A kclip training checkpoint's dict, checked to hold a state_dict and the config naming its architecture.

    Raises:
        ExportError: a missing or unreadable file, or one that is not a kclip training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint")
    try:
        # weights_only=False: a training checkpoint also holds the RNG states (python tuples, numpy arrays), which
        # the weights-only unpickler refuses. Load only checkpoints you trust, as with any pickle.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch and pickle raise many types
        raise ExportError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise ExportError(f"{path}: holds a {type(ckpt).__name__}, not a training checkpoint dict")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ExportError(f"{path}: no state_dict of tensors: not a training checkpoint")
    config = ckpt.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise ExportError(f"{path}: no config naming the architecture (config['model']): not a kclip checkpoint")
    return ckpt


@contextlib.contextmanager
def _no_random_weights_warning():
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" (logged on the root logger)."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def clip_from_checkpoint(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The open_clip model of a kclip training checkpoint, its clip.* weights loaded strictly, on the CPU.

    Returns:
        (clip, ckpt): the model (train mode, as open_clip builds it) and the checkpoint's dict.

    Raises:
        ExportError: as read_checkpoint, or a checkpoint without clip.* weights, an architecture open_clip does
            not know, or weights that do not fit it.
    """
    import open_clip

    from kclip.models.knowledge_clip import ModelError, _model_cfg, register_model_configs

    path = Path(checkpoint)
    ckpt = read_checkpoint(path)
    arch = ckpt["config"]["model"]
    clip_state = {k[len("clip.") :]: v for k, v in strip_prefixes(ckpt["state_dict"]).items() if k.startswith("clip.")}
    if not clip_state:
        raise ExportError(f"{path}: its state_dict has no clip.* entries: not a KnowledgeCLIP checkpoint")
    register_model_configs()
    try:
        _model_cfg(arch)
    except ModelError as e:
        raise ExportError(f"{path}: {e}") from None
    with _no_random_weights_warning():  # the weights are loaded right after
        clip = open_clip.create_model(arch, device="cpu")
    try:
        clip.load_state_dict(clip_state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: its clip weights do not fit architecture {arch} ({e})") from None
    return clip, ckpt


def _preprocess_cfg(clip: torch.nn.Module, arch: str, pretrained: str | None) -> dict[str, Any]:
    """The preprocessing the model was trained with: the built model's (open_clip's defaults, or a local-dir
    bundle's), overlaid with the pretrained tag's where the run started from one (a tag may carry its own mean/std),
    at the architecture's image size."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = {**asdict(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(clip)}
    size = cfg["size"]
    if pretrained and not os.path.isfile(pretrained) and not arch.startswith(("local-dir:", "hf-hub:")):
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(arch, pretrained))
        cfg["size"] = size  # the tag's size is its architecture's, which the checkpoint's config names
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in _PREPROCESS_KEYS}


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the CLIP of training checkpoint `checkpoint` as an open_clip model folder `out` (module docstring).

    The weights are first loaded (strictly) into the architecture the checkpoint's config names, so a folder that
    is written is one open_clip loads. Each file is written atomically.

    Returns:
        {"model", "epoch", "weights", "config", "tensors"}: the architecture, the checkpoint's epoch, the paths
        written and the number of tensors exported.

    Raises:
        ExportError: a missing or unreadable checkpoint, one without "state_dict" or "config" (naming the
            architecture), one without clip.* weights, an architecture open_clip does not know, or weights that
            do not fit it.
    """
    from kclip.models.knowledge_clip import _model_cfg

    clip, ckpt = clip_from_checkpoint(checkpoint)
    config = ckpt["config"]
    arch = config["model"]
    model_cfg = _model_cfg(arch)
    clip_state = clip.state_dict()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(clip, arch, config.get("pretrained"))}
    with atomic_path(out / WEIGHTS) as tmp:
        torch.save(clip_state, tmp)
    with atomic_path(out / CONFIG) as tmp:
        tmp.write_text(json.dumps(bundle, indent=2) + "\n")
    if "/" not in arch and ":" not in arch:
        with atomic_path(out / f"{arch}.json") as tmp:
            tmp.write_text(json.dumps(model_cfg, indent=2) + "\n")
    return {
        "model": arch,
        "epoch": ckpt.get("epoch"),
        "weights": str(out / WEIGHTS),
        "config": str(out / CONFIG),
        "tensors": len(clip_state),
    }
