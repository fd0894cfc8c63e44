"""`kclip run`: the smoke preset end to end through main([...]), skipping on a second run, seeds and ablations added
later without retraining what is done, the configs, the checks before any work, and the webdataset split."""

import json
import re
from pathlib import Path

import pytest

from kclip.cli import main
from kclip.run.config import DEFAULT, RunConfigError, load_run_config, merge
from kclip.run.pipeline import Run, State, plan_models
from kclip.run.report import aggregate, metric_table

CONFIGS = Path(__file__).parent.parent / "configs"


def _stage_lines(out: str) -> dict[str, str]:
    """{stage: its closing line} of what `kclip run` printed."""
    return {m[1]: m[2] for m in re.finditer(r"^\[(\w+)\] (done in .*|skipped.*)$", out, re.M)}


def _table_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells[1:]
    raise AssertionError(f"no row {first_cell!r} in the report")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return runs, ["run", "--preset", "smoke", "--runs-dir", str(runs), "--no-progress"]


def test_smoke_run_end_to_end_writes_the_report(smoke, capsys):
    runs, argv = smoke
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = _stage_lines(out)
    assert set(lines) == {"data", "teacher", "concepts", "train", "eval", "report"}
    assert all(v.startswith("done in") for v in lines.values()), lines
    root = runs / "smoke"
    assert f"report: {root / 'report.md'}" in out
    md = (root / "report.md").read_text()
    # both models' numbers in every table, and the T5 and teacher rows of the text-EM table
    for row in ("CLIP (baseline)", "Knowledge-CLIP"):
        assert md.count(f"| {row} |") == 4, row  # text EM, attributes, retrieval, training
        cells = _table_row(md, row)
        assert cells and all(re.fullmatch(r"\d+\.\d", c) for c in cells), cells
    assert re.fullmatch(r"\d+\.\d", _table_row(md, "T5 autoencoder (upper bound)")[0])
    assert re.fullmatch(r"\d+\.\d", _table_row(md, "teacher (smollm2)")[0])
    for stage in ("data", "teacher", "concepts", "train", "eval"):
        time_cell, budget, status = _table_row(md, stage)
        assert re.fullmatch(r"([\d.]+ s|\d+m[\d.]+s)( \(over\))?", time_cell), (stage, time_cell)
        assert status == "ran", (stage, status)
    for png in ("loss_curves", "metrics", "concepts"):
        assert (root / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{png}.png)" in md
    kclip_run = _table_row(md, "kclip")  # the training table: alpha / beta / gamma and the three terms logged
    assert kclip_run[2] == "1 / 0.01 / 1" and all(c != "–" for c in kclip_run[4:7]), kclip_run
    assert _table_row(md, "baseline")[2] == "0 / 0 / 1"
    evaluated = json.loads((root / "eval" / "summary.json").read_text())
    assert {c["label"] for c in evaluated["checkpoints"]} == {"baseline", "kclip"}


def test_a_second_run_skips_every_finished_stage(smoke, capsys):
    runs, argv = smoke
    report = runs / "smoke" / "report.md"
    before = report.stat().st_mtime_ns
    assert main(argv) == 0
    lines = _stage_lines(capsys.readouterr().out)
    assert set(lines) == {"data", "teacher", "concepts", "train", "eval", "report"}
    assert all(v.startswith("skipped") for v in lines.values()), lines
    assert report.stat().st_mtime_ns == before


