"""KnowledgeCLIP on the embedded kclip-tiny: outputs, W_e, the frozen C, parameter groups, pretrained weights, bad
input, and `kclip export` round trips through both of open_clip's loaders. CPU only, no downloads."""

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn

from kclip.cli import main
from kclip.concepts import ConceptsError, fit_concepts
from kclip.models import KnowledgeCLIP, ModelError, build_model, param_groups
from kclip.models.export import CONFIG, WEIGHTS, ExportError, export_checkpoint
from kclip.models.knowledge_clip import CONFIG_DIR
from kclip.teacher.store import finalize, new_meta, write_json, write_part

E = 128  # kclip-tiny's embedding width
D = 24  # the test teacher's width
K = 4


def make_store(root, rows: np.ndarray, part=100):
    """A complete teacher store holding `rows` under keys 000000000, 000000001, ... (as tests/test_concepts.py)."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "meta.json", new_meta(model="test", pooling="mean", max_length=8, data=None, width=rows.shape[1]))
    for i, s in enumerate(range(0, len(rows), part)):
        idx = np.arange(s, min(s + part, len(rows)))
        write_part(root, 0, i, [f"{j:09d}" for j in idx], rows[idx])
    finalize(root, expected_count=len(rows))
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((K, D)) * 3
    rows = centres[rng.integers(0, K, 200)] + 0.1 * rng.standard_normal((200, D))
    return make_store(tmp_path_factory.mktemp("store") / "s", rows.astype(np.float32))


@pytest.fixture(scope="module")
def concepts(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("concepts") / "c"
    fit_concepts(store, out, K, report=False, classifier_epochs=2, embed_dim=E, seed=0)
    return out


def batch(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 64, 64, generator=g), torch.randint(0, 49408, (b, 77), generator=g)


def features(clip: nn.Module, images, tokens):
    clip.eval()
    with torch.no_grad():
        return clip.encode_image(images), clip.encode_text(tokens)


@pytest.mark.parametrize("b", [1, 3])
def test_tiny_outputs_are_normalised_with_the_configured_shapes(b):
    torch.manual_seed(0)
    model = build_model("kclip-tiny")
    assert isinstance(model, KnowledgeCLIP) and model.distill_head is None and model.concept_classifier is None
    assert model.embed_dim == E and model.image_size == 64
    assert model.image_mean == open_clip.OPENAI_DATASET_MEAN and model.image_std == open_clip.OPENAI_DATASET_STD
    assert model.clip.visual.transformer.resblocks[0].attn.num_heads == 4  # width 128 / head_width 32
    out = model(*batch(b))
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    for key in ("image_features", "text_features"):
        assert out[key].shape == (b, E)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(b))
    assert out["logit_scale"].numel() == 1
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_distill_head_maps_the_text_embedding_to_the_teacher_width(kind):
    model = build_model("kclip-tiny", teacher_width=D, distill_head=kind)
    head = model.distill_head
    if kind == "linear":
        assert isinstance(head, nn.Linear) and head.weight.shape == (D, E)
    else:
        assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
        assert head[0].weight.shape == (64, E) and head[2].weight.shape == (D, 64)
    out = model(*batch(3))
    assert out["projected_text"].shape == (3, D)
    torch.testing.assert_close(out["projected_text"], head(out["text_features"]))


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_low_precision_puts_the_heads_in_the_dtype_of_the_features(concepts, precision):
    model = build_model("kclip-tiny", teacher_width=D, distill_head="mlp", concepts=concepts, precision=precision)
    images, tokens = batch(2)
    out = model(images.to(torch.bfloat16), tokens)
    assert out["image_features"].dtype == torch.bfloat16
    assert out["projected_text"].dtype == out["concept_logits"].dtype == torch.bfloat16
    assert out["projected_text"].shape == (2, D) and out["concept_logits"].shape == (2, K)


def test_encoders_and_grad_checkpointing_pass_through_to_open_clip():
    model = build_model("kclip-tiny")
    images, tokens = batch(2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.clip.encode_image(images))
        assert torch.equal(model.encode_text(tokens, normalize=True), model(images, tokens)["text_features"])
    assert not model.clip.visual.transformer.grad_checkpointing
    model.set_grad_checkpointing(True)
    assert model.clip.visual.transformer.grad_checkpointing and model.clip.transformer.grad_checkpointing


def test_concept_classifier_is_frozen_stays_in_eval_and_passes_gradients(concepts):
    model = build_model("kclip-tiny", concepts=concepts)
    c = model.concept_classifier
    assert c is not None and not any(p.requires_grad for p in c.parameters())
    model.train()
    assert model.clip.training and not c.training
    out = model(*batch(3))
    assert out["concept_logits"].shape == (3, K)
    torch.testing.assert_close(out["concept_logits"], c(out["image_features"]))
    out["concept_logits"].square().sum().backward()
    assert all(p.grad is None for p in c.parameters())
    grad = model.clip.visual.proj.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.clip.text_projection.grad is None  # the text tower does not feed C


def test_embed_width_mismatch_names_both_widths(store, tmp_path):
    narrow = tmp_path / "c64"
    fit_concepts(store, narrow, K, report=False, classifier_epochs=2, embed_dim=64, seed=0)
    with pytest.raises(ConceptsError, match=r"64-d.*128-d") as e:
        build_model("kclip-tiny", concepts=narrow)
    assert "--model kclip-tiny" in str(e.value)


def test_param_groups_follow_open_clip_train_and_leave_out_frozen(concepts):
    model = build_model("kclip-tiny", teacher_width=D, concepts=concepts)
    groups = param_groups(model, 0.2)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.2]
    no_decay, decay = ({id(p) for p in g["params"]} for g in groups)
    named = dict(model.named_parameters())
    assert not no_decay & decay
    assert no_decay | decay == {id(p) for p in model.parameters() if p.requires_grad}
    assert not {id(p) for p in model.concept_classifier.parameters()} & (no_decay | decay)
    for name in ("clip.logit_scale", "clip.visual.ln_pre.weight", "clip.ln_final.weight", "distill_head.bias"):
        assert id(named[name]) in no_decay, name
    assert id(named["clip.positional_embedding"]) in decay  # 2-D, decayed as in open_clip_train
    for name in ("clip.visual.proj", "clip.text_projection", "clip.token_embedding.weight", "distill_head.weight"):
        assert id(named[name]) in decay, name


def test_pretrained_local_file_gives_identical_features(tmp_path):
    source = build_model("kclip-tiny")
    path = tmp_path / "weights.pt"
    torch.save(source.clip.state_dict(), path)
    loaded = build_model("kclip-tiny", pretrained=str(path))
    x = batch(2)
    for a, b in zip(features(source.clip, *x), features(loaded.clip, *x), strict=True):
        assert torch.equal(a, b)


def test_bad_pretrained_and_unknown_architecture_raise_model_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match="nope.pt"):
        build_model("kclip-tiny", pretrained=str(missing))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="corrupt.pt"):
        build_model("kclip-tiny", pretrained=str(corrupt))
    with pytest.raises(ModelError, match=r"ViT-Tiniest-7.*ViT-B-32.*add_model_config"):
        build_model("ViT-Tiniest-7")
    with pytest.raises(ModelError, match="teacher width 0"):
        build_model("kclip-tiny", teacher_width=0)
    with pytest.raises(ModelError, match="'conv'"):
        build_model("kclip-tiny", teacher_width=D, distill_head="conv")
    with pytest.raises(ModelError, match="'fp8'.*amp_bf16"):
        build_model("kclip-tiny", precision="fp8")
    with pytest.raises(ModelError, match="laion9000: neither a file nor a pretrained tag.*openai"):
        build_model("ViT-B-32", pretrained="laion9000")  # refused before the 88M-parameter model is built


def write_training_checkpoint(path, model: KnowledgeCLIP, prefix: str, **drop):
    ckpt = {
        "epoch": 3,
        "name": "test",
        "state_dict": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer": {},
        "config": {"model": "kclip-tiny", "distill_head": "linear"},
    }
    for key in drop:
        del ckpt[key]
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("prefix", ["module.", "module._orig_mod."])
def test_export_round_trip_through_both_open_clip_loaders(concepts, tmp_path, prefix):
    model = build_model("kclip-tiny", teacher_width=D, concepts=concepts)
    with torch.no_grad():  # weights no fresh initialisation could give
        model.clip.logit_scale.fill_(2.5)
        model.clip.visual.proj.mul_(-3.0)
    ckpt = write_training_checkpoint(tmp_path / "epoch_3.pt", model, prefix)
    out = tmp_path / "export"
    summary = export_checkpoint(ckpt, out)
    assert summary["model"] == "kclip-tiny" and summary["epoch"] == 3
    saved = torch.load(out / WEIGHTS, weights_only=True)
    assert set(saved) == set(model.clip.state_dict())  # no W_e, no C, no prefixes
    config = json.loads((out / CONFIG).read_text())
    assert config["model_cfg"] == open_clip.get_model_config("kclip-tiny")
    assert json.loads((out / "kclip-tiny.json").read_text()) == config["model_cfg"]  # for add_model_config(out)
    assert config["preprocess_cfg"]["mean"] == list(model.image_mean)
    by_file = open_clip.create_model("kclip-tiny", pretrained=str(out / WEIGHTS))
    by_dir = open_clip.create_model("local-dir:" + str(out))
    assert by_dir.logit_scale.item() == 2.5
    x = batch(2, seed=1)
    want = features(model.clip, *x)
    for loaded in (by_file, by_dir):
        for a, b in zip(want, features(loaded, *x), strict=True):
            assert torch.equal(a, b)


def test_export_rejects_checkpoints_without_config_or_state_dict(tmp_path):
    model = build_model("kclip-tiny")
    for field in ("config", "state_dict"):
        ckpt = write_training_checkpoint(tmp_path / f"no_{field}.pt", model, "module.", **{field: True})
        with pytest.raises(ExportError, match=field):
            export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_rejects_weights_of_another_architecture_or_a_bare_clip(tmp_path):
    wider = json.loads((CONFIG_DIR / "kclip-tiny.json").read_text())
    wider["embed_dim"] = 96
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "kclip-test-e96.json").write_text(json.dumps(wider))
    open_clip.add_model_config(tmp_path / "configs")
    ckpt = write_training_checkpoint(tmp_path / "ckpt.pt", build_model("kclip-tiny"), "module.")
    saved = torch.load(ckpt, weights_only=False)
    saved["config"]["model"] = "kclip-test-e96"
    torch.save(saved, ckpt)
    with pytest.raises(ExportError, match=r"ckpt.pt: its clip weights do not fit architecture kclip-test-e96"):
        export_checkpoint(ckpt, tmp_path / "out")
    saved["config"]["model"] = "ViT-Tiniest-7"
    torch.save(saved, ckpt)
    with pytest.raises(ExportError, match="unknown open_clip architecture"):
        export_checkpoint(ckpt, tmp_path / "out")
    saved["state_dict"] = {k.replace("module.clip.", ""): v for k, v in saved["state_dict"].items()}
    torch.save(saved, ckpt)
    with pytest.raises(ExportError, match=r"no clip\.\* entries"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_exits_0_and_2_on_a_missing_or_corrupt_file(tmp_path, capsys):
    ckpt = write_training_checkpoint(tmp_path / "latest.pt", build_model("kclip-tiny"), "module.")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / WEIGHTS).is_file() and (tmp_path / "ok" / CONFIG).is_file()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "kclip export: error:" in err and "missing.pt" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    assert main(["export", str(corrupt), "--out", str(tmp_path / "bad")]) == 2
    assert "corrupt.pt" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
