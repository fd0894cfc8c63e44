"""Splits never mix: a dataset root is refused with its splits listed, a split is named as DIR/train or DIR:train,
the commands that handle several take DIR:a,b and treat each alone, and a file named .tar that is not one is a
clear error."""

import json

import pytest

from kclip.cli import main
from kclip.data import synth as S
from kclip.data.pipeline import build_loader
from kclip.data.shards import DataError, dataset_splits, named_splits, resolve_shards


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("splits")
    S.synth(out, 12, num_heldout=6, num_compositional=6, image_size=32, shard_size=6, workers=1, progress=False)
    return out


def test_a_dataset_root_is_refused_listing_its_splits(root):
    assert dataset_splits(root) == ["compositional", "heldout", "train"]
    with pytest.raises(DataError) as e:
        resolve_shards(root)
    msg = str(e.value)
    assert "compositional, heldout, train" in msg
    assert f"{root}/compositional" in msg and f"{root}:compositional" in msg
    with pytest.raises(DataError, match="compositional, heldout, train"):
        build_loader(root, batch_size=4, backend="cpu", num_workers=0)


def test_a_split_is_named_as_a_folder_or_with_a_colon(root):
    assert resolve_shards(f"{root}:train") == resolve_shards(root / "train")
    assert [p.name for p in resolve_shards(f"{root}:heldout")] == ["10000.tar"]
    with pytest.raises(DataError, match=r"no split 'val' \(its splits: compositional, heldout, train\)"):
        resolve_shards(f"{root}:val")
    with pytest.raises(DataError, match="names several splits"):
        resolve_shards(f"{root}:train,heldout")


def test_named_splits(root, tmp_path):
    assert named_splits(f"{root}:train,heldout") == [("train", str(root / "train")), ("heldout", str(root / "heldout"))]
    assert named_splits(f"{root}:train") == [("train", f"{root}:train")]
    assert named_splits(root / "compositional") == [("compositional", str(root / "compositional"))]
    csv = tmp_path / "val.csv"
    csv.write_text("filepath\ttitle\n")
    assert named_splits(csv) == [("val", str(csv))]
    with pytest.raises(DataError, match="named twice"):
        named_splits(f"{root}:train,train")
    with pytest.raises(DataError, match="no split 'nope'"):
        named_splits(f"{root}:train,nope")


def test_cli_index_refuses_the_root_and_indexes_named_splits(root, capsys):
    assert main(["data", "index", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "kclip data: error:" in err and "compositional, heldout, train" in err and "Traceback" not in err
    assert main(["data", "index", f"{root}:train,heldout", "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary) == ["heldout", "train"]
    assert summary["train"]["good_samples"] == 12 and summary["heldout"]["good_samples"] == 6
    assert not list((root / "compositional").glob("*.idx"))


def test_a_file_named_tar_that_is_not_one(tmp_path, capsys):
    S.synth(tmp_path / "d", 6, num_heldout=0, num_compositional=0, image_size=32, shard_size=6, progress=False)
    fake = tmp_path / "d" / "train" / "00001.tar"
    fake.write_bytes(b"not a tar archive at all\n" * 40)
    with pytest.raises(DataError, match="00001.tar: named .tar but not a tar archive"):
        resolve_shards(tmp_path / "d" / "train")
    assert main(["data", "index", str(tmp_path / "d" / "train"), "--quiet"]) == 2
    assert "not a tar archive" in capsys.readouterr().err
