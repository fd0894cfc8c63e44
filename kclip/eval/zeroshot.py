"""Zero-shot classification from prompt templates and class names, as CLIP_benchmark reports it (`acc1`, `acc5`,
`mean_per_class_recall`): each class's text embedding is the mean of its L2-normalised template embeddings,
normalised again; an image is given the class of highest cosine similarity."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

TASK = "zeroshot_classification"

# The synthetic set's captions open with these phrasings, and CLIP's own ImageNet templates with the first.
TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "an image of a {}.", "a picture of a {}.", "there is a {}.")


def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                     templates: Sequence[str] = TEMPLATES) -> torch.Tensor:  # fmt: skip
    """float32 [C, E]: each class's mean template embedding, L2-normalised. `encode_text` maps captions to
    L2-normalised embeddings [n, E]."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = encode_text(prompts).view(len(class_names), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def classify(image: torch.Tensor, classes: torch.Tensor, labels: np.ndarray, candidates: np.ndarray | None = None,
             ks: Sequence[int] = (1, 5)) -> dict[str, float]:  # fmt: skip
    """Top-K accuracy and the mean per-class recall of images [N, E] against class embeddings [C, E].

    Args:
        labels: int64 [N], the right class of each image.
        candidates: the classes to choose among (default all C); every label must be one of them.
    """
    labels = np.asarray(labels, dtype=np.int64)
    candidates = np.arange(len(classes)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if not np.isin(labels, candidates).all():
        raise ValueError("a label outside the candidate classes")
    logits = image @ classes[torch.as_tensor(candidates)].T  # [N, C']
    order = candidates[logits.argsort(dim=1, descending=True).numpy()]  # [N, C'], class ids by score
    out = {}
    for k in ks:
        hit = (order[:, : min(k, len(candidates))] == labels[:, None]).any(1)
        out[f"acc{k}"] = float(hit.mean())
    top1 = order[:, 0] == labels
    out["mean_per_class_recall"] = float(np.mean([top1[labels == c].mean() for c in np.unique(labels)]))
    return out
