"""Caption tokenisation with open_clip's bundled BPE tokenizer (no network), imported on first use."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

CONTEXT_LENGTH = 77

Tokenizer = Callable[[Sequence[str]], "object"]  # list of captions -> LongTensor [B, context_length]


@functools.cache
def clip_tokenizer(context_length: int = CONTEXT_LENGTH) -> Tokenizer:
    """open_clip's SimpleTokenizer (CLIP's BPE vocabulary, lower-cased): captions -> LongTensor [B, context_length].

    Built once per process (the CPU loader builds it before it forks its workers, which inherit it).
    """
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise ImportError("tokenising captions needs open_clip (pip install open_clip_torch)") from e
    return SimpleTokenizer(context_length=context_length)


def tokenize(captions: Sequence[str], tokenizer: Tokenizer | None = None):
    """LongTensor [B, L] of captions, with `tokenizer` or CLIP's."""
    return (tokenizer or clip_tokenizer())(list(captions))
