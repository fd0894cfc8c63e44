"""The models under evaluation, loaded from what `kclip train` and `kclip export` write.

A checkpoint is named `[LABEL=]PATH`, PATH one of:

- a kclip training checkpoint (`epoch_N.pt`, `latest.pt`): its `clip.*` weights in the architecture its config
  names (kclip.models.export.clip_from_checkpoint);
- a training run folder (`LOGS/NAME`): its `checkpoints/latest.pt`;
- an exported open_clip folder (`kclip export CKPT --out DIR`, or any open_clip `local-dir:` bundle holding
  `open_clip_config.json`): `open_clip.create_model("local-dir:DIR")`.

LABEL defaults to the run's name (the checkpoint's `name`, or the folder's name). Both kinds give the same
features for the same weights: the image preprocessing is the model's own open_clip preprocess config (size,
mean, std, interpolation) and captions go through open_clip's CLIP tokenizer, as in training.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from kclip.eval.errors import EvalError

OPEN_CLIP_CONFIG = "open_clip_config.json"  # kclip.models.export.CONFIG, without importing torch-heavy modules


@dataclasses.dataclass
class Encoder:
    """A CLIP under evaluation.

    Attributes:
        label: the name in tables and file names.
        path: the checkpoint or folder it came from.
        kind: "kclip" (a training checkpoint) or "open_clip" (an exported folder).
        model: the architecture's name.
        clip: the open_clip model, in eval mode, on `device`.
        image_size, mean, std, interpolation: its image preprocessing.
        epoch: the checkpoint's epochs completed (None for an exported folder).
    """

    label: str
    path: str
    kind: str
    model: str
    clip: torch.nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    epoch: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def transform_config(self):
        """The loaders' TransformConfig for this model's evaluation preprocessing."""
        from kclip.data.transforms import TransformConfig

        return TransformConfig(image_size=self.image_size, mean=self.mean, std=self.std,
                               interpolation=self.interpolation)  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "path": self.path, "kind": self.kind, "model": self.model, "epoch": self.epoch}


def parse_spec(spec: str) -> tuple[str | None, str]:
    """`LABEL=PATH` -> (LABEL, PATH); a bare PATH -> (None, PATH)."""
    label, sep, path = spec.partition("=")
    if sep and label and os.sep not in label and not os.path.exists(spec):
        return label, path
    return None, spec


def _preprocess(clip: torch.nn.Module, where: str) -> tuple[int, tuple, tuple, str]:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip)
    size = cfg.get("size") or clip.visual.image_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise EvalError(f"{where}: non-square input size {tuple(size)}: kclip's loaders make square images")
        size = size[0]
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    return int(size), tuple(cfg["mean"]), tuple(cfg["std"]), interpolation


def load_encoder(spec: str, device: str | torch.device = "cpu") -> Encoder:
    """Load `[LABEL=]PATH` (module docstring) in eval mode on `device`.

    Raises:
        EvalError: a path that does not exist or is neither a checkpoint nor an exported folder.
        ExportError: a training checkpoint that is not readable or whose weights do not fit its architecture.
    """
    label, path_s = parse_spec(spec)
    path = Path(path_s)
    if not path.exists():
        raise EvalError(f"--checkpoint {path}: no such file or folder")
    epoch = None
    if path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():
        import open_clip

        from kclip.models import register_model_configs

        register_model_configs()
        try:
            clip = open_clip.create_model(f"local-dir:{path}", device="cpu")
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            raise EvalError(f"--checkpoint {path}: not a loadable open_clip folder ({type(e).__name__}: {e})") from None
        archs = [p.stem for p in path.glob("*.json") if p.name != OPEN_CLIP_CONFIG]  # kclip export writes ARCH.json
        model = archs[0] if len(archs) == 1 else f"local-dir:{path.name}"
        kind, name = "open_clip", path.name
    else:
        if path.is_dir():
            latest = path / "checkpoints" / "latest.pt"
            if not latest.is_file():
                raise EvalError(
                    f"--checkpoint {path}: a folder with neither {OPEN_CLIP_CONFIG} (an exported model) nor "
                    "checkpoints/latest.pt (a training run)"
                )
            path = latest
        from kclip.models.export import clip_from_checkpoint

        clip, ckpt = clip_from_checkpoint(path)
        model, epoch, kind = ckpt["config"]["model"], ckpt.get("epoch"), "kclip"
        name = ckpt.get("name") or path.parent.parent.name
    clip = clip.to(device).eval()
    size, mean, std, interpolation = _preprocess(clip, f"--checkpoint {path}")
    return Encoder(label=label or str(name), path=str(path), kind=kind, model=model, clip=clip, image_size=size,
                   mean=mean, std=std, interpolation=interpolation, epoch=epoch)  # fmt: skip
