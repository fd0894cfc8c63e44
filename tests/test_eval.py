"""`kclip eval`: every metric against a hand-computed case, the reconstruction probe end to end on a tiny
configuration (a bag-of-words encoder loses order that an order-keeping one keeps), CLIP_benchmark's JSON shape,
exported open_clip folders against kclip checkpoints, and the errors."""

import json

import numpy as np
import pytest
import torch
from test_data_eval_sets import awa2, cub  # noqa: F401  (fixtures: the archives' layouts)

from kclip.cli import main
from kclip.data import synth as S
from kclip.data.index import index_dataset
from kclip.data.shards import iter_tar
from kclip.eval.attributes import average_precision, fit_probe, humanize, probe_metrics
from kclip.eval.retrieval import recall_at_k
from kclip.eval.runner import EvalSettings, evaluate
from kclip.eval.text_em import EMConfig, Reconstructor, WordTokenizer, exact_match, normalize_caption, token_f1
from kclip.eval.zeroshot import classify
from kclip.models.export import export_checkpoint
from kclip.teacher.store import finalize, new_meta, write_json, write_part

TINY_EM = EMConfig(d_model=32, layers=1, heads=2, d_ff=64, prefix=2, autoencoder_steps=30, adapter_steps=10,
                   batch_size=16, max_train=0, max_eval=0)  # fmt: skip


# ---- metrics against hand-computed cases ---------------------------------------------------------------------


def test_recall_on_a_4x4_similarity_matrix():
    image = torch.eye(4)  # text→image scores are the text rows; image→text scores are their columns
    text = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.5, 0, 0], [0.3, 0.2, 0.1, 0.4], [0, 0, 0, 1.0]])
    r = recall_at_k(image, text, ks=(1, 2, 3, 4))
    # text→image ranks of the right image: 0, 1 (0.9 > 0.5), 3 (0.3, 0.2, 0.4 > 0.1), 0
    assert [r[f"image_retrieval_recall@{k}"] for k in (1, 2, 3, 4)] == [0.5, 0.75, 0.75, 1.0]
    # image→text: image j scores text i by text[i, j]; every image's own text scores highest
    assert r["text_retrieval_recall@1"] == 1.0


def test_recall_counts_ties_against_the_query():
    same = torch.ones(5, 3) / 3**0.5  # collapsed embeddings: every item ties with every other
    r = recall_at_k(same, same, ks=(1, 5))
    assert r["image_retrieval_recall@1"] == 0.0 and r["text_retrieval_recall@1"] == 0.0
    assert r["image_retrieval_recall@5"] == 1.0


def test_a_probe_on_separable_data_reaches_100_percent():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 8))
    x = rng.standard_normal((600, 8)) * 2 + 1  # not standardised: the probe does it
    margin = np.abs(x @ w.T).min(1) > 0.3
    x = x[margin]
    y = (x @ w.T > 0).astype(np.uint8)
    x = torch.tensor(x, dtype=torch.float32)
    probe = fit_probe(x[:300], y[:300], l2=1e-6)
    train = probe_metrics(probe.logits(x[:300]).numpy(), y[:300])
    assert train["mean_attribute_accuracy"] == 1.0 and train["mean_balanced_accuracy"] == 1.0
    assert train["attribute_map"] == 1.0
    test = probe_metrics(probe.logits(x[300:]).numpy(), y[300:])  # new points of the same separable classes
    assert test["mean_attribute_accuracy"] > 0.98 and test["attribute_map"] > 0.99


def test_average_precision_matches_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.random(50) < 0.3
        y[0] = True
        scores = np.round(rng.standard_normal(50) + y, 1)  # rounded: many tied scores
        assert average_precision(scores, y) == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    assert np.isnan(average_precision(np.arange(3.0), np.zeros(3)))


def test_the_attribute_map_is_the_mean_over_attributes_with_positives():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(2)
    y = (rng.random((40, 5)) < 0.4).astype(np.uint8)
    y[:, 4] = 0  # no positive: left out of the mean
    logits = rng.standard_normal((40, 5)) + y
    m = probe_metrics(logits, y)
    assert m["attributes_with_positives"] == 4
    assert m["attribute_map"] == pytest.approx(average_precision_score(y[:, :4], logits[:, :4], average="macro"))


