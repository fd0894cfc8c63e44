"""Concepts: soft labels (non-negative, summing to 1, argmax = nearest centroid), the data-derived temperature,
dense and top-k formats, the classifier C, the report, and bad input. Stores are written directly through the
store's own writer, so no model is needed."""

import json

import numpy as np
import pytest
import torch

from kclip.cli import main
from kclip.concepts import Concepts, ConceptsError, fit_concepts, load_classifier, to_space, train_classifier
from kclip.concepts.fit import sq_distances, temperature_from_data
from kclip.teacher.store import StoreError, TeacherStore, finalize, new_meta, write_json, write_part


def make_store(root, rows: np.ndarray, *, part=100, complete=True, data=None, splits=None):
    """A teacher store holding `rows` under keys 000000000, 000000001, ... (written in shuffled parts); `splits`
    [N] names the split of each row (each part holds one split's rows)."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "meta.json", new_meta(model="test", pooling="mean", max_length=8, data=data, width=rows.shape[1]))
    splits = np.asarray(["data"] * len(rows) if splits is None else splits)
    order = np.random.default_rng(0).permutation(len(rows))
    i = 0
    for name in dict.fromkeys(splits.tolist()):
        mine = order[splits[order] == name]
        for s in range(0, len(mine), part):
            idx = mine[s : s + part]
            write_part(root, 0, i, [f"{j:09d}" for j in idx], rows[idx], split=name)
            i += 1
    if complete:
        finalize(root, expected_count=len(rows))
    return root


def blobs(n=600, k=6, d=24, spread=0.15, seed=0, offset=20.0):
    """Well-separated Gaussian concepts on top of a large shared offset (as mean-pooled LLM rows have)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 3
    truth = rng.integers(0, k, n)
    rows = offset + centres[truth] + spread * rng.standard_normal((n, d))
    return rows.astype(np.float32), truth


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    rows, truth = blobs()
    store = make_store(root / "store", rows)
    meta = fit_concepts(store, root / "c", 6, seed=0, classifier_epochs=30)
    return root / "c", store, rows, truth, meta


