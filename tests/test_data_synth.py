"""The embedded synthetic dataset: determinism, img2dataset layout, captions that agree with their attribute
vectors and tags, relations that hold in the pictures, and a compositional split that holds out its pairs."""

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from kclip.cli import main
from kclip.data import synth as S
from kclip.data.shards import DataError, iter_tar

SPLIT_COUNTS = {"train": 90, "heldout": 30, "compositional": 30}


def _make(out, seed=0, workers=1):
    return S.synth(
        out,
        SPLIT_COUNTS["train"],
        num_heldout=SPLIT_COUNTS["heldout"],
        num_compositional=SPLIT_COUNTS["compositional"],
        seed=seed,
        image_size=64,
        shard_size=40,
        workers=workers,
        progress=False,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    _make(out)
    return out


def _samples(root, split):
    for tar in sorted((root / split).glob("*.tar")):
        for s in iter_tar(tar):
            yield tar, s


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.tar")}


def test_deterministic_for_a_seed_whatever_the_workers(dataset, tmp_path):
    _make(tmp_path / "again", workers=2)
    assert _digests(dataset) == _digests(tmp_path / "again")
    for name in ("vocab.json", "attributes.txt", "classes.txt", "dataset.json"):
        assert (dataset / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    _make(tmp_path / "other", seed=1)
    assert _digests(dataset).keys() == _digests(tmp_path / "other").keys()
    assert _digests(dataset) != _digests(tmp_path / "other")


def test_img2dataset_layout(dataset):
    keys = set()
    for split, n in SPLIT_COUNTS.items():
        tars = sorted((dataset / split).glob("*.tar"))
        assert len(tars) == -(-n // 40)
        count = 0
        for tar in tars:
            assert re.fullmatch(r"\d{5}\.tar", tar.name)
            stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
            shard = int(tar.stem)
            for i, s in enumerate(iter_tar(tar)):
                assert re.fullmatch(r"\d{9}", s.key) and int(s.key) == shard * 10**4 + i
                assert sorted(s.data) == ["jpg", "json", "txt"]
                meta = json.loads(s.data["json"])
                assert meta["key"] == s.key and meta["caption"] == s.data["txt"].decode() and meta["split"] == split
                assert meta["status"] == "success"
                assert Image.open(io.BytesIO(s.data["jpg"])).size == (64, 64)
                keys.add(s.key)
                count += 1
            assert stats["count"] == stats["successes"] == sum(1 for _ in iter_tar(tar))
        assert count == n
    assert len(keys) == sum(SPLIT_COUNTS.values())  # unique over the whole dataset
    names = [line.split("\t")[1] for line in (dataset / "attributes.txt").read_text().splitlines()]
    assert names == S.attribute_names()
    record = json.loads((dataset / "dataset.json").read_text())
    assert record["counts"] == SPLIT_COUNTS and record["attributes"] == names
    assert len((dataset / "classes.txt").read_text().splitlines()) == len(S.COLOURS) * len(S.SHAPES)


def test_vocabulary_is_rich_enough():
    assert len(S.SHAPES) >= 6 and len(S.COLOURS) == 8 and 2 <= len(S.SIZES) <= 3
    assert set(S.RELATIONS) == {"left_of", "right_of", "above", "below"}
    assert len(S.TEMPLATES_ONE) + len(S.TEMPLATES_TWO) >= 5


def test_captions_agree_with_attributes_and_tags(dataset):
    grammar = S.Grammar.load(dataset)  # the grammar as saved beside the data
    names = S.attribute_names()
    words = set(grammar.words)
    seen_tags = set()
    for split in SPLIT_COUNTS:
        for _, s in _samples(dataset, split):
            caption = s.data["txt"].decode()
            meta = json.loads(s.data["json"])
            attrs = {n for n, v in zip(names, meta["attributes"], strict=True) if v}
            assert set(caption.split()) <= words, caption
            parsed = grammar.parse(caption)
            groups = meta["groups"]
            assert 1 <= len(parsed.phrases) == len(groups) <= 2, caption
            main = groups[0]
            assert meta["label"] == S.class_index(main["colour"], main["shape"])
            for phrase in parsed.phrases:
                assert f"{phrase.colour}_{phrase.shape}" in attrs, caption
                assert {f"colour_{phrase.colour}", f"shape_{phrase.shape}"} <= attrs
                if phrase.size:
                    assert f"size_{phrase.size}" in attrs
                if phrase.texture:
                    assert f"texture_{phrase.texture}" in attrs
                group = next(g for g in groups if (g["colour"], g["shape"]) == (phrase.colour, phrase.shape))
                assert phrase.count == group["count"]
                assert phrase.size in (None, group["size"]) and phrase.texture in (None, group["texture"])
            assert f"count_{S.COUNT_WORDS[main['count']]}" in attrs
            assert sum(n.startswith("count_") for n in attrs) == 1
            is_main_first = (parsed.phrases[0].colour, parsed.phrases[0].shape) == (main["colour"], main["shape"])
            if parsed.relation is not None:
                stated = parsed.relation if is_main_first else S.INVERSE[parsed.relation]
                assert stated == meta["relation"] and f"relation_{stated}" in attrs, caption
            tags = set(meta["tags"])
            assert ("relation" in tags) == (parsed.relation is not None)
            assert ("colour_binding" in tags) == (len(parsed.phrases) == 2)
            assert ("size" in tags) == any(p.size for p in parsed.phrases)
            assert ("texture" in tags) == any(p.texture for p in parsed.phrases)
            has_number = bool(re.search(r"\b(one|two|three|four)\b", caption))
            assert ("count" in tags) == has_number, caption
            seen_tags |= tags
    assert seen_tags == {"colour_binding", "count", "relation", "size", "texture"}


def test_relations_hold_in_the_picture():
    for i in range(300):
        rng = np.random.default_rng([3, 0, i])
        scene = S.draw_scene(rng, "train", 128)
        if scene.relation is None:
            continue
        a = [o for o in scene.objects if o["group"] == 0]
        b = [o for o in scene.objects if o["group"] == 1]
        axis, sign = {"left_of": ("x", 1), "right_of": ("x", -1), "above": ("y", 1), "below": ("y", -1)}[scene.relation]
        for oa in a:
            for ob in b:
                # every A object lies wholly on its side of every B object (radius margins included)
                assert sign * (ob[axis] - oa[axis]) > oa["r"] + ob["r"] - 1e-6


def test_compositional_split_holds_out_its_pairs(dataset):
    held = {tuple(p) for p in json.loads((dataset / "dataset.json").read_text())["held_out_pairs"]}
    assert held == set(S.HELD_OUT_PAIRS)
    held_columns = [f"{c}_{s}" for c, s in held]
    names = S.attribute_names()
    train_colours, train_shapes = set(), set()
    for split in ("train", "heldout"):
        for _, s in _samples(dataset, split):
            meta = json.loads(s.data["json"])
            pairs = {(g["colour"], g["shape"]) for g in meta["groups"]}
            assert not pairs & held
            attrs = dict(zip(names, meta["attributes"], strict=True))
            assert not any(attrs[c] for c in held_columns)
            train_colours |= {c for c, _ in pairs}
            train_shapes |= {s for _, s in pairs}
    for _, s in _samples(dataset, "compositional"):
        meta = json.loads(s.data["json"])
        main = meta["groups"][0]
        assert (main["colour"], main["shape"]) in held
        assert all((g["colour"], g["shape"]) not in held for g in meta["groups"][1:])
    # every held-out pair is new only as a pair: its colour and its shape are seen in training
    many = [S.draw_scene(np.random.default_rng([0, 0, i]), "train", 64) for i in range(400)]
    colours = {g.colour for sc in many for g in sc.groups}
    shapes = {g.shape for sc in many for g in sc.groups}
    assert {c for c, _ in held} <= colours and {s for _, s in held} <= shapes
    assert not {(g.colour, g.shape) for sc in many for g in sc.groups} & held


def test_cli_synth_index_inspect(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["data", "synth", "--out", str(out), "--num-samples", "30", "--image-size", "48", "--shard-size", "16"]
    assert main(argv + ["--seed", "2", "--workers", "1", "--quiet", "--index"]) == 0
    text = capsys.readouterr().out
    assert "train 30, heldout 3, compositional 3" in text and "0 left out" in text
    assert sorted(p.name for p in (out / "train").glob("*.idx")) == ["00000.idx", "00001.idx"]
    assert main(["data", "inspect", str(out / "train"), "--quiet"]) == 0
    assert "30 samples, 0 bad" in capsys.readouterr().out


# (synth keyword arguments, the message's start: the flag and the value, then the allowed range)
BAD_ARGS = [
    ({"shard_size": 0}, r"--shard-size 0: must be in \[1, 10000\]"),
    ({"shard_size": 10001}, r"--shard-size 10001: must be in \[1, 10000\]"),
    ({"image_size": 16}, r"--image-size 16: must be at least 32 pixels"),
    ({"num_samples": -5}, r"--num-samples -5: the train split's sample count must be >= 0"),
    ({"num_heldout": -1}, r"--num-heldout -1: the heldout split's sample count must be >= 0"),
    ({"num_compositional": -2}, r"--num-compositional -2: the compositional split's sample count must be >= 0"),
    (
        {"num_samples": 10001, "shard_size": 1},
        r"--num-samples 10001: needs more than 10000 shards .* raise --shard-size",
    ),
    ({"workers": 0}, r"--workers 0: must be at least 1"),
    ({"seed": -1}, r"--seed -1: must be >= 0"),
]


@pytest.mark.parametrize(
    "kwargs,message", BAD_ARGS, ids=[",".join(f"{k}={v}" for k, v in kw.items()) for kw, _ in BAD_ARGS]
)
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    args = {"num_samples": 4, "num_heldout": 2, "num_compositional": 2, "image_size": 32, "shard_size": 2}
    with pytest.raises(DataError, match="^" + message):
        S.synth(tmp_path / "out", **{**args, "workers": 1, **kwargs}, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_bad_count_leaves_an_earlier_dataset_alone(tmp_path):
    S.synth(tmp_path, 4, num_heldout=2, num_compositional=2, image_size=32, shard_size=2, workers=1, progress=False)
    before = _digests(tmp_path)
    with pytest.raises(DataError, match="--num-compositional -1"):
        S.synth(tmp_path, 4, num_heldout=2, num_compositional=-1, image_size=32, shard_size=2, progress=False)
    assert _digests(tmp_path) == before and len(before) == 4  # train and heldout were not cleared on the way


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--shard-size", "0", "--shard-size 0: must be in [1, 10000]"),
        ("--image-size", "16", "--image-size 16: must be at least 32 pixels"),
        ("--num-samples", "-5", "--num-samples -5: the train split's sample count must be >= 0"),
        ("--workers", "0", "--workers 0: must be at least 1"),
    ],
)
def test_cli_synth_bad_arguments_exit_2_without_a_traceback(tmp_path, capsys, flag, value, message):
    argv = ["data", "synth", "--out", str(tmp_path / "out"), "--num-samples", "4", "--image-size", "32", "--quiet"]
    assert main(argv + [flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"kclip data: error: {message}")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err  # one line, no traceback
    assert captured.out == "" and not (tmp_path / "out").exists()
