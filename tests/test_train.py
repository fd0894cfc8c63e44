"""`kclip train` on the CPU with the tiny model and the embedded data: the losses go down, the baseline trains,
an interrupted run resumes exactly (SIGKILL with 2 workers, SIGTERM), --accum-freq gives the loss of the whole
batch, a --config file, and the errors before the first step."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kclip.cli import main
from kclip.concepts import fit_concepts
from kclip.data import synth as S
from kclip.data.index import index_dataset
from kclip.data.shards import iter_tar
from kclip.teacher.store import finalize, new_meta, write_json, write_part

TEACHER_WIDTH = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The synthetic set (train 48, heldout 12), a teacher store over both splits whose rows are a fixed random
    function of the caption's class (so they can be learnt), and concepts fitted on the train split."""
    root = tmp_path_factory.mktemp("train")
    data = root / "ds"
    S.synth(data, 48, num_heldout=12, num_compositional=0, image_size=64, shard_size=24, workers=1, progress=False)
    store = root / "store"
    store.mkdir()
    write_json(store / "meta.json", new_meta(model="test", pooling="mean", max_length=8, data=str(data), width=24))
    codes = np.random.default_rng(0).standard_normal((len(S.class_names()), TEACHER_WIDTH)).astype(np.float32)
    for i, split in enumerate(("train", "heldout")):
        index_dataset(data / split, workers=1, progress=False)
        samples = [s for tar in sorted((data / split).glob("*.tar")) for s in iter_tar(tar)]
        labels = [json.loads(s.data["json"])["label"] for s in samples]
        write_part(store, 0, i, [s.key for s in samples], codes[labels], split=split)
    finalize(store)
    concepts = root / "concepts"
    # tau 2: labels near one-hot (the class codes lie ~7 apart), so the concept loss has something to learn
    fit_concepts(store, concepts, 4, split="train", embed_dim=128, temperature=2.0, report=False, classifier_epochs=5)
    return root, data, store, concepts


def _argv(setup, name, *extra, epochs=2):
    root, data, store, concepts = setup
    return [
        "train", "--train-data", str(data / "train"), "--teacher-store", str(store), "--concepts", str(concepts),
        "--batch-size", "8", "--epochs", str(epochs), "--warmup", "2", "--lr", "2e-3", "--precision", "fp32",
        "--workers", "0", "--log-every-n-steps", "1", "--logs", str(root / "logs"), "--name", name, "-q", *extra,
    ]  # fmt: skip