def test_zero_shot_top1_on_planted_features():
    classes = torch.eye(4)
    labels = np.array([0, 1, 2, 3, 3, 3])
    image = classes[torch.tensor([0, 1, 2, 3, 3, 0])]
    image[5] = torch.tensor([0.8, 0.0, 0.0, 0.6])  # a class-3 image nearer class 0, with class 3 second
    r = classify(image, classes, labels, ks=(1, 2))
    assert r["acc1"] == pytest.approx(5 / 6)
    assert r["mean_per_class_recall"] == pytest.approx((1 + 1 + 1 + 2 / 3) / 4)
    assert r["acc2"] == 1.0  # class 3 is the second nearest to the last image


def test_zero_shot_among_candidate_classes():
    classes = torch.eye(4)
    image = classes[torch.tensor([1, 2, 0])]  # the third image is class 0, which is not a candidate
    with pytest.raises(ValueError, match="outside the candidate"):
        classify(image, classes, np.array([1, 2, 0]), candidates=np.array([1, 2]))
    r = classify(image[:2], classes, np.array([1, 2]), candidates=np.array([1, 2]), ks=(1,))
    assert r["acc1"] == 1.0


def test_exact_match_normalisation_and_token_f1():
    assert normalize_caption("  A Red\tcircle  LEFT of a square. ") == "a red circle left of a square"
    assert exact_match(["a red circle.", "a Red  Square"], ["A red circle", "a red square ."]).tolist() == [True, True]
    assert exact_match(["a red circle"], ["a blue circle"]).tolist() == [False]
    assert token_f1("a red circle", "a red square") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0


def test_attribute_names_read_as_prompt_words():
    assert humanize("colour_red") == "red" and humanize("red_circle") == "red circle"
    assert humanize("has_bill_shape::hooked_seabird") == "hooked seabird bill shape"
    assert humanize("longleg") == "longleg"


# ---- the reconstruction probe end to end -----------------------------------------------------------------------


def _order_sensitive_captions():
    colours, shapes = ("red", "blue", "green"), ("circle", "square", "star")
    objects = [f"{c} {s}" for c in colours for s in shapes]
    return [f"a {a} left of a {b}" for a in objects for b in objects if a != b]  # 72: each bag of words twice


def _bag_of_words(captions, words):
    out = np.zeros((len(captions), len(words)), np.float32)
    for i, c in enumerate(captions):
        for w in c.split():
            out[i, words.index(w)] += 1
    return out


def _in_order(captions, words, length=8):
    out = np.zeros((len(captions), length * len(words)), np.float32)
    for i, c in enumerate(captions):
        for p, w in enumerate(c.split()):
            out[i, p * len(words) + words.index(w)] = 1
    return out


def test_a_bag_of_words_encoder_reconstructs_order_sensitive_captions_worse_than_an_ordered_one():
    captions = _order_sensitive_captions()
    words = sorted({w for c in captions for w in c.split()})
    tok = WordTokenizer(words)
    cfg = EMConfig(d_model=64, layers=2, heads=2, d_ff=128, prefix=8, autoencoder_steps=250, adapter_steps=150,
                   batch_size=72, lr=5e-3, adapter_lr=5e-3)  # fmt: skip
    rec = Reconstructor(tok, captions, cfg, seed=0, progress=False)
    rec.train_autoencoder()
    results = {}
    for name, emb in (("bag", _bag_of_words(captions, words)), ("ordered", _in_order(captions, words))):
        adapter, _ = rec.train_adapter(emb, name)
        results[name] = exact_match(rec.reconstruct(embeddings=emb, adapter=adapter), captions).mean()
    # the two captions of a bag share one embedding: at most one of them can come back
    assert results["bag"] <= 0.5 + 1e-9
    assert results["ordered"] >= 0.8, results
    assert results["ordered"] > results["bag"] + 0.25, results


