"""`kclip run`: the whole method end to end, as stages that each skip the work already done.

    data      kclip's synthetic set (or a webdataset split into train / heldout), indexed
    teacher   every caption through the LLM teacher, once, into a store
    concepts  k-means over the training split's teacher rows, soft labels, the classifier C
    train     the plain-CLIP baseline and Knowledge-CLIP (and the ablations, and more seeds) on the same budget
    eval      text EM (T5 and teacher rows), attribute probes, retrieval, zero-shot, for every trained model
    report    RUN/report.md with the tables side by side and the plots

Everything lands in one folder, RUN = runs/<name>:

    RUN/state.json     per step: the fingerprint of its inputs, done or not, its seconds
    RUN/data/          the dataset root (synthetic), or links to the shards of the webdataset taken
    RUN/teacher/       the teacher store;  RUN/concepts/  the concepts;  RUN/logs/<model>/  the training runs
    RUN/eval/          kclip eval's outputs;  RUN/report.md, RUN/plots/*.png

A step whose fingerprint (its settings and those of the steps it reads) is recorded as done is skipped. A step
begun with the same fingerprint and cut off resumes where the step itself can (the teacher's parts, training's
latest.pt); a step whose settings changed clears its own output and starts again, and so does everything after
it. An output the state has no record of (put there by hand, or state.json removed) is never removed: the run
stops and names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kclip._atomic import atomic_write_text
from kclip.run.config import STAGES, RunConfigError

log = logging.getLogger(__name__)

STATE_FORMAT = "kclip.run_state"
# --ablate: each Knowledge-CLIP term off in turn (the baseline has both of the new terms off).
ABLATIONS: dict[str, dict[str, float]] = {
    "no-distill": {"alpha": 0.0},
    "no-concept": {"beta": 0.0},
    "no-contrastive": {"gamma": 0.0},
}
VARIANT_TITLES = {
    "baseline": "CLIP (baseline)",
    "kclip": "Knowledge-CLIP",
    "no-distill": "Knowledge-CLIP, α = 0",
    "no-concept": "Knowledge-CLIP, β = 0",
    "no-contrastive": "Knowledge-CLIP, γ = 0",
}


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able settings."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)}m{s % 60:04.1f}s"


@dataclass(frozen=True)
class Model:
    """One training run: its label (eval's label and the run's folder), variant and training seed."""

    label: str
    variant: str
    seed: int
    weights: dict[str, float] = field(default_factory=dict)  # alpha / beta / gamma over the config's


def plan_models(train: dict[str, Any], ablate: bool = False, seeds: int = 1) -> list[Model]:
    """The runs to train: baseline and Knowledge-CLIP (and the ablations) for `seeds` training seeds from the
    config's seed; the first seed's runs keep the bare variant name, so adding seeds later retrains nothing."""
    if seeds < 1:
        raise RunConfigError(f"--seeds {seeds}: must be at least 1")
    base_seed = int(train.get("seed", 0) or 0)
    variants: dict[str, dict[str, float]] = {"baseline": {"alpha": 0.0, "beta": 0.0}, "kclip": {}}
    if ablate:
        variants |= ABLATIONS
    out = []
    for i in range(seeds):
        seed = base_seed + i
        for name, weights in variants.items():
            out.append(Model(name if i == 0 else f"{name}-s{seed}", name, seed, weights))
    return out


class State:
    """RUN/state.json: {"format", "version", "steps": {key: {"fingerprint", "done", "seconds", ...}}}, rewritten
    atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise RunConfigError(f"{path}: not valid JSON ({e}); remove it to start the run again") from None
            if raw.get("format") != STATE_FORMAT:
                raise RunConfigError(f"{path}: not a kclip run state (format {raw.get('format')!r})")
            self.steps = raw.get("steps", {})

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"format": STATE_FORMAT, "version": 1, "steps": self.steps}
        atomic_write_text(self.path, json.dumps(blob, indent=1) + "\n")

    def done(self, key: str, fp: str) -> bool:
        s = self.steps.get(key, {})
        return bool(s.get("done")) and s.get("fingerprint") == fp

    def begin(self, key: str, fp: str) -> bool:
        """Record `key` as begun with `fp`; True where the same fingerprint was begun before (resume)."""
        same = self.steps.get(key, {}).get("fingerprint") == fp
        self.steps[key] = {**(self.steps.get(key, {}) if same else {}), "fingerprint": fp, "done": False}
        self._save()
        return same

    def finish(self, key: str, fp: str, seconds: float, **info: Any) -> None:
        self.steps[key] = {**self.steps.get(key, {}), **info, "fingerprint": fp, "done": True, "seconds": seconds}
        self._save()

    def seconds(self, key: str) -> float | None:
        return self.steps.get(key, {}).get("seconds")