def test_seeds_and_ablations_train_only_what_is_new(smoke, capsys):
    runs, argv = smoke
    logs = runs / "smoke" / "logs"
    kept = (logs / "kclip" / "checkpoints" / "latest.pt").stat().st_mtime_ns
    assert main([*argv, "--ablate", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    lines = _stage_lines(out)
    assert all(lines[s].startswith("skipped") for s in ("data", "teacher", "concepts")), lines
    assert lines["train"].startswith("done") and lines["eval"].startswith("done")
    trained = re.findall(r"^\[train\] (\S+) \(", out, re.M)
    assert sorted(trained) == sorted(["no-distill", "no-concept", "no-contrastive", "baseline-s1", "kclip-s1",
                                      "no-distill-s1", "no-concept-s1", "no-contrastive-s1"])  # fmt: skip
    assert (logs / "kclip" / "checkpoints" / "latest.pt").stat().st_mtime_ns == kept
    md = (runs / "smoke" / "report.md").read_text()
    assert "## Ablation" in md
    for row in ("Knowledge-CLIP, α = 0", "Knowledge-CLIP, β = 0", "Knowledge-CLIP, γ = 0"):
        assert all(re.fullmatch(r"[+-]\d+\.\d", c) for c in _table_row(md.split("## Ablation")[1], row))
    # two seeds: mean ± standard deviation
    assert all(re.fullmatch(r"\d+\.\d ± \d+\.\d", c) for c in _table_row(md, "Knowledge-CLIP")), md


def test_a_step_cut_off_resumes_and_a_changed_one_starts_again(tmp_path):
    run = Run(load_run_config("smoke"), tmp_path / "r")
    out = tmp_path / "r" / "out"
    calls = []

    def cut_off(resume):
        calls.append(resume)
        out.mkdir(parents=True, exist_ok=True)
        (out / "part").write_text("1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run._step("x", "fp1", out, cut_off)
    run = Run(load_run_config("smoke"), tmp_path / "r")  # a new process reads state.json
    run._step("x", "fp1", out, lambda resume: calls.append(resume) or {"n": 1})
    assert calls == [False, True] and (out / "part").is_file()  # resumed: its partial output kept
    assert State(tmp_path / "r" / "state.json").done("x", "fp1")
    run._step("x", "fp1", out, lambda resume: calls.append("again"))
    assert calls == [False, True]  # done: skipped
    run._step("x", "fp2", out, lambda resume: calls.append(resume))
    assert calls == [False, True, False] and not out.exists()  # other settings: cleared, run from the start


def test_plan_models_labels_and_weights():
    labels = [m.label for m in plan_models({"seed": 3}, ablate=True, seeds=2)]
    assert labels == ["baseline", "kclip", "no-distill", "no-concept", "no-contrastive",
                      "baseline-s4", "kclip-s4", "no-distill-s4", "no-concept-s4", "no-contrastive-s4"]  # fmt: skip
    m = plan_models({}, ablate=True)
    assert m[0].weights == {"alpha": 0.0, "beta": 0.0} and m[4].weights == {"gamma": 0.0}
    with pytest.raises(RunConfigError, match="--seeds 0"):
        plan_models({}, seeds=0)


def test_report_tables_give_mean_and_spread_over_seeds():
    rec = [{"model": label, "task": "text_exact_match", "dataset": "d", "metrics": {"exact_match": v}}
           for label, v in (("kclip", 0.5), ("kclip-s1", 0.7), ("baseline", 0.2), ("T5", 0.9))]  # fmt: skip
    agg = aggregate(rec, {"kclip": "kclip", "kclip-s1": "kclip", "baseline": "baseline"})
    table = metric_table(agg, ["T5", "baseline", "kclip"], {}, (("text_exact_match", "exact_match", "EM"),), ["d"])
    assert table[0] == "| model | EM d |"
    assert table[2:] == ["| T5 | 90.0 |", "| baseline | 20.0 |", "| kclip | 60.0 ± 14.1 |"]


def test_configs_tiny_is_the_default_preset_and_paper_the_published_setup():
    tiny = load_run_config("default", CONFIGS / "tiny.yaml")
    assert {k: v for k, v in tiny.items() if k != "config_file"} == load_run_config("default")
    paper = load_run_config("default", CONFIGS / "paper.yaml")
    assert paper["teacher"]["model"] == "meta-llama/Llama-2-7b-hf" and paper["concepts"]["k"] == 100
    t = paper["train"]
    assert (t["model"], t["pretrained"], t["lr"], t["epochs"]) == ("ViT-B-32", "openai", 5e-5, 100)
    assert (t["alpha"], t["beta"], t["gamma"]) == (1.0, 0.01, 1.0)
    assert (paper["data"]["train_samples"], paper["data"]["heldout_samples"]) == (500000, 100000)


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("concepts: {kk: 3}\n")
    with pytest.raises(RunConfigError, match=r"bad.yaml: unknown key 'kk' in section 'concepts'"):
        load_run_config("default", bad)
    bad.write_text("trian: {epochs: 3}\n")
    with pytest.raises(RunConfigError, match="unknown section 'trian'"):
        load_run_config("default", bad)
    with pytest.raises(RunConfigError, match="--preset huge"):
        load_run_config("huge")
    assert merge(DEFAULT, {"train": {"batch_size": 8}}, "x")["train"]["batch-size"] == 8
    assert main(["run", "--set", "train.epochs"]) == 2
    bad.write_text("train: {epocs: 3}\n")
    with pytest.raises(Exception, match="unknown key 'epocs'"):
        Run(load_run_config("smoke", bad), tmp_path / "r").train_argv(plan_models({})[0], False)


def test_the_paper_config_names_everything_missing_before_any_work(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # empty: nothing downloaded
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--config", str(CONFIGS / "paper.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    for what in ("data.source: not set", "meta-llama/Llama-2-7b-hf: not in the Hugging Face cache",
                 "--pretrained openai", "awa2:data/AwA2: no such folder", "cub:data/CUB", "data/t5-base"):  # fmt: skip
        assert what in err, what
    assert not (tmp_path / "runs").exists()
    assert main(["run", "--config", str(CONFIGS / "paper.yaml"), "--data", str(tmp_path / "nowhere")]) == 2
    assert f"data.source {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_a_webdataset_folder_is_split_into_whole_shards_by_link(tmp_path):
    from kclip.data.synth import synth

    synth(tmp_path / "wds", 64, num_heldout=0, num_compositional=0, image_size=32, shard_size=16, workers=1,
          progress=False)  # fmt: skip
    source = tmp_path / "wds" / "train"  # a folder of 4 shards of 16
    over = {"data": {"source": str(source), "train_samples": 20, "heldout_samples": 16},
            "eval": {"splits": "heldout", "tokenizer": str(tmp_path)}}  # fmt: skip
    cfg = merge(load_run_config("smoke"), over, "test")
    run = Run(cfg, tmp_path / "r", progress=False)
    run.preflight()
    run.data()
    assert run.state.steps["data"]["samples"] == {"train": 32, "heldout": 16}
    for split, shards in (("train", 2), ("heldout", 1)):
        tars = sorted((tmp_path / "r" / "data" / split).glob("*.tar"))
        assert len(tars) == shards and all(t.is_symlink() and t.with_suffix(".idx").is_file() for t in tars)
    assert sorted(p.name for p in source.iterdir() if p.suffix == ".tar")[:3] == [
        p.name for s in ("train", "heldout") for p in sorted((tmp_path / "r" / "data" / s).glob("*.tar"))]  # fmt: skip
    with pytest.raises(RunConfigError, match="64 usable samples in 4 shards, fewer than"):
        Run(merge(cfg, {"data": {"heldout_samples": 50}}, "test"), tmp_path / "r2", progress=False).data()
    with pytest.raises(RunConfigError, match="whole shards leave 16 samples for heldout, fewer than"):
        over = {"data": {"train_samples": 40, "heldout_samples": 20}}  # 60 of 64, but train takes 3 whole shards
        Run(merge(cfg, over, "test"), tmp_path / "r3", progress=False).data()