def _metrics(setup, name):
    """The last record of every step in metrics.jsonl (a resumed run appends the steps it repeats)."""
    out = {}
    for line in (setup[0] / "logs" / name / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "total" in r:
            out[r["step"]] = r
    return out


def test_a_few_steps_lower_each_loss_term(setup):
    argv = _argv(setup, "lower", "--beta", "1", epochs=10)  # the paper's 0.01 moves C's term too slowly for 60 steps
    argv[argv.index("--lr") + 1] = "1e-3"
    assert main(argv) == 0
    m = _metrics(setup, "lower")
    assert len(m) == 60  # 48 samples, batch 8, 10 epochs
    terms = ("contrastive_loss", "distill_loss", "concept_loss")
    first = {k: np.mean([m[s][k] for s in range(1, 7)]) for k in terms}
    last = {k: np.mean([m[s][k] for s in range(55, 61)]) for k in terms}
    for k in terms:
        assert last[k] < first[k], (k, first[k], last[k])
    run = setup[0] / "logs" / "lower"
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert names == {f"epoch_{i}.pt" for i in range(1, 11)} | {"latest.pt"}
    params = (run / "params.txt").read_text()
    assert "alpha: 1.0\n" in params and "batch_size: 8\n" in params


def test_the_baseline_trains_without_teacher_or_concepts(setup):
    root, data, _, _ = setup
    argv = ["train", "--train-data", str(data / "train"), "--alpha", "0", "--beta", "0", "--batch-size", "8"]
    argv += ["--epochs", "3", "--warmup", "1", "--lr", "2e-3", "--precision", "fp32", "--workers", "0"]
    argv += ["--log-every-n-steps", "1", "--logs", str(root / "logs"), "--name", "base", "-q"]
    assert main(argv) == 0
    m = _metrics(setup, "base")
    assert "distill_loss" not in m[1] and "concept_loss" not in m[1]
    assert np.mean([m[s]["contrastive_loss"] for s in (16, 17, 18)]) < np.mean(
        [m[s]["contrastive_loss"] for s in (1, 2, 3)]
    )


def _spawn(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kclip.cli", *argv], env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(setup, name, n, proc, timeout=240):
    path = setup[0] / "logs" / name / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps in {timeout} s")


def test_sigkill_in_the_middle_of_an_epoch_then_resume_latest_is_exact(setup):
    """Killed with SIGKILL during epoch 1 (--workers 2, latest.pt every 2 steps), resumed with --resume latest: the
    losses of every step after the resume point equal the uninterrupted run's."""
    common = ["--workers", "2", "--save-every-n-steps", "2"]
    # all three runs as processes of one thread each: bitwise comparisons need the same reductions
    assert _spawn(_argv(setup, "whole", *common)).wait(timeout=300) == 0
    proc = _spawn(_argv(setup, "killed", *common))
    _wait_for_steps(setup, "killed", 9, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(setup[0] / "logs" / "killed" / "checkpoints" / "latest.pt", weights_only=False)
    assert 0 < ckpt["batch"] < 6 and ckpt["epoch"] == 1 and ckpt["step"] % 2 == 0  # mid-epoch
    assert _spawn(_argv(setup, "killed", *common, "--resume", "latest")).wait(timeout=300) == 0
    whole, resumed = _metrics(setup, "whole"), _metrics(setup, "killed")
    assert sorted(resumed) == sorted(whole) == list(range(1, 13))
    for step in range(ckpt["step"] + 1, 13):
        for k in ("contrastive_loss", "distill_loss", "concept_loss", "total", "lr"):
            assert resumed[step][k] == whole[step][k], (step, k)


def test_sigterm_writes_a_checkpoint_and_stops(setup):
    proc = _spawn(_argv(setup, "term", epochs=50))
    _wait_for_steps(setup, "term", 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    ckpt = torch.load(setup[0] / "logs" / "term" / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["step"] == max(_metrics(setup, "term")) and ckpt["step"] < 300
    assert ckpt["format"] == "kclip.train_checkpoint" and set(ckpt) >= {"epoch", "name", "state_dict", "optimizer"}


def test_accum_freq_gives_the_loss_and_gradients_of_the_whole_batch(setup):
    """--accum-freq 2 over two halves: the same contrastive loss and the same gradients as the whole batch."""
    from argparse import Namespace

    from kclip.data.pipeline import build_loader
    from kclip.data.transforms import TransformConfig
    from kclip.models import build_model
    from kclip.train.loop import Targets, _step, training_store

    _, data, store, concepts = setup
    args = Namespace(alpha=1.0, beta=0.01, gamma=1.0, teacher_store=str(store), concepts=str(concepts))
    args.__dict__.update(train_data=str(data / "train"), local_loss=False, precision="fp32", grad_clip_norm=None)
    torch.manual_seed(0)
    model = build_model("kclip-tiny", teacher_width=TEACHER_WIDTH, concepts=concepts)
    cfg = TransformConfig(image_size=64)
    whole = next(iter(build_loader(data / "train", batch_size=8, train=False, cfg=cfg, backend="cpu", num_workers=0)))
    halves = [{k: v[s] for k, v in whole.items()} for s in (slice(0, 4), slice(4, 8))]
    keys = np.array([k.encode() for k in whole["key"]])
    targets = Targets(args, training_store(str(store), "train"), keys, torch.device("cpu"))
    results = []
    for micro in ([whole], halves):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        losses = _step(model, model, micro, targets, args, 1, torch.device("cpu"), opt, None)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (a, ga), (b, gb) = results
    for k in ("contrastive_loss", "distill_loss", "concept_loss", "total"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_config_file_with_flags_over_it(setup, tmp_path):
    root, data, _, _ = setup
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"train-data: {data / 'train'}\nalpha: 0\nbeta: 0\nbatch_size: 16\nepochs: 1\nprecision: fp32\n")
    argv = ["train", "--config", str(cfg), "--batch-size", "8", "--workers", "0", "--logs", str(root / "logs")]
    assert main([*argv, "--name", "cfg", "--log-every-n-steps", "1", "-q"]) == 0
    assert len(_metrics(setup, "cfg")) == 6  # batch 8 from the flag, 1 epoch from the file
    cfg.write_text("batch-sise: 8\n")
    assert main(["train", "--config", str(cfg)]) == 2


def test_errors_before_the_first_step(setup, tmp_path, capsys):
    root, data, store, concepts = setup
    base = ["train", "--train-data", str(data / "train"), "--logs", str(tmp_path), "--workers", "0", "-q"]
    cases = [
        (["--concepts", str(concepts)], "--alpha 1.0 needs --teacher-store"),
        (["--teacher-store", str(tmp_path / "none"), "--beta", "0"], "no such teacher store"),
        (["--teacher-store", str(store), "--concepts", str(concepts), "--model", "ViT-B-32"], "512-d embedding"),
        (["--teacher-store", str(store), "--beta", "0", "--train-data", str(data)], "a dataset root with the splits"),
        (["--alpha", "0", "--beta", "0", "--batch-size", "100"], "fewer than one step"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    # a store whose keys do not cover the training split (one sample missing): named before the first step
    partial = tmp_path / "partial"
    partial.mkdir()
    write_json(partial / "meta.json", new_meta(model="t", pooling="mean", max_length=8, data="d", width=TEACHER_WIDTH))
    keys = sorted(s.key for tar in (data / "train").glob("*.tar") for s in iter_tar(tar))
    write_part(partial, 0, 0, keys[1:], np.zeros((len(keys) - 1, TEACHER_WIDTH), np.float32), split="train")
    finalize(partial)
    assert main([*base, "--teacher-store", str(partial), "--beta", "0", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert f"keys of the training split {data / 'train'} are not in the store (e.g. {keys[0]})" in err
    # resuming another run's checkpoint
    assert main(_argv(setup, "other", epochs=1)) == 0
    ckpt = root / "logs" / "other" / "checkpoints" / "latest.pt"
    argv = _argv(setup, "other2", "--resume", str(ckpt), "--distill-head", "mlp", epochs=1)
    assert main(argv) == 2
    assert "a checkpoint of another run (--distill-head linear)" in capsys.readouterr().err


def test_an_exported_checkpoint_loads_in_open_clip_with_identical_features(setup, tmp_path):
    import open_clip

    from kclip.models import build_model

    assert main(_argv(setup, "export", epochs=1)) == 0
    ckpt = setup[0] / "logs" / "export" / "checkpoints" / "latest.pt"
    assert main(["export", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    blob = torch.load(ckpt, weights_only=False)
    ours = build_model("kclip-tiny", teacher_width=TEACHER_WIDTH, concepts=setup[3])
    ours.load_state_dict(blob["state_dict"])
    theirs = open_clip.create_model("local-dir:" + str(tmp_path / "exported"))
    ours.eval(), theirs.eval()
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(["a red circle", "two blue squares"])
    with torch.no_grad():
        assert torch.equal(ours.clip.encode_image(images), theirs.encode_image(images))
        assert torch.equal(ours.clip.encode_text(tokens), theirs.encode_text(tokens))


def test_the_shipped_configs_parse(tmp_path):
    """configs/tiny.yaml and configs/paper.yaml are run configs whose train: section `kclip train --config` reads."""
    from pathlib import Path

    from kclip.train.params import parse_train_args

    for name in ("tiny", "paper"):
        path = Path(__file__).parent.parent / "configs" / f"{name}.yaml"
        args = parse_train_args(["--config", str(path), "--train-data", "x", "--teacher-store", "s", "--concepts", "c"])
        assert args.alpha == 1.0 and args.beta == 0.01 and args.gamma == 1.0
    assert args.model == "ViT-B-32" and args.lr == 5e-5 and args.epochs == 100


_DDP_SCRIPT = r"""
import sys, json, torch, numpy as np, torch.distributed as dist
from argparse import Namespace
from torch.nn.parallel import DistributedDataParallel
from kclip.models import build_model
from kclip.train.loop import Targets, _step, training_store

data, store, concepts, out, local = sys.argv[1:6]
world = 1
if "WORLD_SIZE" in __import__("os").environ:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
rank = dist.get_rank() if world > 1 else 0
args = Namespace(alpha=1.0, beta=0.5, gamma=1.0, teacher_store=store, concepts=concepts, train_data=data,
                 local_loss=local == "1", precision="fp32", grad_clip_norm=None)
torch.manual_seed(0)
model = build_model("kclip-tiny", teacher_width=24, concepts=concepts)
batch = torch.load(data + "/../batch.pt")
per = len(batch["key"]) // world
mine = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
keys = np.array([k.encode() for k in mine["key"]])
targets = Targets(args, training_store(store, "train"), keys, torch.device("cpu"))
wrapped = DistributedDataParallel(model) if world > 1 else model
opt = torch.optim.SGD(model.parameters(), lr=0.0)
losses = _step(wrapped, model, [mine], targets, args, world, torch.device("cpu"), opt, None)
if world > 1:  # the mean over ranks of each rank's loss
    for k in losses:
        dist.all_reduce(losses[k])
        losses[k] /= world
if rank == 0:
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"losses": {k: v.detach() for k, v in losses.items()}, "grads": grads}, out)
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_gloo_processes_equal_one_process_with_the_whole_batch(setup, tmp_path, local_loss):
    from kclip.data.pipeline import build_loader
    from kclip.data.transforms import TransformConfig

    _, data, store, concepts = setup
    loader = build_loader(data / "train", batch_size=8, train=False, cfg=TransformConfig(image_size=64), num_workers=0)
    torch.save(next(iter(loader)), data / "batch.pt")
    script = tmp_path / "ddp_step.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flag = "1" if local_loss else "0"
    common = [str(data / "train"), str(store), str(concepts)]
    one = subprocess.run([sys.executable, str(script), *common, str(tmp_path / "one.pt"), flag], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    two = subprocess.run([*cmd, *common, str(tmp_path / "two.pt"), flag], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in ("contrastive_loss", "distill_loss", "concept_loss", "total"):
        torch.testing.assert_close(a["losses"][k], b["losses"][k], rtol=1e-5, atol=1e-6)
    assert a["grads"].keys() == b["grads"].keys()
    for n in a["grads"]:
        torch.testing.assert_close(a["grads"][n], b["grads"][n], rtol=1e-4, atol=1e-6, msg=n)
