"""Features of the models under evaluation, computed once per model and split, in batches, under
`torch.inference_mode`, on the model's device: L2-normalised image and text embeddings (float32, on the CPU) in
the key order of kclip's evaluation loaders, with each sample's key, caption and metadata."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from kclip.eval.encoders import Encoder
from kclip.eval.errors import EvalError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SplitFeatures:
    """One split through one model.

    Attributes:
        split: the split's name.
        keys, captions: [N], in key order.
        image, text: float32 [N, E], L2-normalised.
        labels: int64 [N] (None where the samples carry no class).
        attributes: uint8 [N, A] (None where they carry none).
        tags: [N] lists of phenomenon tags (None where they carry none).
        seconds: the pass's wall time.
    """

    split: str
    keys: list[str]
    captions: list[str]
    image: torch.Tensor
    text: torch.Tensor
    labels: np.ndarray | None
    attributes: np.ndarray | None
    tags: list[list[str]] | None
    seconds: float

    def __len__(self) -> int:
        return len(self.keys)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def split_features(
    encoder: Encoder,
    path: str,
    split: str,
    *,
    batch_size: int = 256,
    workers: int = 2,
    max_samples: int = 0,
    text: bool = True,
    progress: bool = True,
) -> SplitFeatures:
    """Image and text features of the split at `path` (a split folder of a dataset root), in key order.

    Args:
        max_samples: only the first this many samples in key order (0: all).
        text: also the text features (False: `text` is an empty [N, 0] tensor, for the image-only probes).

    Raises:
        EvalError: an empty split. DataError: a path in the wrong layout or unindexed shards.
    """
    from tqdm.auto import tqdm

    from kclip.data.pipeline import build_loader

    t0 = time.perf_counter()
    loader = build_loader(path, batch_size=batch_size, train=False, cfg=encoder.transform_config(), backend="auto"
                          if encoder.device.type == "cuda" else "cpu", num_workers=workers)  # fmt: skip
    images, texts, keys, captions, labels, attributes, tags = [], [], [], [], [], [], []
    device = encoder.device
    total = len(loader) if not max_samples else min(len(loader), -(-max_samples // batch_size))
    bar = tqdm(total=total, desc=f"features {encoder.label} {split}", disable=not progress, leave=False)
    with torch.inference_mode(), _autocast(device):
        for b in loader:
            images.append(encoder.clip.encode_image(b["image"].to(device, non_blocking=True), normalize=True).float())
            if text:
                tokens = b["tokens"].to(device, non_blocking=True)
                texts.append(encoder.clip.encode_text(tokens, normalize=True).float())
            keys += b["key"]
            captions += b["caption"]
            if "label" in b:
                labels.append(b["label"].cpu().numpy())
            if "attributes" in b:
                attributes.append(b["attributes"].cpu().numpy())
            if "tags" in b:
                tags += b["tags"]
            bar.update()
            if max_samples and len(keys) >= max_samples:
                break
    bar.close()
    if not keys:
        raise EvalError(f"{path}: the split {split!r} has no usable samples")
    n = min(len(keys), max_samples) if max_samples else len(keys)
    whole = lambda parts: np.concatenate(parts)[:n] if parts and sum(map(len, parts)) >= n else None
    return SplitFeatures(
        split=split,
        keys=keys[:n],
        captions=captions[:n],
        image=torch.cat(images)[:n].cpu(),
        text=torch.cat(texts)[:n].cpu() if text else torch.zeros(n, 0),
        labels=whole(labels),
        attributes=whole(attributes),
        tags=tags[:n] if len(tags) >= n else None,
        seconds=time.perf_counter() - t0,
    )


def text_features(encoder: Encoder, captions: Sequence[str], *, batch_size: int = 512) -> torch.Tensor:
    """float32 [N, E]: the L2-normalised text embeddings of `captions` (open_clip's CLIP tokenizer)."""
    from kclip.data.tokenize import tokenize

    device, out = encoder.device, []
    with torch.inference_mode(), _autocast(device):
        for s in range(0, len(captions), batch_size):
            tokens = tokenize(captions[s : s + batch_size]).to(device)
            out.append(encoder.clip.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def image_list_features(encoder: Encoder, data, *, batch_size: int = 256, workers: int = 2,
                        progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
    """Image features of an AttributeData (AWA2, CUB) in row order: (float32 [M, E], int64 [M] rows kept); images
    that do not load are skipped, counted and logged."""
    from tqdm.auto import tqdm

    device, feats, rows, bad = encoder.device, [], [], []
    loader = data.loader(encoder.transform_config(), batch_size=batch_size, num_workers=workers)
    with torch.inference_mode(), _autocast(device):
        for b in tqdm(loader, desc=f"features {encoder.label} {data.name}", disable=not progress, leave=False):
            bad += b.get("bad", [])
            if len(b["index"]):
                feats.append(encoder.clip.encode_image(b["image"].to(device), normalize=True).float().cpu())
                rows.append(b["index"].numpy())
    if bad:
        log.warning("%s: %d images that do not load were skipped (first: %s)", data.root, len(bad), bad[0])
    if not feats:
        raise EvalError(f"{data.root}: no image of the {data.name} set loads")
    return torch.cat(feats), np.concatenate(rows)
