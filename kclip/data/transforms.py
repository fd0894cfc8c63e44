"""Image preprocessing shared by the DALI pipeline and its CPU twin: CLIP normalisation, the random resized crop
of training and the deterministic crop of evaluation.

Both pipelines express a crop as a box in source pixels resized to the output size in one resampling step (PIL's
``Image.resize(size, box=...)``, DALI's ``fn.resize`` with a region of interest), so the evaluation crop is the same
arithmetic in both and only the resampling filters differ (within 2/255 mean absolute error on decoded pixels).

Training crops follow open_clip's defaults: area share in [0.9, 1], aspect ratio in [3/4, 4/3]; no flip by default,
since a horizontal flip turns "left of" into "right of" in captions that state relations.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np

# OpenAI CLIP's per-channel mean and standard deviation of [0, 1] RGB pixels (open_clip.constants).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Preprocessing settings, the same for both pipelines.

    Attributes:
        image_size: side of the square output, pixels (224).
        scale: range of the random crop's area as a share of the image's (0.9, 1.0), training only.
        ratio: range of the random crop's aspect ratio, width / height (3/4, 4/3), training only.
        flip_p: probability of a horizontal flip (0.0), training only.
        interpolation: "bicubic" (CLIP's) or "bilinear"; both pipelines antialias when scaling down.
        mean, std: normalisation of [0, 1] pixels (CLIP's).
    """

    image_size: int = 224
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the largest centred square of an image: the evaluation crop."""
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def random_box(
    rng: random.Random, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a random crop (area share in `scale`, aspect ratio in `ratio`, log-uniform), drawn as
    torchvision's RandomResizedCrop draws it: ten tries, then the whole image clamped to the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.randint(0, width - w)
            y0 = rng.randint(0, height - h)
            return x0, y0, x0 + w, y0 + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def _resample(interpolation: str) -> Any:
    from PIL import Image

    return Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR


def pil_eval(img, cfg: TransformConfig) -> np.ndarray:
    """Deterministic evaluation crop of a PIL RGB image: the centred square resized to image_size.
    Returns uint8 [S, S, 3]."""
    box = center_box(*img.size)
    return np.asarray(img.resize((cfg.image_size, cfg.image_size), _resample(cfg.interpolation), box=box))


def pil_train(img, cfg: TransformConfig, rng: random.Random) -> np.ndarray:
    """Random resized crop (and flip with probability flip_p) of a PIL RGB image. Returns uint8 [S, S, 3]."""
    box = random_box(rng, *img.size, cfg.scale, cfg.ratio)
    out = np.asarray(img.resize((cfg.image_size, cfg.image_size), _resample(cfg.interpolation), box=box))
    if cfg.flip_p > 0 and rng.random() < cfg.flip_p:
        out = out[:, ::-1]
    return out


def normalize(images, cfg: TransformConfig):
    """uint8 [B, S, S, 3] (numpy or torch) -> float32 torch [B, 3, S, S], normalised with cfg.mean / cfg.std."""
    import torch

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # PIL's arrays are read-only
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, S, S]
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def denormalize(images, cfg: TransformConfig) -> np.ndarray:
    """Inverse of `normalize`: float [B, 3, S, S] -> float64 [B, S, S, 3] pixels in [0, 255] (for comparisons)."""
    x = np.asarray(images.cpu() if hasattr(images, "cpu") else images, dtype=np.float64)
    x = x * np.asarray(cfg.std).reshape(1, 3, 1, 1) + np.asarray(cfg.mean).reshape(1, 3, 1, 1)
    return np.transpose(x * 255.0, (0, 2, 3, 1))
