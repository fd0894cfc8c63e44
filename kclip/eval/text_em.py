"""Text-encoder exact match by caption reconstruction, after Kamath et al. 2023 ("Text encoders bottleneck
compositionality in contrastive vision-language models"), as the Knowledge-CLIP paper measures its text encoder.

1. A T5 encoder-decoder (transformers' `T5ForConditionalGeneration` from a `T5Config`, randomly initialised) is
   trained as an autoencoder of the training captions through a bottleneck: the T5 encoder's hidden states are
   mean-pooled into one sentence vector, and a Linear + LayerNorm adapter maps it to `prefix` vectors that the
   decoder cross-attends to. Its held-out EM is the paper's "T5" row: what a sentence vector of this decoder can
   carry at best.
2. The decoder is frozen. For each text encoder under test (the CLIP baseline, Knowledge-CLIP, the teacher's stored
   rows) only a fresh Linear + LayerNorm adapter from its frozen sentence embedding to the decoder's prefix is
   trained, on the same training captions. Embeddings are standardised per feature with the training captions'
   mean and standard deviation first, so encoders of any scale start alike.
3. EM is the share of evaluated captions regenerated exactly (greedy decoding) after `normalize_caption`:
   lower case, white space collapsed to single spaces, leading and trailing blanks and a final "." removed.
   Token F1 is SQuAD's: the harmonic mean of word precision and recall between the two normalised word bags.

Tokenizers: on the embedded set a word-level `WordTokenizer` over the saved grammar's words (vocab.json: 45
words, plus pad, end and unknown), so a tiny T5 needs no 32k-row embedding table; on real data a transformers
tokenizer directory the user names (`HFTokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kclip.eval.errors import EvalError

log = logging.getLogger(__name__)

TASK = "text_exact_match"

_SPACES = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Lower case, runs of white space as one space, no leading or trailing blanks, no final full stop."""
    text = _SPACES.sub(" ", text.lower()).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """bool [N]: prediction i equals reference i after `normalize_caption`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    pairs = zip(predictions, references, strict=True)
    return np.array([normalize_caption(p) == normalize_caption(r) for p, r in pairs], bool)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 between the normalised word bags (1.0 when both are empty)."""
    pred, ref = normalize_caption(prediction).split(), normalize_caption(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common: dict[str, int] = {}
    for w in pred:
        common[w] = common.get(w, 0) + 1
    overlap = 0
    for w in ref:
        if common.get(w, 0) > 0:
            common[w] -= 1
            overlap += 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- tokenizers ---------------------------------------------------------------------------------------------------


class WordTokenizer:
    """Whitespace words of normalised captions over a fixed word list; ids 0 pad, 1 end, 2 unknown, then the words."""

    pad_id, eos_id, unk_id = 0, 1, 2

    def __init__(self, words: Sequence[str]):
        self.words = sorted(set(words))
        self._ids = {w: i + 3 for i, w in enumerate(self.words)}

    @classmethod
    def from_grammar(cls, path: str | os.PathLike) -> WordTokenizer:
        """From a synthetic dataset's vocab.json (the folder or the file)."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        if not path.is_file():
            raise EvalError(f"{path}: no caption grammar (vocab.json): name a tokenizer directory with --tokenizer")
        try:
            words = json.loads(path.read_text())["words"]
        except (ValueError, KeyError, TypeError) as e:
            raise EvalError(f"{path}: not a kclip caption grammar ({type(e).__name__}: {e})") from None
        return cls(words)

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 3

    def encode(self, captions: Sequence[str]) -> list[list[int]]:
        return [[self._ids.get(w, self.unk_id) for w in normalize_caption(c).split()] + [self.eos_id] for c in captions]

    def decode(self, ids: Sequence[int]) -> str:
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= 3:
                words.append(self.words[i - 3])
            elif i == self.unk_id:
                words.append("<unk>")
        return " ".join(words)

    def unknown_share(self, captions: Sequence[str]) -> float:
        """Share of captions holding a word outside the list (they can never be regenerated exactly)."""
        return float(np.mean([self.unk_id in ids for ids in self.encode(captions)])) if captions else 0.0


class HFTokenizer:
    """A transformers tokenizer directory (e.g. a T5 tokenizer's), for captions outside the embedded grammar."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise EvalError(f"--tokenizer {path}: no such directory (a transformers tokenizer folder)")
        try:
            self.tok = AutoTokenizer.from_pretrained(os.fspath(path))
        except (OSError, ValueError) as e:
            raise EvalError(f"--tokenizer {path}: not a transformers tokenizer ({e})") from None
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        if self.tok.eos_token_id is None:
            raise EvalError(f"--tokenizer {path}: has no end-of-sequence token")
        self.pad_id, self.eos_id = self.tok.pad_token_id, self.tok.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, captions: Sequence[str]) -> list[list[int]]:
        ids = self.tok([normalize_caption(c) for c in captions], add_special_tokens=False)["input_ids"]
        return [list(x) + [self.eos_id] for x in ids]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)


