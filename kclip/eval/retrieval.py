"""Zero-shot retrieval between the images of a split and their captions (one caption per image), as CLIP_benchmark
reports it: `image_retrieval_recall@K` is text→image (each caption retrieves among all images; a hit when its own
image is among the top K), `text_retrieval_recall@K` is image→text.

Ties count against the query: the rank of the right item is the number of other items scoring at least as high,
so a model whose embeddings collapse to one point scores chance, not 100%. Captions repeated word for word (common
in a small grammar) are distinct items: retrieving an identical caption of another image is a miss, as in
CLIP_benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TASK = "zeroshot_retrieval"
KS: tuple[int, ...] = (1, 5, 10)


def recall_at_k(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = KS, chunk: int = 4096) -> dict[str, float]:
    """Recall@K both ways for paired features image [N, E] and text [N, E] (row i of each is pair i)."""
    if image.shape != text.shape:
        raise ValueError(f"unpaired features: image {tuple(image.shape)}, text {tuple(text.shape)}")
    n = len(image)
    ranks = {"image": [], "text": []}  # image: text→image queries; text: image→text queries
    for s in range(0, n, chunk):
        q = slice(s, min(n, s + chunk))
        t2i = text[q] @ image.T  # [q, N]
        i2t = image[q] @ text.T
        idx = torch.arange(q.start, q.stop)
        for name, sc in (("image", t2i), ("text", i2t)):
            right = sc[torch.arange(len(idx)), idx][:, None]
            ranks[name].append((sc >= right).sum(1) - 1)
    out = {}
    for name in ("image", "text"):
        r = torch.cat(ranks[name])
        for k in ks:
            out[f"{name}_retrieval_recall@{k}"] = float((r < k).float().mean())
    return out
