"""Imported once by the fork server of the CPU loader's workers (kclip.data.loader.worker_context): what every
worker needs, loaded before the workers are forked from it."""

import kclip.data.loader  # noqa: F401  (torch, PIL, numpy, the transforms)
from kclip.data.tokenize import clip_tokenizer

clip_tokenizer()  # CLIP's BPE vocabulary, ~1.5 s to build: once, in the server
