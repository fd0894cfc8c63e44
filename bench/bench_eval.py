"""Evaluation benchmark: `kclip eval` stage by stage on a ViT-B/32-sized model, and its feature pass against the
loop a user would otherwise write with open_clip's own preprocessing.

Providers:
  kclip-eval       kclip.eval.runner.Evaluation over one checkpoint, every task (retrieval, zero-shot, attribute
                   probes, text EM with the T5 and teacher rows); seconds per stage, as summary.json reports them
  kclip-features   kclip.eval.features.split_features on the held-out split: images and captions through both
                   towers, kclip's loader (DALI on a GPU where it imports, else the CPU twin)
  open_clip-loop   the same images and captions through open_clip.create_model_and_transforms' preprocess (PIL and
                   torchvision transforms) in a torch DataLoader with as many workers, open_clip's tokenizer, then
                   encode_image / encode_text: the peer

Data, made here in a temporary folder: `kclip data synth` shards and their index; a teacher store of random rows
(this measures evaluation, not the teacher); a checkpoint in kclip's training format with random weights of the
architecture (the evaluation's cost does not depend on the weights' values).

Floor of a feature pass: the FLOPs of encode_image + encode_text counted by torch.utils.flop_counter.FlopCounterMode
on one batch, scaled to the split, over the matmul rate measured here (bench._common.matmul_rate, the dtype the
pass computes in); over_floor = seconds / floor seconds.

Shapes:
  --smoke   kclip-tiny, synth 64 / 32 / 32 at 64 px, batch 16, no worker, text EM 20 + 10 steps (CI)
  CPU run   ViT-B-32, synth 1000 / 500 / 500 at 128 px, batch 64, 2 workers, text EM 200 + 100 steps
  CUDA run  ViT-B-32, synth 5000 / 2000 / 2000 at 128 px, batch 256, 8 workers, text EM defaults (600 + 300)

Run:
    python bench/bench_eval.py --smoke --device cpu --out /tmp/bench_eval.json
    python bench/bench_eval.py --device cpu
    python bench/bench_eval.py --device cuda --budget-s 100 --out $OUT/bench_eval.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_common_args,
    compute_dtype,
    finish,
    matmul_rate,
    output_path,
    refuse_device,
    resolve_device,
    setup_logging,
    write_rows,
)

log = logging.getLogger("bench_eval")

SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"model": "kclip-tiny", "train": 64, "heldout": 32, "image_size": 64, "batch": 16, "workers": 0,
              "ae_steps": 20, "adapter_steps": 10, "budget": None},
    "cpu": {"model": "ViT-B-32", "train": 1000, "heldout": 500, "image_size": 128, "batch": 64, "workers": 2,
            "ae_steps": 200, "adapter_steps": 100, "budget": None},
    "cuda": {"model": "ViT-B-32", "train": 5000, "heldout": 2000, "image_size": 128, "batch": 256, "workers": 8,
             "ae_steps": 600, "adapter_steps": 300, "budget": 150},
}  # fmt: skip
TEACHER_WIDTH = 64


def make_data(work: Path, s: dict[str, Any]) -> tuple[Path, Path]:
    """The synthetic set (train, heldout, compositional of heldout's size) and a random-row teacher store."""
    from kclip.data import synth as S
    from kclip.data.index import index_dataset
    from kclip.data.shards import iter_tar
    from kclip.teacher.store import finalize, new_meta, write_json, write_part

    data, store = work / "ds", work / "store"
    S.synth(data, s["train"], num_heldout=s["heldout"], num_compositional=s["heldout"], image_size=s["image_size"],
            shard_size=500, progress=False)  # fmt: skip
    store.mkdir()
    write_json(store / "meta.json", new_meta(model="random", pooling="mean", max_length=32, data=str(data),
                                             width=TEACHER_WIDTH))  # fmt: skip
    rng = np.random.default_rng(0)
    for i, split in enumerate(("train", "heldout", "compositional")):
        index_dataset(data / split, progress=False)
        keys = [x.key for tar in sorted((data / split).glob("*.tar")) for x in iter_tar(tar)]
        write_part(store, 0, i, keys, rng.standard_normal((len(keys), TEACHER_WIDTH)).astype(np.float32), split=split)
    finalize(store)
    return data, store


def make_checkpoint(work: Path, model: str) -> Path:
    """A checkpoint in kclip's training format holding random weights of `model`."""
    import open_clip

    from kclip.models import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    clip = open_clip.create_model(model)
    path = work / "random.pt"
    state = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    torch.save({"format": "kclip.train_checkpoint", "version": 1, "epoch": 0, "name": "random", "state_dict": state,
                "config": {"model": model}}, path)  # fmt: skip
    return path


def forward_flop(encoder, batch: int, device: torch.device) -> float:
    """FLOPs of encode_image + encode_text on one sample (counted on a batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = encoder.image_size
    images = torch.zeros(batch, 3, size, size, device=device)
    tokens = torch.zeros(batch, 77, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        encoder.clip.encode_image(images)
        encoder.clip.encode_text(tokens)
    return counter.get_total_flops() / batch


@dataclasses.dataclass
class _Jpegs(torch.utils.data.Dataset):
    """The split's images and captions as open_clip's own loop reads them: PIL, then open_clip's preprocess."""

    items: list[tuple[bytes, str]]
    preprocess: Any

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        jpeg, caption = self.items[i]
        return self.preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB")), caption


def open_clip_loop(split_dir: Path, model: str, ckpt_state: dict, s: dict[str, Any], device: torch.device) -> dict:
    """The peer: open_clip's model, preprocess and tokenizer over the split's images and captions."""
    import open_clip

    from kclip.models import register_model_configs

    register_model_configs()
    clip, _, preprocess = open_clip.create_model_and_transforms(model, device=device)
    clip.load_state_dict(ckpt_state)
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model)
    items = []
    for tar in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: m for m in t.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                stem = name[: -len(".jpg")]
                caption = t.extractfile(members[stem + ".txt"]).read().decode()
                items.append((t.extractfile(members[name]).read(), caption))
    loader = torch.utils.data.DataLoader(_Jpegs(items, preprocess), batch_size=s["batch"], num_workers=s["workers"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode(), autocast:
        for images, captions in loader:
            clip.encode_image(images.to(device), normalize=True)
            clip.encode_text(tokenizer(list(captions)).to(device), normalize=True)
            n += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"samples": n, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--budget-s", type=float, default=None, help="skip the peer after this many seconds")
    args = parser.parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    kind, why_not = resolve_device("cpu" if args.smoke else args.device)
    out = output_path(args, "bench_eval", kind)
    s = dict(SETTINGS["smoke" if args.smoke else kind])
    budget = args.budget_s if args.budget_s is not None else s.pop("budget")
    s.pop("budget", None)
    meta: dict[str, Any] = {"script": "bench_eval", "device_kind": kind, "smoke": args.smoke, **s, "skipped": {}}
    rows: list[dict[str, Any]] = []
    if why_not:
        return refuse_device(out, meta, args.device, why_not)
    try:
        import open_clip  # noqa: F401
    except ImportError as e:
        meta["skipped"]["all"] = f"open_clip does not import ({e}): kclip's models are open_clip's"
        write_rows(out, rows, meta)
        return 1
    from kclip.eval.features import split_features
    from kclip.eval.runner import EvalSettings, Evaluation
    from kclip.eval.text_em import EMConfig

    device = torch.device(kind)
    with tempfile.TemporaryDirectory(prefix="bench_eval.") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        data, store = make_data(work, s)
        ckpt = make_checkpoint(work, s["model"])
        meta["data_setup_s"] = time.perf_counter() - t0
        em = EMConfig(autoencoder_steps=s["ae_steps"], adapter_steps=s["adapter_steps"])
        settings = EvalSettings(batch_size=s["batch"], workers=s["workers"], device=kind, teacher_store=str(store),
                                em=em, progress=False)  # fmt: skip
        ev = Evaluation([f"random={ckpt}"], str(data), settings)
        enc = ev.encoders[0]
        rate = matmul_rate(s["model"], s["batch"], compute_dtype("amp_bf16" if kind == "cuda" else "fp32", kind),
                           kind)  # fmt: skip
        meta["matmul"] = rate
        per_sample = forward_flop(enc, min(8, s["batch"]), device)
        meta["forward_gflop_per_sample"] = per_sample / 1e9

        def floor(samples: int, seconds: float) -> dict[str, float]:
            floor_s = samples * per_sample / (rate["gflops"] * 1e9)
            return {"floor_s": floor_s, "over_floor": seconds / floor_s}

        # the feature pass alone, kclip's loader (a second pass: the first warms the loader's workers and caches)
        split_features(enc, str(data / "heldout"), "heldout", batch_size=s["batch"], workers=s["workers"],
                       progress=False)  # fmt: skip
        f = split_features(enc, str(data / "heldout"), "heldout", batch_size=s["batch"], workers=s["workers"],
                           progress=False)  # fmt: skip
        n = len(f)
        rows.append({"provider": "kclip-features", "mode": "features", "model": s["model"], "samples": n,
                     "seconds": f.seconds, "samples_per_s": n / f.seconds, **floor(n, f.seconds)})  # fmt: skip
        write_rows(out, rows, meta)

        summary = ev.run()
        secs = summary["seconds"]
        rows.append({"provider": "kclip-eval", "mode": "eval", "model": s["model"], "samples": 2 * s["heldout"],
                     "seconds": secs["total"], **{f"{k}_s": v for k, v in secs.items() if k != "total"}})  # fmt: skip
        write_rows(out, rows, meta)

        if budget is not None and time.perf_counter() - start > budget:
            meta["skipped"]["open_clip-loop"] = "time budget spent"
        else:
            state = {k[len("clip.") :]: v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()}
            open_clip_loop(data / "heldout", s["model"], state, s, device)  # warm-up pass
            r = open_clip_loop(data / "heldout", s["model"], state, s, device)
            rows.append({"provider": "open_clip-loop", "mode": "features", "model": s["model"], "samples": r["samples"],
                         "seconds": r["seconds"], "samples_per_s": r["samples"] / r["seconds"],
                         **floor(r["samples"], r["seconds"])})  # fmt: skip
    peer = next((r for r in rows if r["provider"] == "open_clip-loop"), None)
    for r in rows:
        if r["mode"] == "features" and peer:
            r["vs_open_clip_loop"] = r["samples_per_s"] / peer["samples_per_s"]
    finish(
        out,
        rows,
        meta,
        start,
        [
            ("provider", "provider", ""),
            ("samples", "samples", ""),
            ("seconds", "seconds", ".2f"),
            ("samples/s", "samples_per_s", ".1f"),
            ("x open_clip", "vs_open_clip_loop", ".2f"),
            ("x floor", "over_floor", ".1f"),
            ("features s", "features_s", ".1f"),
            ("attributes s", "attributes_s", ".1f"),
            ("text-em s", "text-em_s", ".1f"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
