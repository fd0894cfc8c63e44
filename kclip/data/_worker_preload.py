"""Imported once by the fork server of kclip's data processes (kclip.data.shards.process_context): what every
worker needs, loaded before the workers are forked from it."""

import kclip.data.index  # noqa: F401  (the index pool's work)
import kclip.data.loader  # noqa: F401  (torch, PIL, numpy, the transforms)
import kclip.data.synth  # noqa: F401  (the synth pool's work)
from kclip.data.tokenize import clip_tokenizer

clip_tokenizer()  # open_clip's import (seconds) and CLIP's BPE vocabulary: once, in the server, not per worker