# ---- kclip eval end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The synthetic set (train 48, heldout 16, compositional 16), a teacher store over the three splits, a
    baseline and a Knowledge-CLIP-less tiny checkpoint of one epoch each, and one of them exported."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "ds"
    S.synth(data, 48, num_heldout=16, num_compositional=16, image_size=64, shard_size=16, workers=1, progress=False)
    store = root / "store"
    store.mkdir()
    write_json(store / "meta.json", new_meta(model="test", pooling="mean", max_length=8, data=str(data), width=12))
    rng = np.random.default_rng(0)
    for i, split in enumerate(("train", "heldout", "compositional")):
        index_dataset(data / split, workers=1, progress=False)
        keys = [s.key for tar in sorted((data / split).glob("*.tar")) for s in iter_tar(tar)]
        write_part(store, 0, i, keys, rng.standard_normal((len(keys), 12)).astype(np.float32), split=split)
    finalize(store)
    for name, seed in (("a", "0"), ("b", "1")):
        argv = ["train", "--train-data", str(data / "train"), "--batch-size", "8", "--epochs", "1", "--alpha", "0",
                "--beta", "0", "--precision", "fp32", "--workers", "0", "--seed", seed, "--logs", str(root / "logs"),
                "--name", name, "-q"]  # fmt: skip
        assert main(argv) == 0
    export_checkpoint(root / "logs" / "a" / "checkpoints" / "latest.pt", root / "exported")
    return root, data, store


def _settings(**kw):
    base = dict(workers=0, batch_size=16, em=TINY_EM, probe_max_train=0, progress=False)
    return EvalSettings(**{**base, **kw})


