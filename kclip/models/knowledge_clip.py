"""KnowledgeCLIP: an open_clip model with the two Knowledge-CLIP parts on top (arXiv 2412.03513).

- ``clip``: any open_clip architecture, by name (``kclip-tiny`` is the embedded one, for tests and smoke runs).
- ``distill_head`` W_e: maps the student's L2-normalised text embedding [B, E] to the teacher's width [B, D], so
  the text distillation loss can compare it with the LLM teacher's caption embedding. "linear" is the paper's
  single linear map; "mlp" (E -> 64 -> D with a ReLU) is the authors' code.
- ``concept_classifier`` C: the frozen classifier fitted offline (``kclip concepts fit``), applied to the image
  embedding to give concept logits; C's weights never change, but gradients pass through it to the image tower.

The module is library code: it builds and runs the model; the losses and the training loop live elsewhere.
"""

from __future__ import annotations

import difflib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kclip.errors import KclipError
from kclip.models import PRECISIONS

DISTILL_HEADS = ("linear", "mlp")
MLP_HIDDEN = 64  # the hidden width of the authors' W_e
_LOW_PRECISION = {
    "fp16": torch.float16,
    "pure_fp16": torch.float16,
    "bf16": torch.bfloat16,
    "pure_bf16": torch.bfloat16,
}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
CONFIG_DIR = Path(__file__).parent / "model_configs"
_SCHEMAS = ("hf-hub:", "local-dir:")
_FAMILIAR = ("kclip-tiny", "RN50", "ViT-B-32", "ViT-B-16", "ViT-L-14")  # named when a model is unknown
_registered = False


class ModelError(KclipError, ValueError):
    """A model that cannot be built as asked (architecture, pretrained weights, head); the message names it."""


def register_model_configs() -> None:
    """Add kclip's architectures (kclip/models/model_configs/*.json, e.g. kclip-tiny) to open_clip's registry.

    Done on first use rather than at import, so `import kclip` does not import open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def _model_cfg(name: str) -> dict[str, Any]:
    """open_clip's config of architecture `name` (a built-in name or a local-dir: folder); ModelError if unknown."""
    import open_clip

    try:
        cfg = open_clip.get_model_config(name if name.startswith(_SCHEMAS) else name.replace("/", "-"))
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {name}: cannot read its open_clip config ({type(e).__name__}: {e})") from None
    if cfg is None:
        known = open_clip.list_models()
        close = difflib.get_close_matches(name, known, n=3)
        few = ", ".join(dict.fromkeys(close + [m for m in _FAMILIAR if m in known]))
        raise ModelError(
            f"--model {name}: unknown open_clip architecture ({len(known)} known, e.g. {few}); to add one, put "
            f"NAME.json (embed_dim, vision_cfg, text_cfg) in {CONFIG_DIR} or call open_clip.add_model_config(PATH)"
        )
    return cfg


def model_embed_dim(name: str) -> int:
    """The embedding width E of open_clip architecture `name` (what the concept classifier C must read)."""
    register_model_configs()
    return int(_model_cfg(name)["embed_dim"])


def make_distill_head(kind: str, embed_dim: int, teacher_width: int) -> nn.Module:
    """W_e: the map from the student's text embedding (width E) to the teacher's (width D).

    Args:
        kind: "linear" (the paper: one nn.Linear E -> D) or "mlp" (the authors' code: E -> 64 -> D, ReLU).
        embed_dim: E, the CLIP embedding width.
        teacher_width: D, the teacher's embedding width.
    """
    if kind not in DISTILL_HEADS:
        raise ModelError(f"--distill-head {kind!r}: expected one of {', '.join(DISTILL_HEADS)}")
    if int(teacher_width) <= 0:
        raise ModelError(f"teacher width {teacher_width}: must be a positive number of features")
    if kind == "linear":
        return nn.Linear(embed_dim, teacher_width)
    return nn.Sequential(nn.Linear(embed_dim, MLP_HIDDEN), nn.ReLU(), nn.Linear(MLP_HIDDEN, teacher_width))


