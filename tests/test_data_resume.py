"""The order of both loaders: a pure function of (seed, epoch, rank, world size) whatever the workers, exact resume at
any batch, every sample once per epoch over the ranks, key order for evaluation, the samples' metadata in batches,
and the synthetic set read as an AttributeData."""

import json

import numpy as np
import pytest
import torch

from kclip.data import read_synth
from kclip.data import synth as S
from kclip.data.index import index_dataset
from kclip.data.pipeline import build_loader
from kclip.data.shards import DataError, iter_tar
from kclip.data.transforms import TransformConfig

CFG = TransformConfig(image_size=32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    S.synth(out, 40, num_heldout=17, num_compositional=0, image_size=32, shard_size=7, workers=1, progress=False)
    for split in ("train", "heldout"):
        index_dataset(out / split, workers=1, progress=False)
    return out


def _loader(root, backend, workers=0, split="train", **kw):
    kw = {"batch_size": 6, "train": True, "seed": 3, **kw}
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
        return build_loader(root / split, cfg=CFG, backend="dali", device_id=None, num_threads=1, **kw)
    return build_loader(root / split, cfg=CFG, backend="cpu", num_workers=workers, **kw)


def _same(a, b):
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["tokens"], y["tokens"])
        assert torch.equal(x["label"], y["label"]) and x["tags"] == y["tags"]


@pytest.mark.parametrize("backend,workers", [("cpu", 0), ("cpu", 2), ("dali", 0)])
def test_resume_at_a_batch_equals_the_uninterrupted_run(root, backend, workers):
    loader = _loader(root, backend, workers)
    assert len(loader) == 6  # 40 samples, batch 6, drop_last
    loader.set_epoch(1)
    whole = list(loader)
    assert loader.state_dict() == {"epoch": 1, "batch": 6}
    # interrupted after 2 batches: the state says so, and a new loader resumes from it
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batch": 2}
    fresh = _loader(root, backend, workers)
    fresh.load_state_dict(state)
    _same(list(fresh), whole[2:])
    fresh.set_epoch(1, start_batch=4)
    _same(list(fresh), whole[4:])


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_order_is_independent_of_workers_and_changes_with_the_epoch(root, backend):
    ref = _loader(root, "cpu", 0)
    ref.set_epoch(2)
    expected = list(ref)
    other = _loader(root, backend, 2)
    other.set_epoch(2)
    got = list(other)
    assert [b["key"] for b in got] == [b["key"] for b in expected]
    for a, b in zip(got, expected, strict=True):
        if backend == "cpu":
            assert torch.equal(a["image"], b["image"])
        else:  # DALI's decoder and resize: within a few levels of PIL's
            assert (a["image"] - b["image"]).abs().mean() < 0.05
    ref.set_epoch(3)
    assert [b["key"] for b in ref] != [b["key"] for b in expected]


@pytest.mark.parametrize("drop_last", [True, False])
def test_each_epoch_visits_every_sample_once_over_the_ranks(root, drop_last):
    for epoch in (0, 1):
        seen = []
        for rank in range(3):
            loader = _loader(root, "cpu", rank=rank, world_size=3, drop_last=drop_last, batch_size=4)
            loader.set_epoch(epoch)
            keys = [k for b in loader for k in b["key"]]
            assert len(keys) == (12 if drop_last else len(keys))  # 40 // 3 = 13 per rank, 3 full batches of 4
            seen += keys
        assert len(seen) == len(set(seen))  # no sample twice
        assert len(seen) == (36 if drop_last else 40)


@pytest.mark.parametrize("backend,workers", [("cpu", 0), ("cpu", 2), ("dali", 0)])
def test_evaluation_yields_key_order(root, backend, workers):
    loader = _loader(root, backend, workers, split="heldout", train=False)
    keys = [k for b in loader for k in b["key"]]
    stored = sorted(s.key for tar in sorted((root / "heldout").glob("*.tar")) for s in iter_tar(tar))
    assert len(stored) == 17 and keys == stored
    assert [len(b["key"]) for b in loader] == [6, 6, 5]
    # two ranks: contiguous key-ordered ranges
    parts = [
        [
            k
            for b in _loader(root, backend, workers, split="heldout", train=False, rank=r, world_size=2)
            for k in b["key"]
        ]
        for r in range(2)
    ]
    assert parts[0] + parts[1] == stored and len(parts[0]) == 8


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_batches_carry_the_samples_metadata(root, backend):
    meta = {s.key: json.loads(s.data["json"]) for tar in (root / "heldout").glob("*.tar") for s in iter_tar(tar)}
    batch = next(iter(_loader(root, backend, split="heldout", train=False)))
    assert batch["label"].dtype == torch.int64 and batch["attributes"].dtype == torch.uint8
    assert batch["attributes"].shape == (6, len(S.attribute_names()))
    for i, key in enumerate(batch["key"]):
        assert batch["label"][i].item() == meta[key]["label"]
        assert batch["attributes"][i].tolist() == meta[key]["attributes"]
        assert batch["tags"][i] == meta[key]["tags"] and batch["split"][i] == "heldout"


def test_csv_batches_have_no_metadata(tmp_path, root):
    (tmp_path / "img").mkdir()
    for s in iter_tar(next((root / "train").glob("*.tar"))):
        (tmp_path / "img" / f"{s.key}.jpg").write_bytes(s.data["jpg"])
    rows = [f"img/{p.name}\ta caption" for p in sorted((tmp_path / "img").iterdir())]
    (tmp_path / "t.csv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    batch = next(iter(build_loader(tmp_path / "t.csv", batch_size=4, cfg=CFG, train=False, num_workers=0)))
    assert set(batch) == {"image", "tokens", "key", "caption"}


def test_the_synthetic_set_as_attribute_data(root):
    data = read_synth(root, "heldout")
    assert data.name == "synth" and len(data) == 17 and data.keys == sorted(data.keys)
    assert data.attribute_names == S.attribute_names() and data.class_names == S.class_names()
    assert data.attributes.shape == (17, len(S.attribute_names())) and not data.is_train.any()
    meta = {s.key: json.loads(s.data["json"]) for tar in (root / "heldout").glob("*.tar") for s in iter_tar(tar)}
    assert data.labels.tolist() == [meta[k]["label"] for k in data.keys]
    c = data.labels[0]
    np.testing.assert_allclose(data.class_attributes[c], data.attributes[data.labels == c].mean(0), rtol=1e-6)
    # its loader: rows in order, the pixels of the evaluation loader for the same keys
    batches = list(data.loader(CFG, batch_size=5))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(17))
    images = torch.cat([b["image"] for b in batches])
    ref = torch.cat([b["image"] for b in _loader(root, "cpu", split="heldout", train=False)])
    assert torch.equal(images, ref)
    with pytest.raises(DataError, match=r"no split 'val' \(its splits: heldout, train\)"):
        read_synth(root, "val")