def test_soft_labels_are_distributions_peaked_at_the_nearest_centroid(fitted):
    out, store_path, _, _, meta = fitted
    store = TeacherStore(store_path)
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.float16 and labels.shape == (600, 6)
    assert (labels >= 0).all()
    np.testing.assert_allclose(labels.astype(np.float64).sum(1), 1.0, atol=6e-3)  # fp16 rounding of K entries
    x = to_space(np.asarray(store.embeddings), store.mean, store.std, meta["space"])
    centroids = np.load(out / "centroids.npy")
    assert centroids.dtype == np.float32 and centroids.shape == (6, 24)
    d = sq_distances(torch.from_numpy(x), torch.from_numpy(centroids)).numpy()
    nearest = d.argmin(1)
    exact = torch.softmax(torch.from_numpy(-d / meta["temperature"]), 1).numpy()
    top2 = np.sort(exact, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2e-3  # rows whose top two weights fp16 can tell apart
    assert clear.mean() > 0.95
    assert (labels.argmax(1)[clear] == nearest[clear]).all()
    np.testing.assert_allclose(labels, exact, atol=1e-3)


def test_contract_files_and_meta(fitted):
    out, store_path, _, _, meta = fitted
    on_disk = json.loads((out / "meta.json").read_text())
    for field in ("format", "version", "k", "width", "space", "spherical", "temperature", "temperature_rule"):
        assert field in on_disk, field
    for field in ("labels", "top_k", "seed", "objective", "count", "store"):
        assert field in on_disk, field
    assert on_disk["format"] == "kclip.concepts" and on_disk["labels"] == "dense" and on_disk["space"] == "standardized"
    assert np.array_equal(np.load(out / "keys.npy"), TeacherStore(store_path).keys)
    report = json.loads((out / "report.json").read_text())
    assert report["sizes"]["per_concept"] and sum(report["sizes"]["per_concept"]) == 600
    assert len(report["concepts"]) == 6 and report["concepts"][0]["members"]
    assert report["classifier"]["accuracy"] > 0.95
    png = report["png"]
    if png is not None:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_temperature_rule_hits_its_target(fitted):
    out, store_path, _, _, meta = fitted
    store = TeacherStore(store_path)
    x = to_space(np.asarray(store.embeddings), store.mean, store.std, meta["space"])
    centroids = np.load(out / "centroids.npy")
    tau, rule, stats = temperature_from_data(x, centroids)
    assert tau == pytest.approx(meta["temperature"], rel=1e-6)
    assert stats["median_top1"] == pytest.approx(0.5 + 0.5 / 6, abs=1e-3)
    assert "0.5 + 0.5/K" in rule and "0.5 + 0.5/K" in meta["temperature_rule"]


def test_concepts_recover_separable_clusters_and_classifier_is_frozen(fitted):
    out, _, _, truth, _ = fitted
    labels = np.load(out / "labels.npy").argmax(1)
    # every true cluster maps to one concept
    for t in range(6):
        assert np.bincount(labels[truth == t]).max() == (truth == t).sum()
    blob = torch.load(out / "classifier.pt", weights_only=True)
    assert set(blob) == {"config", "state_dict", "train"}
    assert blob["config"]["kind"] == "mlp" and blob["config"]["hidden"] == 64 and blob["config"]["embed_dim"] == 512
    assert blob["train"]["accuracy"] > 0.95 and blob["train"]["val_accuracy"] > 0.9
    c = load_classifier(out / "classifier.pt")
    assert not any(p.requires_grad for p in c.parameters()) and not c.training
    feats = torch.nn.functional.normalize(torch.randn(5, 512), dim=-1)
    assert c(feats).shape == (5, 6)


def test_classifier_trains_to_high_accuracy_on_separable_concepts():
    rows, truth = blobs(n=800, k=10, d=48, spread=0.3, seed=3)
    x = (rows - rows.mean(0)) / rows.std(0)
    soft = np.full((800, 10), 0.02, np.float32)
    soft[np.arange(800), truth] = 0.82
    for kind in ("mlp", "linear"):
        model, stats = train_classifier(x, soft, embed_dim=32, kind=kind, epochs=40, batch_size=64, seed=0)
        assert stats["accuracy"] > 0.97 and stats["val_accuracy"] > 0.95, (kind, stats)
        assert stats["loss"] < stats["label_entropy"] + 0.1  # close to the lowest possible soft cross-entropy
        with torch.no_grad():
            pred = model.teacher_logits(torch.from_numpy(x)).argmax(1).numpy()
        assert (pred == truth).mean() > 0.95


def test_topk_labels_and_the_reader(tmp_path):
    rows, _ = blobs(n=300, k=8, d=16)
    store = make_store(tmp_path / "store", rows)
    meta = fit_concepts(store, tmp_path / "c", 8, top_k=3, temperature=0.5, report=False, classifier_epochs=2)
    assert meta["labels"] == "topk" and meta["top_k"] == 3 and meta["temperature"] == 0.5
    assert not (tmp_path / "c" / "labels.npy").exists()
    idx, w = np.load(tmp_path / "c" / "topk_index.npy"), np.load(tmp_path / "c" / "topk_weight.npy")
    assert idx.dtype == np.int32 and w.dtype == np.float16 and idx.shape == w.shape == (300, 3)
    assert (np.diff(w.astype(np.float32), axis=1) <= 0).all()
    np.testing.assert_allclose(w.astype(np.float64).sum(1), 1.0, atol=3e-3)
    concepts = Concepts(tmp_path / "c")
    keys = ["000000007", "000000123"]
    dense = concepts.labels(keys)
    assert dense.shape == (2, 8) and (dense.argmax(1) == idx[[7, 123], 0]).all()
    with pytest.raises(ConceptsError, match="no concept label"):
        concepts.labels(["999999999"])
    # the top-k form for the soft-label cross-entropy: the stored arrays, row-normalised, int64 / float32
    ti, tw = concepts.topk(keys)
    assert ti.dtype == np.int64 and tw.dtype == np.float32 and ti.shape == tw.shape == (2, 3)
    assert np.array_equal(ti, idx[[7, 123]])
    np.testing.assert_allclose(tw, w[[7, 123]] / w[[7, 123]].astype(np.float32).sum(1, keepdims=True), rtol=1e-6)
    one_i, one_w = concepts.topk(keys, top_k=1)
    assert np.array_equal(one_i[:, 0], idx[[7, 123], 0]) and np.array_equal(one_w, np.ones((2, 1), np.float32))
    with pytest.raises(ConceptsError, match="top_k 4 outside \\[1, 3\\].*larger --top-k"):
        concepts.topk(keys, top_k=4)


def test_topk_of_dense_labels_agrees_with_the_dense_rows(fitted):
    concepts = Concepts(fitted[0])
    keys = ["000000003", "000000100", "000000599"]
    dense = concepts.labels(keys)
    idx, w = concepts.topk(keys, top_k=2)
    assert np.array_equal(idx, np.argsort(-dense, axis=1, kind="stable")[:, :2])
    top = np.take_along_axis(dense, idx, axis=1)
    np.testing.assert_allclose(w, top / top.sum(1, keepdims=True), rtol=1e-6)
    full_i, full_w = concepts.topk(keys)
    assert full_i.shape == (3, 6)
    scattered = np.zeros_like(dense)
    np.put_along_axis(scattered, full_i, full_w, axis=1)
    np.testing.assert_allclose(scattered, dense / dense.sum(1, keepdims=True), rtol=1e-6, atol=1e-7)


def test_classifier_input_width_is_checked_against_the_model(fitted):
    concepts = Concepts(fitted[0])
    assert concepts.embed_dim == 512 and concepts.meta["embed_dim"] == 512
    concepts.check_embed_dim(512)
    with pytest.raises(ConceptsError, match=r"C reads 512-d image features.*ViT-B-16 has a 768-d embedding"):
        concepts.classifier(embed_dim=768, what="ViT-B-16")
    assert concepts.classifier(embed_dim=512).config.embed_dim == 512


def test_concepts_are_fitted_on_one_split(tmp_path, capsys):
    """A store of train + heldout rows: fitting needs --split; only the split's rows shape the concepts."""
    train_rows, _ = blobs(n=300, k=4, d=16, seed=3)
    held_rows = blobs(n=100, k=4, d=16, seed=4, offset=-40.0)[0]  # far away: would pull centroids if used
    rows = np.concatenate([train_rows, held_rows])
    store = make_store(tmp_path / "store", rows, splits=["train"] * 300 + ["heldout"] * 100)
    kw = dict(report=False, classifier_epochs=2)
    with pytest.raises(ConceptsError, match="a store of the splits train, heldout; .* --split train"):
        fit_concepts(store, tmp_path / "c", 4, **kw)
    meta = fit_concepts(store, tmp_path / "c", 4, split="train", **kw)
    assert meta["split"] == "train" and meta["count"] == 300
    concepts = Concepts(tmp_path / "c")
    assert [k.decode() for k in concepts.keys] == [f"{i:09d}" for i in range(300)]
    view = TeacherStore(store, "train")
    only_train = fit_concepts(make_store(tmp_path / "alone", train_rows), tmp_path / "c_alone", 4, **kw)
    np.testing.assert_allclose(
        np.load(tmp_path / "c" / "centroids.npy"), np.load(tmp_path / "c_alone" / "centroids.npy")
    )
    assert meta["temperature"] == pytest.approx(only_train["temperature"])
    np.testing.assert_allclose(view.mean, train_rows.mean(0), rtol=1e-4)
    with pytest.raises(ConceptsError, match="no concept label"):
        concepts.labels(["000000350"])
    with pytest.raises(StoreError, match="no split 'val'"):
        fit_concepts(store, tmp_path / "c2", 4, split="val", **kw)
    argv = ["concepts", "fit", "--embeddings", str(store), "--k", "4", "--out", str(tmp_path / "c3"), "-q"]
    assert main(argv) == 2
    assert "--split train" in capsys.readouterr().err
    assert main([*argv, "--split", "train", "--classifier-epochs", "1"]) == 0
    assert "over 300 captions of the split train" in capsys.readouterr().out


def test_spherical_k_means_in_the_normalized_space(tmp_path):
    rows, truth = blobs(n=400, k=5, d=16, seed=2)
    store = make_store(tmp_path / "store", rows)
    meta = fit_concepts(store, tmp_path / "c", 5, space="normalized", spherical=True, report=False, classifier_epochs=2)
    assert meta["space"] == "normalized" and meta["spherical"]
    assert np.allclose(np.linalg.norm(np.load(tmp_path / "c" / "centroids.npy"), axis=1), 1.0, atol=1e-4)
    labels = np.load(tmp_path / "c" / "labels.npy").argmax(1)
    for t in range(5):
        assert np.bincount(labels[truth == t]).max() >= 0.95 * (truth == t).sum()


def test_raw_space_sees_the_anisotropy(tmp_path):
    # the shared offset makes every raw cosine ~1; the standardized space removes it
    rows, _ = blobs(n=200, k=4, d=16)
    store = TeacherStore(make_store(tmp_path / "store", rows))
    raw = np.asarray(store.embeddings, np.float32)
    z = to_space(raw, store.mean, store.std, "standardized")

    def mean_cos(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return float((a @ a.T)[np.triu_indices(len(a), 1)].mean())

    assert mean_cos(raw) > 0.9 and abs(mean_cos(z)) < 0.05


# ---- bad input ------------------------------------------------------------------------------------------------


def test_k_larger_than_the_store(tmp_path):
    store = make_store(tmp_path / "store", blobs(n=20, k=2, d=4)[0])
    with pytest.raises(ConceptsError, match=r"--k 21 is larger than the 20 samples of the store .*store"):
        fit_concepts(store, tmp_path / "c", 21)


def test_nan_row_is_named(tmp_path):
    rows, _ = blobs(n=50, k=2, d=4)
    store = make_store(tmp_path / "store", rows, complete=False)
    finalize(store, expected_count=50)
    mm = np.memmap(store / "embeddings.f16", np.float16, "r+", shape=(50, 4))
    mm[17, 2] = np.nan
    mm.flush()
    with pytest.raises(ConceptsError, match="key '000000017'.*NaN"):
        fit_concepts(store, tmp_path / "c", 2)
    with pytest.raises(StoreError, match="000000017"):
        TeacherStore(store).check_finite()


def test_incomplete_or_missing_store(tmp_path):
    store = make_store(tmp_path / "store", blobs(n=30, k=2, d=4)[0], complete=False)
    with pytest.raises(StoreError, match="incomplete.*resume"):
        fit_concepts(store, tmp_path / "c", 2)
    with pytest.raises(StoreError, match="no such teacher store"):
        fit_concepts(tmp_path / "nothing", tmp_path / "c", 2)


def test_store_that_does_not_match_the_data(tmp_path):
    from kclip.data.shards import ShardWriter

    store = make_store(tmp_path / "store", blobs(n=30, k=2, d=4)[0])
    with ShardWriter(tmp_path / "data" / "00000.tar") as w:
        for i in range(5):
            w.write(f"{100 + i:09d}", {"jpg": b"x", "txt": b"a red circle"})
    with pytest.raises(StoreError, match="not in the store"):
        fit_concepts(store, tmp_path / "c", 2, data=tmp_path / "data")


def test_other_bad_options(tmp_path):
    store = make_store(tmp_path / "store", blobs(n=30, k=2, d=4)[0])
    with pytest.raises(ConceptsError, match="--temperature"):
        fit_concepts(store, tmp_path / "c", 2, temperature=0.0)
    with pytest.raises(ConceptsError, match="--top-k"):
        fit_concepts(store, tmp_path / "c", 2, top_k=3)
    with pytest.raises(ConceptsError, match="--space"):
        fit_concepts(store, tmp_path / "c", 2, space="whitened")


@pytest.mark.gpu
def test_cuda_k_means_gives_the_cpu_concepts(tmp_path):
    rows, _ = blobs(n=2000, k=12, d=32, seed=5)
    store = make_store(tmp_path / "store", rows, part=500)
    kw = dict(seed=0, report=False, classifier_epochs=3)
    gpu = fit_concepts(store, tmp_path / "gpu", 12, device="cuda", **kw)
    cpu = fit_concepts(store, tmp_path / "cpu", 12, device="cpu", **kw)
    assert gpu["kmeans_backend"] == "cuda" and cpu["kmeans_backend"] == "cpu"
    assert gpu["objective"] == pytest.approx(cpu["objective"], rel=1e-3)
    a = np.load(tmp_path / "gpu" / "labels.npy").astype(np.float32)
    b = np.load(tmp_path / "cpu" / "labels.npy").astype(np.float32)
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.99  # same clusters; k-means++ on the host keeps the numbering
