"""Shards, the index, the DALI pipeline and its CPU twin: bad samples, agreement between the two, sharding by rank,
CSV data, and clear errors before training for paths that cannot be used."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kclip.cli import main
from kclip.data import synth as S
from kclip.data.csvfile import CsvSpec
from kclip.data.index import index_dataset, index_paths, indexed_shards, read_dali_index
from kclip.data.loader import cpu_loader, plan_csv, plan_shards
from kclip.data.pipeline import build_loader, detect_format
from kclip.data.shards import DataError, ShardWriter, expand_braces, iter_tar, resolve_shards
from kclip.data.transforms import TransformConfig, denormalize

CFG = TransformConfig(image_size=64)
MAX_MAE = 2.0  # mean absolute error allowed between the pipelines' evaluation images, in 0..255 pixel units


def _jpeg(seed: int, size=(80, 60)) -> bytes:
    pixels = S.render_scene(np.random.default_rng(seed), S.draw_scene(np.random.default_rng(seed), "train", 96), 96)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three indexed shards of varied image sizes (square, landscape, portrait)."""
    root = tmp_path_factory.mktemp("wds")
    sizes = [(96, 96), (120, 72), (70, 110)]
    n = 0
    for shard, size in enumerate(sizes):
        with ShardWriter(root / f"{shard:05d}.tar") as w:
            for i in range(11):
                key = f"{shard * 10**4 + i:09d}"
                w.write(key, {"jpg": _jpeg(n, size), "txt": f"caption number {n}".encode()})
                n += 1
    index_dataset(root, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    """One shard with a truncated JPEG and a sample without caption among good ones, indexed."""
    root = tmp_path_factory.mktemp("bad")
    with ShardWriter(root / "00000.tar") as w:
        for i in range(8):
            files = {"jpg": _jpeg(100 + i), "txt": f"good sample {i}".encode(), "json": b"{}"}
            if i == 2:
                files["jpg"] = files["jpg"][: len(files["jpg"]) // 2]  # truncated JPEG
            if i == 5:
                del files["txt"]  # no caption
            w.write(f"{i:09d}", files)
    return root


def _byte_tokens(captions):
    out = torch.zeros(len(captions), 77, dtype=torch.long)
    for i, c in enumerate(captions):
        b = list(c.encode())[:77]
        out[i, : len(b)] = torch.tensor(b)
    return out


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


def test_index_leaves_bad_samples_out_and_says_why(bad_shard, capsys):
    assert main(["data", "index", str(bad_shard), "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "8 samples, 6 indexed, 2 left out" in out
    idx, report_path = index_paths(bad_shard / "00000.tar")
    report = json.loads(report_path.read_text())
    bad = {b["key"]: b["reason"] for b in report["bad"]}
    assert set(bad) == {"000000002", "000000005"}
    assert bad["000000002"].startswith("image does not decode") and bad["000000005"] == "no caption (.txt)"
    entries = read_dali_index(idx)
    assert len(entries) == 6 and idx.read_text().startswith("v1.2 6\n")
    assert [e[0].name for e in entries] == [f"{i:09d}.jpg" for i in (0, 1, 3, 4, 6, 7)]
    # the index's offsets and sizes point at the members' bytes
    with tarfile.open(bad_shard / "00000.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    for comps in entries:
        for c in comps:
            assert (c.offset, c.size) == (members[c.name].offset_data, members[c.name].size)
    assert main(["data", "inspect", str(bad_shard), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "8 samples, 2 bad" in out and "000000002" in out and "no caption" in out


def test_dali_reads_the_rest_of_a_bad_shard(bad_shard):
    pytest.importorskip("nvidia.dali")
    from kclip.data.dali import DaliLoader

    index_dataset(bad_shard, workers=1, progress=False)
    loader = DaliLoader(indexed_shards(bad_shard), CFG, batch_size=4, train=True, device_id=None, num_threads=1)
    for _ in range(2):  # two epochs
        keys = _keys(loader)
        assert sorted(keys) == [f"{i:09d}" for i in (0, 1, 3, 4, 6, 7)]


def test_cpu_twin_skips_and_counts_bad_samples_of_unindexed_shards(bad_shard, tmp_path):
    # a copy without index: the twin reads the tar through and decides on its own
    (tmp_path / "00000.tar").write_bytes((bad_shard / "00000.tar").read_bytes())
    plan = plan_shards(tmp_path)
    assert plan.kind == "scanned"
    loader = cpu_loader(plan, CFG, batch_size=4, train=False, num_workers=0)
    assert _keys(loader) == [f"{i:09d}" for i in (0, 1, 3, 4, 6, 7)]
    assert sorted(k for k, _ in loader.bad) == ["000000002", "000000005"]
    assert sum(loader.skipped.values()) == 2


def test_dali_cpu_pipeline_and_twin_agree(shards):
    pytest.importorskip("nvidia.dali")
    from kclip.data.dali import DaliLoader

    dali = list(DaliLoader(indexed_shards(shards), CFG, batch_size=8, train=False, device_id=None, num_threads=2))
    twin = list(cpu_loader(plan_shards(shards), CFG, batch_size=8, train=False, num_workers=0))
    assert [len(b["key"]) for b in dali] == [len(b["key"]) for b in twin] == [8, 8, 8, 8, 1]
    for a, b in zip(dali, twin, strict=True):
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        assert torch.equal(a["tokens"], b["tokens"]) and a["tokens"].shape == (len(a["key"]), 77)
        assert a["image"].shape == b["image"].shape == (len(a["key"]), 3, 64, 64)
        err = np.abs(denormalize(a["image"], CFG) - denormalize(b["image"], CFG)).mean(axis=(1, 2, 3))
        assert err.max() <= MAX_MAE, err
    assert dali[0]["key"][0] == "000000000" and dali[-1]["key"][-1] == "000020010"


def test_training_pipelines_read_each_sample_once_per_epoch(shards):
    pytest.importorskip("nvidia.dali")
    from kclip.data.dali import DaliLoader

    cfg = TransformConfig(image_size=48, flip_p=0.5)
    every = sorted(_keys(cpu_loader(plan_shards(shards), cfg, batch_size=5, train=False)))
    dali = DaliLoader(indexed_shards(shards), cfg, batch_size=5, train=True, device_id=None, num_threads=2, seed=3)
    twin = cpu_loader(plan_shards(shards), cfg, batch_size=5, train=True, num_workers=2, seed=3)
    for loader in (dali, twin):
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            keys = sorted(k for b in batches for k in b["key"])
            assert keys == every  # each sample once per epoch, in both pipelines
            for b in batches:
                assert b["image"].shape[1:] == (3, 48, 48) and torch.isfinite(b["image"]).all()
                # a key and its caption travel together
                assert all(c == f"caption number {_number(k)}" for k, c in zip(b["key"], b["caption"], strict=True))


def _number(key: str) -> int:
    return (int(key) // 10**4) * 11 + int(key) % 10**4


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_data_the_same_way(shards, world_size):
    pytest.importorskip("nvidia.dali")
    from kclip.data.dali import DaliLoader

    parts_dali, parts_twin = [], []
    for rank in range(world_size):
        common = dict(batch_size=4, train=False, rank=rank, world_size=world_size)
        dali = DaliLoader(indexed_shards(shards), CFG, device_id=None, num_threads=1, **common)
        parts_dali.append(_keys(dali))
        twin = cpu_loader(plan_shards(shards), CFG, num_workers=0, **common)
        parts_twin.append(_keys(twin))
        assert len(dali) == len(twin) == -(-len(parts_dali[-1]) // 4)
    assert parts_dali == parts_twin
    flat = [k for p in parts_dali for k in p]
    assert len(flat) == len(set(flat)) == 33


def test_twin_workers_share_out_the_samples(shards):
    keys = _keys(cpu_loader(plan_shards(shards), CFG, batch_size=4, train=False, num_workers=2))
    assert len(keys) == len(set(keys)) == 33


def test_training_refuses_unindexed_or_stale_shards(shards, tmp_path):
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / name).write_bytes((shards / name).read_bytes())
    with pytest.raises(DataError, match=r"kclip data index"):
        build_loader(tmp_path, batch_size=4)
    index_dataset(tmp_path, workers=1, progress=False)
    assert build_loader(tmp_path, batch_size=4, backend="cpu", num_workers=0) is not None
    # the shard changes after indexing: its index is stale
    with open(tmp_path / "00001.tar", "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(DataError, match=r"older than the shard.*kclip data index"):
        build_loader(tmp_path, batch_size=4, backend="cpu")


def test_a_shard_without_good_samples_is_left_out(tmp_path):
    with ShardWriter(tmp_path / "00000.tar") as w:
        w.write("000000000", {"jpg": b"not a jpeg", "txt": b"x"})
    with ShardWriter(tmp_path / "00001.tar") as w:
        w.write("000010000", {"jpg": _jpeg(1), "txt": b"fine"})
    summary = index_dataset(tmp_path, workers=1, progress=False)
    assert summary["bad_samples"] == 1 and not (tmp_path / "00000.idx").exists()
    shards = indexed_shards(tmp_path)
    assert [p.name for p in shards.paths] == ["00001.tar"] and shards.num_samples == 1


def test_bad_paths_fail_clearly_before_training(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        build_loader(tmp_path / "missing", batch_size=4)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unrecognised data format"):
        detect_format(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without .tar shards"):
        build_loader(tmp_path / "empty", batch_size=4)
    (tmp_path / "fake.tar").write_bytes(b"\x01" * 100)
    with pytest.raises(DataError, match="not a tar archive"):
        resolve_shards(tmp_path / "fake.tar")
    (tmp_path / "d.csv").write_text("path\tcaption\na.jpg\thi\n")
    with pytest.raises(DataError, match=r"no column 'filepath'.*--csv-img-key"):
        build_loader(tmp_path / "d.csv", batch_size=4)
    with pytest.raises(DataError, match="no such CSV file"):
        build_loader(tmp_path / "nope.csv", batch_size=4)
    assert main(["data", "inspect", str(tmp_path / "missing"), "--quiet"]) == 2


def test_shard_paths_as_open_clip_names_them(shards):
    assert expand_braces("a/{00000..00002}.tar") == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("plain{}") == ["plain{}"]
    names = [p.name for p in resolve_shards(f"{shards}/{{00000..00001}}.tar::{shards}/00002.tar")]
    assert names == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.name for p in resolve_shards(shards / "00001.tar")] == ["00001.tar"]
    assert len(resolve_shards(shards)) == 3
    assert detect_format(f"{shards}/{{00000..00001}}.tar") == "webdataset"


def test_csv_data(tmp_path):
    (tmp_path / "img").mkdir()
    rows = ["filepath\ttitle"]
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
        rows.append(f"img/{i}.jpg\tpicture {i}")
    rows.append("img/missing.jpg\tno file")
    (tmp_path / "img" / "broken.jpg").write_bytes(_jpeg(9)[:300])
    rows.append("img/broken.jpg\tbroken file")
    rows.append("img/0.jpg\t")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    assert detect_format(tmp_path / "train.csv") == "csv"
    loader = build_loader(tmp_path / "train.csv", batch_size=4, train=False, num_workers=0)
    batches = list(loader)
    assert [k for b in batches for k in b["key"]] == [f"{i:09d}" for i in range(6)]
    assert batches[0]["caption"][:2] == ["picture 0", "picture 1"]
    assert sorted(k for k, _ in loader.bad) == ["000000006", "000000007", "000000008"]
    # comma-separated, other column names, a key column
    (tmp_path / "other.csv").write_text("id,path,text\nk1,img/1.jpg,one\nk2,img/2.jpg,two\n")
    spec = CsvSpec(img_key="path", caption_key="text", sep=",", key_column="id")
    twin = cpu_loader(plan_csv(tmp_path / "other.csv", spec), CFG, batch_size=8, train=True, num_workers=0)
    assert sorted(_keys(twin)) == ["k1", "k2"]
    assert main(["data", "inspect", str(tmp_path / "train.csv"), "--quiet"]) == 0


def test_iter_tar_reports_a_truncated_tar(shards, tmp_path):
    data = (shards / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    samples = list(iter_tar(tmp_path / "cut.tar"))
    assert samples[-1].problem is not None
    summary = index_dataset(tmp_path, workers=1, progress=False)
    assert summary["bad_samples"] >= 1 and summary["good_samples"] == len(samples) - summary["bad_samples"]
    assert os.path.exists(tmp_path / "cut.idx")


@pytest.mark.gpu
def test_mixed_device_pipeline_agrees_with_the_twin(shards):
    pytest.importorskip("nvidia.dali")
    from kclip.data.dali import DaliLoader

    # the GPU machine has no open_clip: a byte-level stand-in tokenizer, the same for both
    common = dict(batch_size=8, train=False, tokenizer=_byte_tokens)
    dali = list(DaliLoader(indexed_shards(shards), CFG, device_id=0, num_threads=2, **common))
    twin = list(cpu_loader(plan_shards(shards), CFG, num_workers=0, **common))
    for a, b in zip(dali, twin, strict=True):
        assert a["image"].is_cuda and a["tokens"].is_cuda
        assert torch.equal(a["tokens"].cpu(), b["tokens"])
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        err = np.abs(denormalize(a["image"], CFG) - denormalize(b["image"], CFG)).mean(axis=(1, 2, 3))
        assert err.max() <= MAX_MAE, err
    train = DaliLoader(
        indexed_shards(shards), CFG, batch_size=8, train=True, device_id=0, hw_decoder_load=0.5, tokenizer=_byte_tokens
    )
    keys = [k for b in train for k in b["key"]]
    assert sorted(keys) == sorted(k for b in twin for k in b["key"])


def test_import_kclip_data_is_lean():
    code = (
        "import sys, kclip.data, kclip.data.cli, kclip.cli; kclip.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'PIL', 'nvidia.dali', 'torchvision', 'open_clip') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=os.path.dirname(__file__)
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