# ---- the model ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EMConfig:
    """Sizes and budget of the reconstruction probe (defaults: the embedded default on 2 CPU cores).

    Attributes:
        d_model, layers, heads, d_ff: the T5 (encoder and decoder each `layers` deep).
        prefix: vectors the adapter gives the decoder to cross-attend to.
        autoencoder_steps, adapter_steps: optimizer steps of the autoencoder and of each adapter.
        batch_size: captions per step.
        lr, adapter_lr: AdamW learning rates (linear warmup over 5% of the steps, then cosine to 0).
        max_train: at most this many training captions (a seeded sample); 0: all.
        max_eval: at most this many captions of each evaluated split (the first in key order); 0: all.
    """

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    d_ff: int = 256
    prefix: int = 8
    autoencoder_steps: int = 500
    adapter_steps: int = 250
    batch_size: int = 128
    lr: float = 5e-3
    adapter_lr: float = 3e-3
    max_train: int = 10000
    max_eval: int = 1000


class Adapter(nn.Module):
    """Linear + LayerNorm: a sentence embedding [B, E] -> the decoder's prefix [B, P, d_model]."""

    def __init__(self, width: int, d_model: int, prefix: int):
        super().__init__()
        self.prefix, self.d_model = prefix, d_model
        self.linear = nn.Linear(width, prefix * d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x).view(len(x), self.prefix, self.d_model))  # [B, P, d]


def build_t5(vocab_size: int, cfg: EMConfig, pad_id: int, eos_id: int):
    """A randomly initialised T5ForConditionalGeneration of `cfg`'s sizes over `vocab_size` tokens."""
    try:
        from transformers import T5Config, T5ForConditionalGeneration
    except ImportError as e:
        raise EvalError(f"text EM trains a T5 from transformers, which does not import ({e}): pip install "
                        "'kclip[demo]'") from None  # fmt: skip

    config = T5Config(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_model // cfg.heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.layers,
        num_decoder_layers=cfg.layers,
        num_heads=cfg.heads,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
        tie_word_embeddings=True,
    )
    return T5ForConditionalGeneration(config)


def _pad(ids: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(ids), max(map(len, ids))), pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out  # [N, L]