class KnowledgeCLIP(nn.Module):
    """An open_clip model with the distillation head W_e and the frozen concept classifier C (module docstring).

    Args:
        clip: an open_clip model (CLIP or CustomTextCLIP).
        embed_dim: E, the width of its image and text embeddings.
        distill_head: W_e ([B, E] -> [B, D]), or None to train without text distillation.
        concept_classifier: C ([B, E] -> [B, K]), or None to train without concepts; it is frozen here.
        name: the architecture's name, for messages.
    """

    def __init__(
        self,
        clip: nn.Module,
        *,
        embed_dim: int,
        distill_head: nn.Module | None = None,
        concept_classifier: nn.Module | None = None,
        name: str = "",
    ):
        super().__init__()
        self.clip = clip
        self.distill_head = distill_head
        self.concept_classifier = concept_classifier
        self.name = name
        self._embed_dim = int(embed_dim)
        if concept_classifier is not None:
            concept_classifier.requires_grad_(False)
            concept_classifier.eval()

    def train(self, mode: bool = True) -> KnowledgeCLIP:
        """As nn.Module.train, except that C stays in eval mode: it is a fixed function of the features."""
        super().train(mode)
        if self.concept_classifier is not None:
            self.concept_classifier.eval()
        return self

    @property
    def embed_dim(self) -> int:
        """E, the width of the image and text embeddings."""
        return self._embed_dim

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's image preprocessing config of the model (size, mean, std, interpolation, resize_mode)."""
        import open_clip

        return open_clip.get_model_preprocess_cfg(self.clip)

    @property
    def image_size(self) -> int | tuple[int, int]:
        """The input resolution: an int for square inputs (the usual case), else (height, width)."""
        size = self.preprocess_cfg.get("size") or self.clip.visual.image_size
        if isinstance(size, (tuple, list)):
            size = tuple(int(s) for s in size)
            return size[0] if size[0] == size[1] else size
        return int(size)

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.preprocess_cfg["mean"])

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.preprocess_cfg["std"])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (open_clip's)."""
        self.clip.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The CLIP image embedding, [B, 3, H, W] -> [B, E] (open_clip's encode_image)."""
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The CLIP text embedding, [B, L] -> [B, E] (open_clip's encode_text)."""
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embeddings and the Knowledge-CLIP heads' outputs.

        Args:
            images: preprocessed images.
            tokens: token ids (open_clip's tokenizer).

        Returns:
            "image_features", "text_features": L2-normalised embeddings; "logit_scale": exp of the learned
            temperature (one element); "logit_bias" where the model has one (SigLIP); "projected_text":
            W_e(text_features), only with a distill head; "concept_logits": C(image_features), only with C.

        Shapes:
            images [B, 3, H, W], tokens [B, L] -> image_features, text_features [B, E]; projected_text [B, D];
            concept_logits [B, K].
        """
        image_features = self.clip.encode_image(images, normalize=True)  # [B, E]
        text_features = self.clip.encode_text(tokens, normalize=True)  # [B, E]
        out = {
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if getattr(self.clip, "logit_bias", None) is not None:
            out["logit_bias"] = self.clip.logit_bias
        if self.distill_head is not None:
            out["projected_text"] = self.distill_head(text_features)  # [B, D]
        if self.concept_classifier is not None:
            out["concept_logits"] = self.concept_classifier(image_features)  # [B, K]
        return out


def missing_pretrained(model: str, pretrained: str | None) -> str | None:
    """Why `pretrained` weights of `model` cannot be loaded without a network, or None where they can: a local
    file, or an open_clip tag whose weights are in the Hugging Face cache (what `kclip run` checks first)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    if pretrained is None or os.path.isfile(pretrained) or model.startswith(_SCHEMAS):
        return None
    try:
        _check_pretrained(model, pretrained)
    except ModelError as e:
        return str(e)
    cfg = open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained)
    hub = (cfg.get("hf_hub") or "").split("/")  # "org/name/" or "org/name/file"
    if len(hub) >= 2:
        repo, filename = "/".join(hub[:2]), "/".join(hub[2:])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
            return None
        where = f"the Hugging Face cache (repo {repo}; `huggingface-cli download {repo}` on a machine with a network)"
    else:
        where = "open_clip's cache"
    return f"--pretrained {pretrained}: the weights of {model} are not in {where}, or pass a local checkpoint file"


def _check_pretrained(model: str, pretrained: str) -> None:
    """Refuse, before anything is built, a `pretrained` that is neither a file nor one of `model`'s open_clip tags."""
    import open_clip

    if os.path.isfile(pretrained) or model.startswith(_SCHEMAS):  # open_clip ignores pretrained with a schema
        return
    if open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(model.replace("/", "-"))
    looks_like_path = os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
    what = "no such file" if looks_like_path else "neither a file nor a pretrained tag of this architecture"
    raise ModelError(f"--pretrained {pretrained}: {what} (tags of {model}: {', '.join(tags) if tags else 'none'})")


def build_model(
    model: str,
    *,
    pretrained: str | os.PathLike | None = None,
    teacher_width: int | None = None,
    distill_head: str = "linear",
    concepts: str | os.PathLike | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> KnowledgeCLIP:
    """Build a KnowledgeCLIP.

    Args:
        model: an open_clip architecture name (open_clip.list_models(), or "kclip-tiny"), or "local-dir:DIR" /
            "hf-hub:ORG/REPO" as open_clip accepts them.
        pretrained: an open_clip pretrained tag of `model` or a local open_clip checkpoint file (e.g. what
            `kclip export` writes); None: random weights.
        teacher_width: D, the teacher's embedding width; None builds no distill head.
        distill_head: W_e's form, "linear" (the paper) or "mlp" (the authors' code, E -> 64 -> D).
        concepts: a concepts directory (kclip concepts fit) whose frozen classifier C reads the image embedding;
            its input width must equal the model's embedding width E.
        precision: open_clip's precision (PRECISIONS); W_e and C get the dtype of the CLIP's outputs.
        device: where the model is put.
        cache_dir: where open_clip caches downloaded weights.

    Raises:
        ModelError: an unknown architecture, precision or head, a teacher width <= 0, a pretrained value that is
            neither a file nor a tag, or weights that do not load into the architecture.
        ConceptsError: a concepts directory that is not one, or whose C reads another width than E.
    """
    import open_clip

    register_model_configs()
    if distill_head not in DISTILL_HEADS:
        raise ModelError(f"--distill-head {distill_head!r}: expected one of {', '.join(DISTILL_HEADS)}")
    if teacher_width is not None and int(teacher_width) <= 0:
        raise ModelError(f"teacher width {teacher_width}: must be a positive number of features")
    if precision not in PRECISIONS:
        raise ModelError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    remote = model.startswith("hf-hub:")
    cfg = None if remote else _model_cfg(model)  # fail on an unknown name before building anything
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
        _check_pretrained(model, pretrained)
    concept_set = None
    if concepts is not None:
        from kclip.concepts import Concepts

        concept_set = Concepts(concepts)
        if cfg is not None:  # check the widths before building the model, not after
            concept_set.check_embed_dim(cfg["embed_dim"], what=f"--model {model}")
    try:
        clip = open_clip.create_model(
            model,
            pretrained=pretrained,
            precision=precision,
            device=device,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        )
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        what = f"--pretrained {pretrained}" if pretrained else f"--model {model}"
        hint = ""
        if pretrained and os.path.isfile(pretrained):
            hint = "; a kclip training checkpoint (epoch_N.pt) loads after `kclip export CKPT --out DIR`"
        raise ModelError(f"{what}: cannot load it into {model} ({type(e).__name__}: {e}){hint}") from None
    if cfg is None:
        cfg = _model_cfg(model)
    embed_dim = int(cfg["embed_dim"])
    dtype = _LOW_PRECISION.get(precision, torch.float32)
    head = None
    if teacher_width is not None:
        head = make_distill_head(distill_head, embed_dim, int(teacher_width)).to(device=device, dtype=dtype)
    classifier = None
    if concept_set is not None:
        classifier = concept_set.classifier(map_location=device, embed_dim=embed_dim, what=f"--model {model}")
        classifier = classifier.to(device=device, dtype=dtype)
    return KnowledgeCLIP(clip, embed_dim=embed_dim, distill_head=head, concept_classifier=classifier, name=model)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # open_clip_train's rule: gains, biases and the temperature are not decayed
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups as open_clip_train's main.py makes them: no weight decay for parameters with
    fewer than 2 dimensions or whose names contain "bn", "ln", "bias" or "logit_scale", `weight_decay` for the
    rest; frozen parameters (C's) are left out. Empty groups are dropped."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": float(weight_decay)},
    ]
    return [g for g in groups if g["params"]]