def test_eval_writes_clip_benchmark_json_a_summary_and_a_plot(setup):
    root, data, store = setup
    out = root / "out"
    summary = evaluate([f"A={root / 'logs' / 'a'}", str(root / "logs" / "b" / "checkpoints" / "latest.pt")],
                       str(data), out, _settings(teacher_store=str(store)))  # fmt: skip
    tasks = {"zeroshot_retrieval", "zeroshot_classification", "attribute_probe", "text_exact_match"}
    assert {r["task"] for r in summary["records"]} == tasks
    for model in ("A", "b"):
        for task in tasks:
            for split in ("heldout", "compositional"):
                r = json.loads((out / model / f"{task}-synth_{split}.json").read_text())
                assert set(r) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
                assert r["dataset"] == f"synth_{split}" and r["model"] == model and r["task"] == task
                assert all(np.isfinite(v) for v in r["metrics"].values() if isinstance(v, float))
    r = json.loads((out / "A" / "zeroshot_retrieval-synth_heldout.json").read_text())
    assert set(r["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    r = json.loads((out / "b" / "zeroshot_classification-synth_heldout.json").read_text())
    assert {"acc1", "acc5", "mean_per_class_recall"} <= set(r["metrics"])
    r = json.loads((out / "A" / "attribute_probe-synth_compositional.json").read_text())
    assert {"mean_attribute_accuracy", "attribute_map", "attribute_zeroshot_acc1"} <= set(r["metrics"])
    assert r["metrics"]["attributes"] == 84
    em_rows = {r["model"] for r in summary["records"] if r["task"] == "text_exact_match"}
    assert em_rows == {"T5", "teacher", "A", "b"}
    r = json.loads((out / "T5" / "text_exact_match-synth_heldout.json").read_text())
    assert r["metrics"]["captions"] == 16 and set(r["metrics"]["exact_match_by_tag"]) <= {
        "count", "size", "texture", "colour_binding", "relation"}  # fmt: skip
    md = (out / "summary.md").read_text()
    assert "| T5 |" in md and "| teacher |" in md and "| A |" in md and "| b |" in md
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["seconds"]["total"] > 0


def test_an_exported_folder_and_its_kclip_checkpoint_give_the_same_numbers(setup):
    root, data, _ = setup
    summary = evaluate([f"ckpt={root / 'logs' / 'a'}", f"exported={root / 'exported'}"], str(data), root / "out2",
                       _settings(tasks=("retrieval", "zeroshot", "attributes")))  # fmt: skip
    by = {}
    for r in summary["records"]:
        by.setdefault((r["task"], r["dataset"]), {})[r["model"]] = r["metrics"]
    assert len(by) == 6
    for (task, dataset), m in by.items():
        assert m["ckpt"] == pytest.approx(m["exported"], abs=1e-6), (task, dataset)
    kinds = {c["label"]: (c["kind"], c["model"]) for c in summary["checkpoints"]}
    assert kinds == {"ckpt": ("kclip", "kclip-tiny"), "exported": ("open_clip", "kclip-tiny")}


def test_kclip_eval_command_line(setup, capsys):
    root, data, _ = setup
    out = root / "out3"
    rc = main(["eval", "retrieval", "zeroshot", "--checkpoint", str(root / "exported"), "--data", str(data),
               "--splits", "heldout", "--out", str(out), "--workers", "0", "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "text→image R@1" in printed and "zero-shot acc@1" in printed and str(out / "summary.md") in printed
    assert sorted(p.name for p in (out / "exported").iterdir()) == [
        "zeroshot_classification-synth_heldout.json", "zeroshot_retrieval-synth_heldout.json"]  # fmt: skip


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing checkpoint", "no such file or folder"),
        ("folder that is no run", "neither open_clip_config.json"),
        ("wrong architecture", "do not fit architecture"),
        ("wrong layout", "no split folders"),
        ("missing split", "no split 'val'"),
        ("store without the captions", "captions evaluated (--teacher-store)"),
        ("unknown task", "unknown"),
    ],
)
def test_bad_input_is_a_clear_error(setup, tmp_path, capsys, case, message):
    root, data, store = setup
    ckpt = str(root / "logs" / "a")
    argv = ["eval", "--checkpoint", ckpt, "--data", str(data), "--out", str(tmp_path / "o"), "--workers", "0",
            "--no-progress", "--tasks", "retrieval"]  # fmt: skip
    if case == "missing checkpoint":
        argv[2] = str(tmp_path / "nope.pt")
    elif case == "folder that is no run":
        argv[2] = str(tmp_path)
    elif case == "wrong architecture":
        bad = torch.load(root / "logs" / "a" / "checkpoints" / "latest.pt", weights_only=False)
        bad["config"]["model"] = "ViT-B-32"
        torch.save(bad, tmp_path / "bad.pt")
        argv[2] = str(tmp_path / "bad.pt")
    elif case == "wrong layout":
        argv[4] = str(data / "heldout")  # a split, not the dataset root
    elif case == "missing split":
        argv += ["--splits", "val"]
    elif case == "store without the captions":
        partial = tmp_path / "store"
        partial.mkdir()
        write_json(partial / "meta.json", new_meta(model="t", pooling="mean", max_length=8, data=str(data), width=4))
        keys = [s.key for tar in sorted((data / "train").glob("*.tar")) for s in iter_tar(tar)]
        write_part(partial, 0, 0, keys[:5], np.ones((5, 4), np.float32), split="train")
        finalize(partial)
        argv[-1] = "text-em"
        argv += ["--teacher-store", str(partial), "--autoencoder-steps", "1", "--adapter-steps", "1"]
    elif case == "unknown task":
        argv[-1] = "captioning"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kclip eval: error:") and message in err, err


def test_attribute_probes_on_the_awa2_and_cub_layouts(setup, awa2, cub):  # noqa: F811  (the imported fixtures)
    root, _, _ = setup
    sets = (("awa2", str(awa2)), ("cub", str(cub)))
    summary = evaluate([str(root / "logs" / "a")], None, root / "out_sets",
                       _settings(tasks=("attributes",), attribute_data=sets))  # fmt: skip
    by = {r["dataset"]: r for r in summary["records"]}
    assert set(by) == {"awa2", "cub"}
    assert by["awa2"]["metrics"]["attributes"] == 4 and by["awa2"]["samples"] == 3  # the test class's images
    assert by["cub"]["metrics"]["attributes"] == 3 and by["cub"]["probe_train"] == 2
    for r in by.values():
        assert 0 <= r["metrics"]["mean_attribute_accuracy"] <= 1 and 0 <= r["metrics"]["attribute_zeroshot_acc1"] <= 1


def test_an_empty_split_is_a_clear_error(setup, tmp_path):
    import shutil
    import tarfile

    root, data, _ = setup
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    (copy / "empty").mkdir()
    with tarfile.open(copy / "empty" / "00000.tar", "w"):
        pass
    index_dataset(copy / "empty", workers=1, progress=False)
    with pytest.raises(Exception, match="no shard holds a usable sample"):
        evaluate([str(root / "logs" / "a")], str(copy), tmp_path / "o", _settings(tasks=("retrieval",),
                                                                                 splits=("empty",)))  # fmt: skip
