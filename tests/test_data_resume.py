"""Exact, resumable order in both loaders: an epoch's batches are a pure function of (seed, epoch, rank, world size),
whatever the number of workers or the pipeline; a pass resumed at batch b yields what the uninterrupted pass yields
from b; evaluation comes in key order; batches carry the samples' metadata where the data has it; the synthetic set
read as an AttributeData."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kclip.data import read_synth
from kclip.data import synth as S
from kclip.data.index import index_dataset
from kclip.data.loader import META_FIELDS, cpu_loader, epoch_batches, plan_csv
from kclip.data.pipeline import build_loader
from kclip.data.shards import DataError, ShardWriter
from kclip.data.transforms import TransformConfig, denormalize

CFG = TransformConfig(image_size=24, flip_p=0.5)
MAX_MAE = 2.0  # mean absolute error allowed between the pipelines' images, in 0..255 pixel units
TRAIN, HELDOUT = 39, 17


def _tokens(captions):
    """A cheap stand-in for open_clip's tokenizer: caption bytes, zero-padded (a module function: workers pickle it)."""
    out = torch.zeros(len(captions), 77, dtype=torch.long)
    for i, c in enumerate(captions):
        b = list(c.encode())[:77]
        out[i, : len(b)] = torch.tensor(b)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A synthetic dataset root: 39 training samples in 5 shards, 17 held-out in 3, both indexed."""
    out = tmp_path_factory.mktemp("synth")
    S.synth(
        out, TRAIN, num_heldout=HELDOUT, num_compositional=0, image_size=32, shard_size=8, workers=1, progress=False
    )
    for split in ("train", "heldout"):
        index_dataset(out / split, workers=1, progress=False)
    return out


def _loader(path, backend, parallel, **kw):
    """build_loader with `parallel` DataLoader workers (the twin) or DALI threads (DALI's CPU pipeline)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
        return build_loader(path, backend="dali", device_id=None, num_threads=parallel, tokenizer=_tokens, **kw)
    return build_loader(path, backend="cpu", num_workers=parallel, tokenizer=_tokens, **kw)


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def _json_of(split_dir):
    """{key: the sample's .json record} read straight from the tars."""
    out = {}
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[m.name.split(".")[0]] = json.loads(tar.extractfile(m).read())
    return out


def _same(a, b):
    assert a["key"] == b["key"] and a["caption"] == b["caption"]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["tokens"], b["tokens"])
    assert torch.equal(a["label"], b["label"]) and torch.equal(a["attributes"], b["attributes"])


BACKENDS = [("cpu", 0), ("cpu", 2), ("dali", 1), ("dali", 2)]


@pytest.mark.parametrize(("backend", "parallel"), BACKENDS)
def test_a_resumed_pass_equals_the_uninterrupted_one(root, backend, parallel):
    common = dict(batch_size=4, train=True, seed=5, cfg=CFG)
    loader = _loader(root / "train", backend, parallel, **common)
    loader.set_epoch(1)
    full = list(loader)
    assert len(full) == len(loader) == TRAIN // 4  # drop_last: full batches only
    assert loader.state_dict() == {"epoch": 1, "batch": len(full)}
    # a checkpoint taken after 3 batches of a pass: the same loader and a fresh one resume from it
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batch": 3}
    for resumed in (loader, _loader(root / "train", backend, parallel, **common)):
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == len(full) - 3
        for a, b in zip(rest, full[3:], strict=True):
            _same(a, b)
        assert resumed.state_dict() == {"epoch": 1, "batch": len(full)}
    loader.set_epoch(1, start_batch=len(full))
    assert list(loader) == []
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(1, start_batch=len(full) + 1)


