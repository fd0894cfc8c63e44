"""`kclip eval`: every task over every checkpoint, features computed once per checkpoint and split.

Order of work: load each checkpoint; one feature pass over each evaluated split of the dataset root (and the
training split's first `probe_max_train` images for the synthetic set's attribute probe, and the text of its first
`EMConfig.max_train` captions for the reconstruction adapters); then the tasks on those features; then the
reports (kclip.eval.report). A task that cannot run on the data given (zero-shot without class labels, the
teacher's EM row without a store) is skipped with the reason, recorded in summary.json and printed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kclip.eval.errors import EvalError
from kclip.eval.names import ATTRIBUTE_SETS, TASKS
from kclip.eval.text_em import EMConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSettings:
    """What `kclip eval` runs (its flags).

    Attributes:
        tasks: a subset of TASKS.
        splits: the dataset root's splits evaluated, each on its own.
        train_split: the split the probes and the reconstruction adapters learn from.
        batch_size, workers: of the feature passes.
        device: "auto" (CUDA where there is one), "cpu" or "cuda[:N]".
        seeds: text EM is repeated with seeds 0 .. seeds-1 (the T5's initialisation, the batches, the adapters)
            and reported as mean and standard deviation.
        teacher_store: a `kclip teacher embed` store covering the training and evaluated captions, for the
            teacher's row of the EM table.
        tokenizer: a transformers tokenizer folder for text EM on captions outside the synthetic grammar.
        attribute_data: [(name, folder)] of AWA2 / CUB in their released layouts.
        probe_max_train: at most this many training images for an attribute probe (0: all).
        em: the reconstruction probe's sizes and budget.
        progress: tqdm bars.
    """

    tasks: tuple[str, ...] = TASKS
    splits: tuple[str, ...] = ("heldout", "compositional")
    train_split: str = "train"
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    seeds: int = 1
    teacher_store: str | None = None
    tokenizer: str | None = None
    attribute_data: tuple[tuple[str, str], ...] = ()
    probe_max_train: int = 5000
    em: EMConfig = dataclasses.field(default_factory=EMConfig)
    progress: bool = True


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {choice}: torch sees no CUDA device here")
    return device


def data_name(root: Path) -> str:
    """ "synth" for kclip's synthetic set, else the root folder's name."""
    import json

    meta = root / "dataset.json"
    if meta.is_file():
        try:
            if json.loads(meta.read_text()).get("format") == "kclip.synth":
                return "synth"
        except ValueError:
            pass
    return root.name


def check_data(root: str | os.PathLike, splits: tuple[str, ...], train_split: str | None) -> Path:
    """The dataset root, after checking it has every named split with shards.

    Raises:
        EvalError: not a folder, no split folders (the wrong layout), or a named split it lacks.
    """
    from kclip.data.shards import dataset_splits

    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"--data {root}: no such folder (a dataset root with one folder of shards per split)")
    have = dataset_splits(root)
    if not have:
        raise EvalError(
            f"--data {root}: no split folders of .tar shards in it (expected DIR/train, DIR/heldout, ... as "
            "`kclip data synth` writes them)"
        )
    for split in (*splits, *([train_split] if train_split else [])):
        if split not in have:
            raise EvalError(f"--data {root}: no split {split!r} (its splits: {', '.join(have)})")
    return root


def class_names(root: Path) -> list[str] | None:
    """The root's classes.txt ("<id> <name>", 1-based ids in label order), None where it has none."""
    from kclip.data.attributes import read_id_names

    path = root / "classes.txt"
    return [name for _, name in sorted(read_id_names(path))] if path.is_file() else None


def _seeded_subset(n: int, k: int, seed: int = 0) -> np.ndarray:
    if not k or n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _record(task: str, dataset: str, model: str, pretrained: str, metrics: dict[str, Any], **extra) -> dict:
    """One result in CLIP_benchmark's JSON shape, plus kclip's fields (split, seconds, ...)."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
            "language": "en", **extra}  # fmt: skip


class Evaluation:
    """One `kclip eval` invocation: the encoders, the feature cache and the results."""

    def __init__(self, checkpoints: list[str], data: str | None, settings: EvalSettings):
        from kclip.eval.encoders import load_encoder

        unknown = [t for t in settings.tasks if t not in TASKS]
        if unknown:
            raise EvalError(f"--tasks {','.join(unknown)}: unknown (tasks: {', '.join(TASKS)})")
        if not checkpoints:
            raise EvalError("no --checkpoint given: name one or more kclip checkpoints or exported folders")
        self.s = settings
        needs_root = any(t in settings.tasks for t in ("retrieval", "zeroshot", "text-em")) or (
            "attributes" in settings.tasks and not settings.attribute_data
        )
        if needs_root and data is None:
            raise EvalError("--data: name the dataset root to evaluate on (e.g. the folder `kclip data synth` wrote)")
        train_needed = "text-em" in settings.tasks or "attributes" in settings.tasks
        self.root = check_data(data, settings.splits, settings.train_split if train_needed else None) if data else None
        self.name = data_name(self.root) if self.root else None
        for name, folder in settings.attribute_data:
            if name not in ATTRIBUTE_SETS:
                raise EvalError(f"--attribute-data {name}:{folder}: unknown set (known: {', '.join(ATTRIBUTE_SETS)})")
        self.device = resolve_device(settings.device)
        self.encoders = [load_encoder(spec, self.device) for spec in checkpoints]
        labels = [e.label for e in self.encoders]
        if len(set(labels)) != len(labels):
            raise EvalError(f"two checkpoints share a label ({', '.join(labels)}): name them LABEL=PATH")
        self.features: dict[tuple[str, str], Any] = {}
        self.records: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    # ---- features ----------------------------------------------------------------------------------------------

    def split(self, encoder, split: str, max_samples: int = 0, text: bool = True):
        """SplitFeatures of `split` through `encoder`, computed on first use (text=False: images only)."""
        from kclip.eval.features import split_features

        key = (encoder.label, split, max_samples, text)
        if key not in self.features:
            t0 = time.perf_counter()
            self.features[key] = split_features(encoder, os.fspath(self.root / split), split,
                                                batch_size=self.s.batch_size, workers=self.s.workers,
                                                max_samples=max_samples, text=text,
                                                progress=self.s.progress)  # fmt: skip
            self._time("features", t0)
        return self.features[key]

    def _time(self, what: str, t0: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0

    def dataset(self, split: str) -> str:
        return f"{self.name}_{split}"

    # ---- tasks -------------------------------------------------------------------------------------------------

    def retrieval(self) -> None:
        from kclip.eval.retrieval import TASK, recall_at_k

        for enc in self.encoders:
            for split in self.s.splits:
                f = self.split(enc, split)
                t0 = time.perf_counter()
                metrics = recall_at_k(f.image, f.text)
                self._time("retrieval", t0)
                self.records.append(_record(TASK, self.dataset(split), enc.label, enc.path, metrics, split=split,
                                            samples=len(f)))  # fmt: skip

    def zeroshot(self) -> None:
        from kclip.eval.features import text_features
        from kclip.eval.zeroshot import TASK, class_embeddings, classify

        names = class_names(self.root)
        if names is None:
            self.skipped["zeroshot"] = f"{self.root}: no classes.txt naming the classes"
            return
        for enc in self.encoders:
            classes = None
            for split in self.s.splits:
                f = self.split(enc, split)
                if f.labels is None:
                    self.skipped[f"zeroshot {split}"] = f"the samples of {split} carry no class label"
                    continue
                if f.labels.max() >= len(names):
                    raise EvalError(f"{self.root}/classes.txt: {len(names)} classes, but {split} has label "
                                    f"{int(f.labels.max())}")  # fmt: skip
                t0 = time.perf_counter()
                if classes is None:
                    classes = class_embeddings(lambda texts, e=enc: text_features(e, texts), names)
                metrics = classify(f.image, classes, f.labels)
                self._time("zeroshot", t0)
                self.records.append(_record(TASK, self.dataset(split), enc.label, enc.path, metrics, split=split,
                                            samples=len(f), classes=len(names)))  # fmt: skip

    def attributes(self) -> None:
        if self.root is not None:
            self._synth_attributes()
        for name, folder in self.s.attribute_data:
            self._attribute_set(name, folder)

    @staticmethod
    def _prompt_embeddings(enc, class_attributes: np.ndarray, attribute_names: list[str]) -> torch.Tensor:
        """[C, E]: the text embedding of each class's attribute prompt."""
        from kclip.eval.attributes import attribute_prompt
        from kclip.eval.features import text_features

        return text_features(enc, [attribute_prompt(row, attribute_names) for row in class_attributes])

    def _probe_records(self, enc, dataset: str, probe, prompt_emb, x_eval, y_eval, labels_eval, **extra) -> None:
        from kclip.eval.attributes import TASK, probe_metrics
        from kclip.eval.zeroshot import classify

        metrics = probe_metrics(probe.logits(x_eval).numpy(), y_eval)
        zs = classify(x_eval, prompt_emb, labels_eval, candidates=np.unique(labels_eval), ks=(1,))
        metrics["attribute_zeroshot_acc1"] = zs["acc1"]
        metrics["attribute_zeroshot_classes"] = int(len(np.unique(labels_eval)))
        self.records.append(_record(TASK, dataset, enc.label, enc.path, metrics, **extra))

    def _synth_attributes(self) -> None:
        from kclip.data.attributes import class_attribute_shares, read_id_names
        from kclip.eval.attributes import fit_probe

        path = self.root / "attributes.txt"
        if not path.is_file():
            self.skipped["attributes"] = f"{self.root}: no attributes.txt (not an attribute-labelled dataset)"
            return
        attribute_names = [n for _, n in read_id_names(path)]
        names = class_names(self.root) or []
        for enc in self.encoders:
            train = self.split(enc, self.s.train_split, self.s.probe_max_train, text=False)
            if train.attributes is None or train.labels is None:
                self.skipped["attributes"] = f"the samples of {self.s.train_split} carry no attributes or labels"
                return
            t0 = time.perf_counter()
            probe = fit_probe(train.image, train.attributes)
            class_attr = class_attribute_shares(train.labels, train.attributes, len(names))
            prompt_emb = self._prompt_embeddings(enc, class_attr, attribute_names)  # once for every split
            self._time("attributes", t0)
            for split in self.s.splits:
                f = self.split(enc, split)
                if f.attributes is None:
                    continue
                t0 = time.perf_counter()
                self._probe_records(enc, self.dataset(split), probe, prompt_emb, f.image, f.attributes, f.labels,
                                    split=split, samples=len(f), probe_train=len(train),
                                    probe_loss=probe.loss)  # fmt: skip
                self._time("attributes", t0)

    def _attribute_set(self, name: str, folder: str) -> None:
        from kclip.data import read_awa2, read_cub
        from kclip.eval.attributes import fit_probe
        from kclip.eval.features import image_list_features

        data = (read_awa2 if name == "awa2" else read_cub)(folder)
        if len(data) == 0:
            raise EvalError(f"--attribute-data {name}:{folder}: no images")
        is_train = data.is_train
        if is_train is None:  # no proposed split: a seeded half
            is_train = np.zeros(len(data), bool)
            is_train[_seeded_subset(len(data), len(data) // 2)] = True
        for enc in self.encoders:
            t0 = time.perf_counter()
            x, rows = image_list_features(enc, data, batch_size=self.s.batch_size, workers=self.s.workers,
                                          progress=self.s.progress)  # fmt: skip
            self._time("features", t0)
            t0 = time.perf_counter()
            train = np.flatnonzero(is_train[rows])
            train = train[_seeded_subset(len(train), self.s.probe_max_train)]
            test = np.flatnonzero(~is_train[rows])
            if not len(train) or not len(test):
                raise EvalError(f"--attribute-data {name}:{folder}: its split leaves no training or no test images")
            probe = fit_probe(x[train], data.attributes[rows[train]])
            prompt_emb = self._prompt_embeddings(enc, data.class_attributes, data.attribute_names)
            self._probe_records(enc, name, probe, prompt_emb, x[test], data.attributes[rows[test]],
                                data.labels[rows[test]], split="test", samples=len(test), probe_train=len(train),
                                probe_loss=probe.loss)  # fmt: skip
            self._time("attributes", t0)

    def text_em(self) -> None:
        """The reconstruction table (kclip.eval.text_em): the T5 autoencoder's own row, the teacher's, and one row
        per checkpoint, on each evaluated split, averaged over `seeds` runs."""
        from kclip.eval.features import text_features
        from kclip.eval.text_em import TASK, HFTokenizer, Reconstructor, WordTokenizer, aggregate_seeds, score

        t0 = time.perf_counter()
        em = self.s.em
        tok = HFTokenizer(self.s.tokenizer) if self.s.tokenizer else WordTokenizer.from_grammar(self.root)
        train_keys, train_caps = self._train_captions(em.max_train)
        evals = {}
        for split in self.s.splits:
            f = self.split(self.encoders[0], split)
            n = min(len(f), em.max_eval) if em.max_eval else len(f)
            evals[split] = (f.keys[:n], f.captions[:n], None if f.tags is None else f.tags[:n])
        if isinstance(tok, WordTokenizer):
            for split, (_, caps, _) in evals.items():
                if (share := tok.unknown_share(caps)) > 0:
                    log.warning("text EM: %.1f%% of the %s captions hold words outside the grammar", 100 * share, split)
        # [(row, pretrained, train embeddings or None for the autoencoder, {split: eval embeddings})]
        rows: list[tuple[str, str, Any, dict]] = [("T5", "autoencoder", None, {})]
        if self.s.teacher_store:
            from kclip.teacher.store import TeacherStore

            store = self.s.teacher_store

            def teacher_rows(split: str, keys: list[str]) -> np.ndarray:
                view = TeacherStore(store, split=split, stats="train")
                view.check_keys(keys, what=f"the {split} captions evaluated (--teacher-store)")
                return view.rows(keys, standardize=True)

            train_rows = teacher_rows(self.s.train_split, train_keys)
            evals_rows = {split: teacher_rows(split, keys) for split, (keys, _, _) in evals.items()}
            rows.append(("teacher", os.fspath(store), train_rows, evals_rows))
        else:
            self.skipped["text-em teacher"] = "no --teacher-store: the teacher's row is left out"
        for enc in self.encoders:
            eval_emb = {s: self.split(enc, s).text[: len(keys)].numpy() for s, (keys, _, _) in evals.items()}
            rows.append((enc.label, enc.path, text_features(enc, train_caps).numpy(), eval_emb))
        runs: dict[tuple[str, str], list[dict]] = {}
        training: dict[str, list[float]] = {}
        for seed in range(self.s.seeds):
            rec = Reconstructor(tok, train_caps, em, seed=seed, progress=self.s.progress, device=self.device)
            training.setdefault("T5", []).append(rec.train_autoencoder()["seconds"])
            for name, _, train_emb, eval_emb in rows:
                adapter = None
                if train_emb is not None:
                    adapter, info = rec.train_adapter(train_emb, name)
                    training.setdefault(name, []).append(info["seconds"])
                for split, (_, caps, tags) in evals.items():
                    if adapter is None:
                        pred = rec.reconstruct(captions=caps)
                    else:
                        pred = rec.reconstruct(embeddings=eval_emb[split], adapter=adapter)
                    runs.setdefault((name, split), []).append(score(pred, caps, tags))
        for name, pretrained, _, _ in rows:
            for split in evals:
                metrics = aggregate_seeds(runs[(name, split)])
                self.records.append(_record(TASK, self.dataset(split), name, pretrained, metrics, split=split,
                                            samples=metrics["captions"], train_captions=len(train_caps),
                                            train_seconds=round(float(np.mean(training[name])), 2),
                                            failures=runs[(name, split)][0]["failures"]))  # fmt: skip
        self._time("text-em", t0)

    def _train_captions(self, limit: int) -> tuple[list[str], list[str]]:
        """(keys, captions) of a seeded sample of `limit` training captions (all where limit is 0), in key order;
        read from the shards' text alone."""
        from kclip.teacher.captions import caption_source, iter_captions

        pairs = sorted(iter_captions(caption_source(self.root / self.s.train_split)))
        if not pairs:
            raise EvalError(f"{self.root / self.s.train_split}: no captions to train the reconstruction probe on")
        pick = _seeded_subset(len(pairs), limit)
        return [pairs[i][0] for i in pick], [pairs[i][1] for i in pick]

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        for task in TASKS:
            if task in self.s.tasks:
                getattr(self, task.replace("-", "_"))()
        self.seconds["total"] = time.perf_counter() - t0
        return {
            "records": self.records,
            "skipped": self.skipped,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "checkpoints": [e.describe() for e in self.encoders],
            "data": None if self.root is None else str(self.root),
            "device": str(self.device),
            "settings": {
                k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                for k, v in dataclasses.asdict(self.s).items()
            },  # fmt: skip
        }


def parse_list(text: str) -> tuple[str, ...]:
    """ "a, b,,c" -> ("a", "b", "c")."""
    return tuple(x for x in (p.strip() for p in text.split(",")) if x)


def parse_attribute_data(text: str) -> tuple[tuple[str, str], ...]:
    """ "awa2:/data/AwA2,cub:/data/CUB" -> (("awa2", "/data/AwA2"), ("cub", "/data/CUB")); EvalError names a bad
    item."""
    out = []
    for item in parse_list(text):
        name, sep, folder = item.partition(":")
        if not sep or not folder:
            raise EvalError(f"--attribute-data {item}: expected NAME:FOLDER, e.g. awa2:/data/AwA2")
        out.append((name.lower(), folder))
    return tuple(out)


def settings_from_args(args: Any) -> EvalSettings:
    """EvalSettings from `kclip eval`'s parsed flags (or any object with those attributes: `kclip run` passes
    its config's eval section)."""
    tasks = tuple(args.task) or (parse_list(args.tasks) if args.tasks else TASKS)
    em = EMConfig(autoencoder_steps=args.autoencoder_steps, adapter_steps=args.adapter_steps,
                  max_train=args.max_train_captions, max_eval=args.max_eval_captions)  # fmt: skip
    return EvalSettings(
        tasks=tasks,
        splits=parse_list(args.splits),
        train_split=args.train_split,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        seeds=args.seeds,
        teacher_store=args.teacher_store,
        tokenizer=args.tokenizer,
        attribute_data=parse_attribute_data(args.attribute_data) if args.attribute_data else (),
        probe_max_train=args.probe_max_train,
        em=em,
        progress=not args.no_progress,
    )


def evaluate(checkpoints: list[str], data: str | None, out: str | os.PathLike, settings: EvalSettings) -> dict:
    """Run `kclip eval` and write its outputs under `out` (kclip.eval.report). Returns the summary."""
    from kclip.eval.report import write_reports

    summary = Evaluation(checkpoints, data, settings).run()
    summary["outputs"] = write_reports(summary, Path(out))
    return summary