def _lr_factor(step: int, total: int) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _fit(
    params: list[nn.Parameter],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
    progress: bool,
) -> list[float]:
    """AdamW over random batches of row indices; returns the loss every 10% of the steps."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps)
        rows = torch.randint(n, (min(batch_size, n),), generator=gen)
        loss = loss_fn(rows.to(params[0].device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            curve.append(float(loss.detach()))  # a host sync every 10% of the steps only
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
    return curve


class Reconstructor:
    """The frozen-decoder probe: an autoencoder trained once, then one adapter per text encoder.

    Args:
        tokenizer: WordTokenizer or HFTokenizer.
        train_captions: the captions the autoencoder and the adapters learn from.
        cfg: sizes and budget.
        seed: the T5's initialisation, the batches, the adapters'.
        progress: tqdm bars.
    """

    def __init__(self, tokenizer, train_captions: Sequence[str], cfg: EMConfig, seed: int = 0, progress: bool = True,
                 device: str | torch.device = "cpu"):  # fmt: skip
        if not train_captions:
            raise EvalError("text EM: no training captions to train the autoencoder on")
        self.tok, self.cfg, self.seed, self.progress = tokenizer, cfg, seed, progress
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.t5 = build_t5(tokenizer.vocab_size, cfg, tokenizer.pad_id, tokenizer.eos_id).to(self.device)
        self.bottleneck = Adapter(cfg.d_model, cfg.d_model, cfg.prefix).to(self.device)
        self.labels = self._labels(train_captions)  # [N, L]
        self.max_len = self.labels.shape[1] + 2
        self.record: dict[str, Any] = {}

    def _labels(self, captions: Sequence[str]) -> torch.Tensor:
        return _pad(self.tok.encode(captions), self.tok.pad_id).to(self.device)

    def _decoder_loss(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        target = labels.masked_fill(labels == self.tok.pad_id, -100)
        out = self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=prefix), labels=target)
        return out.loss

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.tok.pad_id).float()  # [B, L]
        hidden = self.t5.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state  # [B, L, d]
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, d]

    def train_autoencoder(self) -> dict[str, Any]:
        """Train the T5 encoder, the bottleneck and the decoder on the training captions, then freeze the decoder."""
        t0 = time.perf_counter()
        labels = self.labels
        self.t5.train()

        def loss(rows):
            batch = labels[rows]
            batch = batch[:, : int((batch != self.tok.pad_id).sum(1).max())]  # trim the batch's padding
            return self._decoder_loss(self.bottleneck(self._pool(batch)), batch)

        params = list(self.t5.parameters()) + list(self.bottleneck.parameters())
        curve = _fit(params, loss, len(labels), self.cfg.autoencoder_steps, self.cfg.batch_size, self.cfg.lr,
                     self.seed, "text-em: T5 autoencoder", self.progress)  # fmt: skip
        self.t5.eval()
        for p in self.t5.parameters():
            p.requires_grad_(False)
        self.record = {"loss_curve": curve, "seconds": round(time.perf_counter() - t0, 2),
                       "parameters": sum(p.numel() for p in params)}  # fmt: skip
        return self.record

    def train_adapter(self, embeddings: np.ndarray, name: str) -> tuple[Adapter, dict[str, Any]]:
        """A Linear + LayerNorm adapter from `embeddings` [N_train, E] (row i: training caption i) into the frozen
        decoder. Returns the adapter (standardisation folded in) and its training record."""
        if len(embeddings) != len(self.labels):
            raise EvalError(f"text EM: {name}: {len(embeddings)} training embeddings for {len(self.labels)} captions")
        t0 = time.perf_counter()
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32)).to(self.device)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - mean) / std
        torch.manual_seed(self.seed + 1)
        adapter = Adapter(x.shape[1], self.cfg.d_model, self.cfg.prefix).to(self.device)
        labels = self.labels

        def loss(rows):
            batch = labels[rows]
            batch = batch[:, : int((batch != self.tok.pad_id).sum(1).max())]
            return self._decoder_loss(adapter(x[rows]), batch)

        curve = _fit(list(adapter.parameters()), loss, len(labels), self.cfg.adapter_steps, self.cfg.batch_size,
                     self.cfg.adapter_lr, self.seed + 1, f"text-em: adapter {name}", self.progress)  # fmt: skip
        adapter.mean, adapter.std = mean, std  # applied by `generate`
        return adapter, {"loss_curve": curve, "seconds": round(time.perf_counter() - t0, 2)}

    @torch.inference_mode()
    def _greedy(self, prefix: torch.Tensor) -> list[str]:
        from transformers.modeling_outputs import BaseModelOutput

        out = self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=prefix),
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
            max_new_tokens=self.max_len,
            do_sample=False,
            num_beams=1,
        )  # [B, 1 + T]: the start token first
        return [self.tok.decode(row[1:].tolist()) for row in out]

    @torch.inference_mode()
    def reconstruct(self, captions: Sequence[str] | None = None, embeddings: np.ndarray | None = None,
                    adapter: Adapter | None = None, batch_size: int = 512) -> list[str]:  # fmt: skip
        """Greedy reconstructions: of `captions` through the autoencoder's own encoder, or of `embeddings` [N, E]
        through `adapter`."""
        out: list[str] = []
        n = len(captions) if captions is not None else len(embeddings)
        for s in range(0, n, batch_size):
            if captions is not None:
                prefix = self.bottleneck(self._pool(self._labels(captions[s : s + batch_size])))
            else:
                x = torch.as_tensor(np.asarray(embeddings[s : s + batch_size], dtype=np.float32)).to(self.device)
                prefix = adapter((x - adapter.mean) / adapter.std)
            out.extend(self._greedy(prefix))
        return out


def score(predictions: Sequence[str], references: Sequence[str], tags: Sequence[Sequence[str]] | None = None,
          examples: int = 5) -> dict[str, Any]:  # fmt: skip
    """EM, token F1, EM per phenomenon tag and a few failed reconstructions."""
    em = exact_match(predictions, references)
    f1 = np.array([token_f1(p, r) for p, r in zip(predictions, references, strict=True)])
    out: dict[str, Any] = {"exact_match": float(em.mean()), "token_f1": float(f1.mean()), "captions": len(em)}
    if tags is not None:
        per_tag: dict[str, list[bool]] = {}
        for hit, ts in zip(em, tags, strict=True):
            for t in ts:
                per_tag.setdefault(t, []).append(bool(hit))
        out["exact_match_by_tag"] = {t: float(np.mean(v)) for t, v in sorted(per_tag.items())}
        out["captions_by_tag"] = {t: len(v) for t, v in sorted(per_tag.items())}
    triples = zip(predictions, references, em, strict=True)
    out["failures"] = [{"reference": r, "reconstruction": p} for p, r, h in triples if not h][:examples]
    return out


def aggregate_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean over seeds of `score`'s results, with the standard deviation (ddof 0) of EM and token F1 and the
    per-seed EMs; per-tag EMs averaged."""
    em = np.array([r["exact_match"] for r in runs])
    f1 = np.array([r["token_f1"] for r in runs])
    out: dict[str, Any] = {
        "exact_match": float(em.mean()),
        "exact_match_std": float(em.std()),
        "token_f1": float(f1.mean()),
        "token_f1_std": float(f1.std()),
        "seeds": len(runs),
        "exact_match_per_seed": [float(x) for x in em],
        "captions": runs[0]["captions"],
    }
    if "exact_match_by_tag" in runs[0]:
        out["exact_match_by_tag"] = {t: float(np.mean([r["exact_match_by_tag"][t] for r in runs]))
                                     for t in runs[0]["exact_match_by_tag"]}  # fmt: skip
        out["captions_by_tag"] = runs[0]["captions_by_tag"]
    return out