def test_the_order_depends_on_neither_workers_nor_pipeline(root):
    common = dict(batch_size=5, train=True, seed=2, cfg=CFG)
    runs = {(b, p): _loader(root / "train", b, p, **common) for b, p in BACKENDS}
    for epoch in (0, 3):
        passes = {}
        for name, loader in runs.items():
            loader.set_epoch(epoch)
            passes[name] = list(loader)
        twin = passes[("cpu", 0)]
        for name, batches in passes.items():
            assert [b["key"] for b in batches] == [b["key"] for b in twin], name
            for a, b in zip(batches, twin, strict=True):
                if name[0] == "cpu":
                    _same(a, b)  # the same pixels whatever worker read them
                else:  # DALI crops the very boxes the twin crops, with its own resampling
                    err = np.abs(denormalize(a["image"], CFG) - denormalize(b["image"], CFG)).mean(axis=(1, 2, 3))
                    assert err.max() <= MAX_MAE, (name, err)


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_each_epoch_reshuffles_and_repeats(root, backend):
    loader = _loader(root / "train", backend, 2, batch_size=4, train=True, drop_last=False, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append(_keys(loader))
    assert sorted(orders[0]) == sorted(orders[1]) and len(set(orders[0])) == TRAIN  # every sample once
    assert orders[0] != orders[1]  # a new order each epoch
    assert orders[0] == orders[2]  # and the same order for the same epoch


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_ranks_share_out_each_epoch(root, backend, world_size):
    every = sorted(_keys(_loader(root / "train", "cpu", 0, batch_size=8, train=False)))
    for drop_last in (False, True):
        parts, lengths = [], []
        for rank in range(world_size):
            kw = dict(batch_size=4, train=True, rank=rank, world_size=world_size, drop_last=drop_last, seed=1)
            loader = _loader(root / "train", backend, 1, **kw)
            loader.set_epoch(2)
            batches = list(loader)
            assert len(batches) == len(loader)
            parts.append(_keys(batches))
            lengths.append(len(batches))
        flat = [k for p in parts for k in p]
        assert len(flat) == len(set(flat)) and set(flat) <= set(every)  # nobody reads a sample twice
        # the parts are contiguous slices of the epoch's permutation (the synthetic shards store keys in order)
        perm = [every[i] for i in np.random.default_rng([1, 2]).permutation(TRAIN)]
        if drop_last:
            # every rank gets N // W samples, in full batches: ranks step in lockstep; the rest sit out this epoch
            per = TRAIN // world_size
            assert lengths == [per // 4] * world_size
            assert flat == [k for r in range(world_size) for k in perm[r * per : r * per + per // 4 * 4]]
        else:
            assert flat == perm  # every sample once over the ranks


@pytest.mark.parametrize(("backend", "parallel"), BACKENDS)
def test_evaluation_comes_in_key_order(root, backend, parallel):
    loader = _loader(root / "heldout", backend, parallel, batch_size=6, train=False)
    batches = list(loader)
    keys = _keys(batches)
    assert [len(b["key"]) for b in batches] == [6, 6, 5]
    assert keys == sorted(keys) and len(keys) == HELDOUT
    # rank r of W gets a contiguous range of the key order
    parts = [
        _keys(_loader(root / "heldout", backend, parallel, batch_size=6, train=False, rank=r, world_size=3))
        for r in range(3)
    ]
    assert [k for p in parts for k in p] == keys and [len(p) for p in parts] == [5, 6, 6]


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (seed * 20 % 256, 90, 140)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_evaluation_sorts_keys_the_shards_store_out_of_order(tmp_path, backend):
    for shard, keys in ((0, range(5, 10)), (1, range(5))):
        with ShardWriter(tmp_path / f"{shard:05d}.tar") as w:
            for k in keys:
                w.write(f"{k:09d}", {"jpg": _jpeg(k), "txt": f"caption {k}".encode()})
    index_dataset(tmp_path, workers=1, progress=False)
    batches = list(_loader(tmp_path, backend, 2, batch_size=3, train=False, cfg=CFG))
    assert _keys(batches) == [f"{k:09d}" for k in range(10)]
    assert [c for b in batches for c in b["caption"]] == [f"caption {k}" for k in range(10)]
    assert not set(META_FIELDS) & set(batches[0])  # no .json: no metadata fields


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_batches_carry_the_samples_metadata(root, backend):
    records = _json_of(root / "train")
    names = (root / "attributes.txt").read_text().splitlines()
    loader = _loader(root / "train", backend, 2, batch_size=8, train=True, seed=4)
    seen = []
    for batch in loader:
        n = len(batch["key"])
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (n,)
        assert batch["attributes"].dtype == torch.uint8 and batch["attributes"].shape == (n, len(names))
        for i, key in enumerate(batch["key"]):
            r = records[key]
            assert batch["label"][i].item() == r["label"] and batch["attributes"][i].tolist() == r["attributes"]
            assert batch["tags"][i] == r["tags"] and batch["split"][i] == "train"
            assert batch["caption"][i] == r["caption"]
        seen += batch["key"]
    assert len(seen) == TRAIN // 8 * 8


def _csv(tmp_path, bad: set[int], rows: int = 10):
    (tmp_path / "img").mkdir()
    lines = ["filepath\ttitle"]
    for i in range(rows):
        name = f"img/{i}.jpg"
        if i not in bad:
            (tmp_path / name).write_bytes(_jpeg(i))
        lines.append(f"{name}\tpicture {i}")  # a bad row's image file is missing
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.csv"


def test_csv_batches_carry_no_metadata_and_resume(tmp_path):
    path = _csv(tmp_path, bad=set())
    loader = build_loader(path, batch_size=4, train=True, num_workers=0, tokenizer=_tokens, cfg=CFG)
    loader.set_epoch(3)
    full = list(loader)
    assert len(full) == len(loader) == 2 and not set(META_FIELDS) & set(full[0])
    loader.load_state_dict({"epoch": 3, "batch": 1})
    (rest,) = list(loader)
    assert rest["key"] == full[1]["key"] and torch.equal(rest["image"], full[1]["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_leaves_its_batch_one_short(tmp_path, workers):
    bad = {3, 4, 5, 6, 7}
    path = _csv(tmp_path, bad=bad)
    # evaluation, batches of 4 in key order: [0 1 2 (3)], [(4 5 6 7)] passed over, [8 9]
    loader = build_loader(path, batch_size=4, train=False, num_workers=workers, tokenizer=_tokens, cfg=CFG)
    assert [b["key"] for b in loader] == [["000000000", "000000001", "000000002"], ["000000008", "000000009"]]
    assert len(loader) == 3 and loader.state_dict() == {"epoch": 0, "batch": 3}
    assert sorted(k for k, _ in loader.bad) == [f"{i:09d}" for i in sorted(bad)]
    loader.set_epoch(0, start_batch=1)
    assert [b["key"] for b in loader] == [["000000008", "000000009"]]
    # training: each batch holds the usable samples of its slot of the permutation, boundaries unmoved
    loader = build_loader(path, batch_size=3, train=True, num_workers=workers, tokenizer=_tokens, cfg=CFG, seed=7)
    loader.set_epoch(1)
    plan = plan_csv(path)
    want = []
    for rows in epoch_batches(
        plan.keys, batch_size=3, epoch=1, seed=7, shuffle=True, rank=0, world_size=1, drop_last=True
    ):
        keys = [plan.keys[r].decode() for r in rows if r not in bad]
        if keys:
            want.append(keys)
    assert [b["key"] for b in loader] == want


def test_the_twin_reads_a_plan_directly(root):
    from kclip.data.loader import plan_shards

    plan = plan_shards(root / "heldout")
    assert plan.kind == "indexed" and len(plan) == HELDOUT
    loader = cpu_loader(plan, CFG, batch_size=6, train=False, num_workers=2, tokenizer=_tokens)
    assert _keys(loader) == sorted(plan.keys[i].decode() for i in range(HELDOUT))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_synthetic_set_as_attribute_data(root, workers):
    data = read_synth(root, "heldout")
    assert data.name == "synth" and len(data) == HELDOUT and data.keys == sorted(data.keys)
    assert data.attribute_names == S.attribute_names() and data.class_names == S.class_names()
    assert data.attributes.shape == (HELDOUT, len(S.attribute_names())) and not data.is_train.any()
    assert all(p.parent == root / "heldout" for p in data.paths)
    records = _json_of(root / "heldout")
    assert data.labels.tolist() == [records[k]["label"] for k in data.keys]
    assert data.attributes.tolist() == [records[k]["attributes"] for k in data.keys]
    for c in set(data.labels.tolist()):  # the share of the class's images with each attribute, as CUB's
        np.testing.assert_allclose(data.class_attributes[c], data.attributes[data.labels == c].mean(0), rtol=1e-6)
    assert not data.class_attributes[[c for c in range(len(data.class_names)) if c not in data.labels]].any()
    # its loader: rows in order, the pixels of the evaluation loader for the same keys
    batches = list(data.loader(CFG, batch_size=5, num_workers=workers))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(HELDOUT))
    images = torch.cat([b["image"] for b in batches])
    ref = _loader(root / "heldout", "cpu", 0, batch_size=6, train=False, cfg=CFG)
    assert torch.equal(images, torch.cat([b["image"] for b in ref]))
    # a subset keeps rows, keys and shards together
    part = data.subset(data.labels == data.labels[3])
    assert part.keys == [k for k, keep in zip(data.keys, data.labels == data.labels[3], strict=True) if keep]
    rows = [i for i in range(HELDOUT) if data.labels[i] == data.labels[3]]
    (batch,) = list(part.loader(CFG, batch_size=HELDOUT))
    assert batch["index"].tolist() == list(range(len(part))) and torch.equal(batch["image"], images[rows])
    with pytest.raises(DataError, match=r"no split 'val' \(its splits: heldout, train\)"):
        read_synth(root, "val")
    with pytest.raises(DataError, match="no such directory"):
        read_synth(root / "nope", "train")


def test_read_synth_on_a_split_without_index(tmp_path):
    S.synth(tmp_path, 6, num_heldout=0, num_compositional=0, image_size=32, shard_size=4, workers=1, progress=False)
    data = read_synth(tmp_path, "train")
    assert data.keys == ["000000000", "000000001", "000000002", "000000003", "000010000", "000010001"]
    assert data.is_train.all()
    (batch,) = list(data.loader(CFG, batch_size=8))
    assert batch["index"].tolist() == list(range(6)) and batch["image"].shape == (6, 3, 24, 24)