def _clear(path: Path) -> None:
    """Remove a step's own output (always inside the run folder) before it starts again."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


class Run:
    """One `kclip run`: the config, its folder, and the stages (module docstring).

    Args:
        cfg: a run config (kclip.run.config.load_run_config).
        root: the run folder (runs/<name>).
        ablate, seeds: train the ablations too; repeat every training with this many seeds.
        device: "auto" (a GPU where there is one: the Triton losses, CUDA k-means and DALI follow), "cpu", "cuda".
        progress: tqdm bars in every stage.
        echo: where the stage lines go (the command line passes print).
    """

    def __init__(self, cfg: dict[str, Any], root: str | os.PathLike, *, ablate: bool = False, seeds: int = 1,
                 device: str = "auto", progress: bool = True, echo: Callable[[str], None] = log.info):  # fmt: skip
        self.cfg, self.root = cfg, Path(root).resolve()  # fingerprints hold paths: the same folder, the same ones
        self.models = plan_models(cfg["train"], ablate, seeds)
        self.device, self.progress, self.echo = device, progress, echo
        self.state = State(self.root / "state.json")
        self.ran: dict[str, bool] = {}
        self.fp: dict[str, str] = {}
        self.data_root = self.root / "data"
        splits = cfg["eval"]["splits"]
        splits = splits.split(",") if isinstance(splits, str) else list(splits)  # "a,b" or a YAML list
        self.eval_splits = [s for s in (str(x).strip() for x in splits) if s]

    # ---- checks before any work --------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Everything that must be on this machine, checked before the first stage: one error lists it all."""
        import importlib.util

        from kclip.models import missing_pretrained
        from kclip.teacher.model import missing_model

        problems = []
        source = self.cfg["data"]["source"]
        if source is None:
            problems.append("data.source: not set; pass --data DIR (a webdataset folder or a dataset root)")
        elif source != "synth":
            problems += self._source_problems(Path(source))
        for module, why in (("transformers", "the teacher"), ("matplotlib", "the report's plots")):
            if importlib.util.find_spec(module) is None:
                problems.append(f"{module} is not installed ({why}): pip install 'kclip[demo]'")
        if importlib.util.find_spec("transformers") is not None:
            problems.append(missing_model(self.cfg["teacher"]["model"]))
        train = self.cfg["train"]
        problems.append(missing_pretrained(train.get("model", "kclip-tiny"), train.get("pretrained")))
        for item in filter(None, (self.cfg["eval"].get("attribute_data") or "").split(",")):
            name, _, folder = item.partition(":")
            if not folder or not Path(folder).is_dir():
                problems.append(f"eval.attribute_data {item}: no such folder (the {name.upper()} release, unpacked)")
        tok = self.cfg["eval"].get("tokenizer")
        if tok and not Path(tok).is_dir():
            problems.append(f"eval.tokenizer {tok}: no such folder (a transformers tokenizer, e.g. T5's)")
        if source not in ("synth", None) and not tok:
            problems.append(
                "eval.tokenizer: needed for text EM on captions outside kclip's synthetic grammar (a transformers "
                "tokenizer folder, e.g. t5-base's)"
            )
        problems = [p for p in problems if p]
        if problems:
            raise RunConfigError(
                f"cannot start the run {self.cfg['name']}: {len(problems)} thing(s) missing:\n  - "
                + "\n  - ".join(problems)
            )

    def _source_problems(self, source: Path) -> list[str]:
        from kclip.data.shards import DataError, dataset_splits, resolve_shards

        d = self.cfg["data"]
        if not source.exists():
            return [f"data.source {source}: no such folder (webdataset shards as img2dataset writes them)"]
        splits = dataset_splits(source)
        if splits:
            missing = [s for s in ("train", *self.eval_splits) if s not in splits]
            return [f"data.source {source}: a dataset root without the split(s) {', '.join(missing)} "
                    f"(it has {', '.join(splits)})"] if missing else []  # fmt: skip
        try:
            resolve_shards(source)
        except DataError as e:
            return [f"data.source {source}: {e}"]
        if not d.get("train_samples") or not d.get("heldout_samples"):
            return [f"data.source {source}: a folder of shards needs data.train_samples and data.heldout_samples "
                    "(the paper: 500000 and 100000)"]  # fmt: skip
        if self.eval_splits != ["heldout"]:
            return [f"eval.splits {','.join(self.eval_splits)}: a folder of shards is split into train and heldout"]
        return []

    # ---- the stages --------------------------------------------------------------------------------------------

    def _step(self, key: str, fp: str, output: Path | None, work: Callable[[bool], dict | None]) -> None:
        """Run `work(resume)` unless `key` is done with `fp`; a changed fingerprint clears `output` first."""
        self.fp[key] = fp
        if self.state.done(key, fp):
            self.ran[key] = False
            return
        known = key in self.state.steps
        resume = self.state.begin(key, fp)
        if not resume and output is not None and (output.exists() or output.is_symlink()):
            if not known:  # not ours to remove: someone put it there, or state.json was lost
                raise RunConfigError(
                    f"{output}: exists, but {self.state.path} has no record of this run writing it; move it away "
                    "(or remove it) so that the run can write it, or choose another --name"
                )
            self.echo(f"[{key}] its settings changed since {output} was written: starting it again")
            _clear(output)
        t0 = time.perf_counter()
        info = work(resume) or {}
        self.state.finish(key, fp, time.perf_counter() - t0, **info)
        self.ran[key] = True

    def _stage_line(self, stage: str) -> None:
        secs, ran = self.stage_seconds(stage) or 0.0, self.stage_ran(stage)
        budget = self.cfg["budget"].get(stage)
        text = f"[{stage}] {'done in' if ran else 'skipped, done earlier in'} {fmt_seconds(secs)}"
        if budget:
            text += f" (budget {fmt_seconds(budget)}{', OVER BUDGET' if ran and secs > budget else ''})"
        self.echo(text)

    def data(self) -> None:
        d = self.cfg["data"]
        if d["source"] == "synth":
            self._step("data", fingerprint("synth", d), self.data_root, self._synth)
        else:
            source = Path(d["source"]).resolve()
            from kclip.data.shards import dataset_splits

            if dataset_splits(source):
                self.data_root = source  # a dataset root as it is: read in place, indexed beside its shards
                self._step("data", fingerprint("root", str(source)), None, lambda _: self._index(source))
            else:
                keep = {k: d[k] for k in ("train_samples", "heldout_samples")}
                self._step("data", fingerprint("split", str(source), keep), self.data_root,
                           lambda _: self._split_webdataset(source))  # fmt: skip

    def _synth(self, _resume: bool) -> dict:
        from kclip.data.synth import synth

        d = self.cfg["data"]
        synth(self.data_root, d["num_samples"], num_heldout=d["num_heldout"],
              num_compositional=d["num_compositional"], seed=d["seed"], image_size=d["image_size"],
              shard_size=d["shard_size"], progress=self.progress)  # fmt: skip
        return self._index(self.data_root)

    def _index(self, root: Path) -> dict:
        from kclip.data.index import index_dataset
        from kclip.data.shards import dataset_splits

        counts = {}
        for split in dataset_splits(root):
            summary = index_dataset(root / split, progress=self.progress)
            counts[split] = summary["good_samples"]
            if summary["bad_samples"]:
                self.echo(f"[data] {split}: {summary['bad_samples']} bad samples left out ({summary['reasons']})")
        return {"samples": counts}

    def _split_webdataset(self, source: Path) -> dict:
        """Whole shards of `source`, in order, linked into data/train until it holds train_samples good samples,
        then into data/heldout for heldout_samples (the shards are indexed in place first; nothing is copied)."""
        from kclip.data.index import index_dataset
        from kclip.data.shards import resolve_shards

        d = self.cfg["data"]
        summary = index_dataset(source, progress=self.progress)
        want = {"train": int(d["train_samples"]), "heldout": int(d["heldout_samples"])}
        if summary["good_samples"] < sum(want.values()):
            raise RunConfigError(
                f"data.source {source}: {summary['good_samples']} usable samples in {len(summary['shards'])} shards, "
                f"fewer than data.train_samples {want['train']} + data.heldout_samples {want['heldout']}"
            )
        shards = {p.name: p for p in resolve_shards(source)}
        reports = iter(summary["shards"])  # in resolve_shards' order
        counts = {}
        _clear(self.data_root)  # links only: a cut-off split starts again
        for split, n in want.items():
            folder = self.data_root / split
            folder.mkdir(parents=True, exist_ok=True)
            got = 0
            while got < n:
                report = next(reports, None)
                if report is None:
                    raise RunConfigError(
                        f"data.source {source}: whole shards leave {got} samples for {split}, fewer than "
                        f"data.{split}_samples {n}"
                    )
                shard = shards[report["shard"]]
                for f in (shard, shard.with_suffix(".idx"), shard.parent / f"{shard.stem}_index.json"):
                    if f.is_file():  # the shard and the index files `kclip data index` wrote beside it
                        (folder / f.name).symlink_to(f.resolve())
                got += report["good_samples"]
            counts[split] = got
        return {"samples": counts}

    def teacher(self) -> None:
        from kclip.teacher.embed import embed

        t = self.cfg["teacher"]
        splits = ",".join(dict.fromkeys(["train", *self.eval_splits]))

        def work(_resume: bool) -> dict:
            r = embed(f"{self.data_root}:{splits}", self.root / "teacher", model=t["model"], pooling=t["pooling"],
                      max_length=t["max_length"], batch_size=t["batch_size"], dtype=t["dtype"],
                      device=self.device, progress=self.progress)  # fmt: skip
            return {"count": r["count"], "captions_per_s": r["captions_per_s"]}

        # the store resumes from its finished parts by itself; other settings start it again
        self._step("teacher", fingerprint(self.fp["data"], t, splits), self.root / "teacher", work)

    def concepts(self) -> None:
        from kclip.concepts.fit import fit_concepts
        from kclip.models import model_embed_dim

        c = self.cfg["concepts"]
        embed_dim = model_embed_dim(self.cfg["train"].get("model", "kclip-tiny"))

        def work(_resume: bool) -> dict:
            meta = fit_concepts(self.root / "teacher", self.root / "concepts", c["k"], temperature=c["temperature"],
                                top_k=c["top_k"], seed=c["seed"], space=c["space"], n_iter=c["iterations"],
                                device=self._cluster_device(), split="train", embed_dim=embed_dim,
                                classifier=c["classifier"], classifier_epochs=c["classifier_epochs"],
                                progress=self.progress)  # fmt: skip
            return {"k": meta["k"], "objective": meta["objective"], "temperature": meta["temperature"]}

        self._step("concepts", fingerprint(self.fp["teacher"], c, embed_dim), self.root / "concepts", work)

    def _cluster_device(self) -> str:
        return "cpu" if self.device == "cpu" else "auto"

    def train_argv(self, m: Model, resume: bool) -> list[str]:
        from kclip.train.params import flags_to_argv

        flags = {**self.cfg["train"], **m.weights, "seed": m.seed}
        if self.device != "auto":
            flags["device"] = self.device
        argv = flags_to_argv(flags, f"{self.cfg.get('config_file', 'the run config')}: train")
        argv += ["--train-data", str(self.data_root / "train"), "--logs", str(self.root / "logs"), "--name", m.label]
        if flags.get("alpha", 1.0) > 0:
            argv += ["--teacher-store", str(self.root / "teacher")]
        if flags.get("beta", 0.01) > 0:
            argv += ["--concepts", str(self.root / "concepts")]
        if resume and (self.root / "logs" / m.label / "checkpoints" / "latest.pt").is_file():
            argv += ["--resume", "latest"]
        if not self.progress:
            argv.append("-q")
        return argv

    def train(self) -> bool:
        """Train every planned model; False where one was stopped (SIGINT / SIGTERM: its latest.pt resumes)."""
        from kclip.train.loop import train
        from kclip.train.params import parse_train_args

        for m in self.models:
            argv = self.train_argv(m, False)
            reads = (("teacher", "--teacher-store"), ("concepts", "--concepts"))  # the baseline reads neither
            fp = fingerprint([self.fp["data"]] + [self.fp[s] for s, flag in reads if flag in argv], argv)

            def work(resume: bool, m=m) -> dict:
                self.echo(f"[train] {m.label} ({VARIANT_TITLES[m.variant]}, seed {m.seed})")
                summary = train(parse_train_args(self.train_argv(m, resume)))
                if summary["stopped"]:
                    raise _Stopped(m.label)
                return {"step": summary["step"], "epoch": summary["epoch"], "last": summary["last"]}

            try:
                self._step(f"train/{m.label}", fp, self.root / "logs" / m.label, work)
            except _Stopped:
                self.echo(f"[train] {m.label} stopped at its latest checkpoint; `kclip run` again resumes it")
                return False
        return True

    def settings(self):
        """kclip eval's settings from the config's eval section (its keys are `kclip eval`'s flags)."""
        from types import SimpleNamespace

        from kclip.eval.runner import settings_from_args

        flags = {**self.cfg["eval"], "splits": ",".join(self.eval_splits), "task": (), "train_split": "train",
                 "device": self.device, "teacher_store": str(self.root / "teacher"),
                 "no_progress": not self.progress}  # fmt: skip
        return settings_from_args(SimpleNamespace(**flags))

    def eval(self) -> None:
        from kclip.eval.runner import evaluate

        checkpoints = [f"{m.label}={self.root / 'logs' / m.label}" for m in self.models]
        fp = fingerprint([self.fp[f"train/{m.label}"] for m in self.models], self.cfg["eval"], checkpoints)

        def work(_resume: bool) -> dict:
            summary = evaluate(checkpoints, str(self.data_root), self.root / "eval", self.settings())
            return {"seconds_by_task": summary["seconds"], "skipped": summary["skipped"]}

        self._step("eval", fp, self.root / "eval", work)

    def report(self) -> Path:
        from kclip.run.report import write_report

        path = self.root / "report.md"
        self._step("report", fingerprint(self.fp["eval"], self.cfg), None, lambda _: write_report(self))
        return path

    # ---- the whole run -----------------------------------------------------------------------------------------

    def stage_keys(self, stage: str) -> list[str]:
        if stage == "train":
            return [f"train/{m.label}" for m in self.models]
        return [stage]

    def stage_seconds(self, stage: str) -> float | None:
        """The recorded seconds of a stage's steps, summed (whichever call ran them); None where none is recorded."""
        secs = [t for t in (self.state.seconds(k) for k in self.stage_keys(stage)) if t is not None]
        return sum(secs) if secs else None

    def stage_ran(self, stage: str) -> bool:
        """Whether this call ran any of the stage's steps (rather than skipping them as done)."""
        return any(self.ran.get(k) for k in self.stage_keys(stage))

    def run(self) -> dict[str, Any]:
        """Every stage in order; returns {"report", "stopped", "seconds": {stage: s}, "ran": {stage: bool}}."""
        self.preflight()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "config.json", json.dumps(self.cfg, indent=1) + "\n")
        t0 = time.perf_counter()
        report = None
        for i, stage in enumerate(STAGES, 1):
            self.echo(f"[{stage}] stage {i}/{len(STAGES)}")
            if stage == "train":
                if not self.train():
                    break
            elif stage == "report":
                report = self.report()
            else:
                getattr(self, stage)()
            self._stage_line(stage)
        seconds = {s: self.stage_seconds(s) or 0.0 for s in STAGES}
        ran = {s: self.stage_ran(s) for s in STAGES}
        return {"report": report, "stopped": report is None, "seconds": seconds, "ran": ran,
                "wall_seconds": time.perf_counter() - t0}  # fmt: skip


class _Stopped(Exception):
    """A training run was stopped by a signal (its latest.pt is written)."""
