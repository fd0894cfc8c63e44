"""What `kclip run` runs: a preset (smoke, default, large) with a YAML file and the command line over it.

A run config has one section per stage; each section's keys are that stage's options, with dashes or underscores:

```yaml
name: default            # runs/<name>/
data:     {source: synth, num_samples: 20000, ...}   # or source: DIR, a webdataset split into train / heldout
teacher:  {model: smollm2, ...}                      # kclip teacher embed
concepts: {k: 100, ...}                              # kclip concepts fit (embed_dim follows the model)
train:    {model: kclip-tiny, alpha: 1, ...}         # the flags of kclip train
eval:     {splits: heldout,compositional, ...}       # kclip eval
budget:   {data: 60, teacher: 180, ...}              # seconds per stage (docs/contracts.md); null: none
```

An unknown section or key is an error naming the file and the key; `kclip train --config` reads the same file's
`train:` section, so one file describes a run and its training alone.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from kclip.errors import KclipError

STAGES = ("data", "teacher", "concepts", "train", "eval", "report")
SECTIONS = ("data", "teacher", "concepts", "train", "eval", "budget")

# The embedded default: 2 CPU cores, no network, within 15 minutes (docs/contracts.md, "Time budget").
DEFAULT: dict[str, Any] = {
    "name": "default",
    "data": {
        "source": "synth",  # generate kclip's synthetic set; or a webdataset folder (see pipeline.data_stage)
        "num_samples": 20000,
        "num_heldout": 2000,
        "num_compositional": 2000,
        "image_size": 128,
        "shard_size": 1000,
        "seed": 0,
        "train_samples": None,  # a webdataset source: the training and evaluation pairs taken from it
        "heldout_samples": None,
    },
    "teacher": {"model": "smollm2", "pooling": "mean", "dtype": "bf16", "max_length": 128, "batch_size": None},
    "concepts": {
        "k": 100,
        "iterations": 25,
        "space": "standardized",
        "temperature": None,
        "top_k": None,
        "classifier": "mlp",
        "classifier_epochs": 20,
        "seed": 0,
    },
    "train": {
        "model": "kclip-tiny",
        "distill-head": "linear",
        "alpha": 1.0,
        "beta": 0.01,
        "gamma": 1.0,
        "batch-size": 32,
        "epochs": 1,
        "lr": 1.0e-3,
        "wd": 0.1,
        "warmup": 50,
        "lr-scheduler": "cosine",
        "precision": "fp32",
        "workers": 2,
        "log-every-n-steps": 10,
        "seed": 0,
    },
    "eval": {
        "splits": "heldout,compositional",
        "tasks": None,
        "attribute_data": None,  # "awa2:DIR,cub:DIR": AWA2 / CUB in their released layouts
        "tokenizer": None,  # a transformers tokenizer folder for text EM outside the synthetic grammar
        "batch_size": 256,
        "workers": 2,
        "probe_max_train": 5000,
        "autoencoder_steps": 500,
        "adapter_steps": 250,
        "max_train_captions": 10000,
        "max_eval_captions": 1000,
        "seeds": 1,
    },
    "budget": {"data": 60, "teacher": 180, "concepts": 60, "train": 360, "eval": 210, "report": 30},
}

# Overlays of DEFAULT. smoke: the CI run, under 3 minutes on 2 cores; large: 5x the data and 4x the probe budget,
# for a GPU or a patient CPU (no budget).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "name": "smoke",
        "data": {"num_samples": 512, "num_heldout": 96, "num_compositional": 96, "image_size": 64, "shard_size": 256},
        "concepts": {"k": 8, "iterations": 10, "classifier_epochs": 5},
        "train": {"batch-size": 32, "warmup": 2, "log-every-n-steps": 2, "workers": 1},
        "eval": {
            "autoencoder_steps": 60,
            "adapter_steps": 30,
            "max_train_captions": 512,
            "max_eval_captions": 96,
            "probe_max_train": 512,
            "workers": 1,
        },  # fmt: skip
        "budget": {"data": 10, "teacher": 50, "concepts": 10, "train": 40, "eval": 60, "report": 10},
    },
    "default": {},
    "large": {
        "name": "large",
        "data": {"num_samples": 100000, "num_heldout": 10000, "num_compositional": 10000},
        "train": {"epochs": 5, "warmup": 500, "batch-size": 128, "lr": 2.0e-3},
        "eval": {"autoencoder_steps": 2000, "adapter_steps": 1000, "max_train_captions": 50000},
        "budget": {stage: None for stage in STAGES},
    },
}


class RunConfigError(KclipError, ValueError):
    """A run config that cannot be used; the message names the file or flag and the key."""


def _norm(key: Any) -> str:
    return str(key).lstrip("-").replace("-", "_")


def merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    """`over` on `base`, section by section; keys compare with dashes and underscores alike. An unknown section
    or key is a RunConfigError naming `where` (train flags are checked against `kclip train` later)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        name = _norm(key)
        if name == "name":
            out["name"] = str(value)
            continue
        if name not in SECTIONS:
            raise RunConfigError(f"{where}: unknown section {key!r} (sections: name, {', '.join(SECTIONS)})")
        if value is None:
            continue
        if not isinstance(value, dict):
            raise RunConfigError(f"{where}: section {key!r} must be a mapping, got {type(value).__name__}")
        section = out[name]
        by_norm = {_norm(k): k for k in section}
        for k, v in value.items():
            if name == "train":  # any kclip train flag may be set; a known one keeps the spelling already there
                section.pop(by_norm.get(_norm(k), k), None)
                section[_norm(k).replace("_", "-")] = v
            elif _norm(k) in by_norm:
                section[by_norm[_norm(k)]] = v
            else:
                raise RunConfigError(f"{where}: unknown key {k!r} in section {name!r} (keys: {', '.join(section)})")
    return out


def load_run_config(preset: str = "default", path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The preset, with the config file over it."""
    if preset not in PRESETS:
        raise RunConfigError(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
    cfg = merge(DEFAULT, PRESETS[preset], f"preset {preset}")
    cfg["preset"] = preset
    if path is not None:
        from kclip.train.params import read_yaml

        cfg = merge(cfg, read_yaml(path), f"--config {path}")
        cfg["config_file"] = str(path)
    return cfg
