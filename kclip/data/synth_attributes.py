"""One split of kclip's synthetic set (`kclip data synth`) as an attribute-labelled image set, as AWA2 and CUB are
read (kclip.data.attributes), so that evaluation treats the three alike.

Labels, attributes and keys come from each sample's ``.json``; attribute names from the root's ``attributes.txt``,
class names from `kclip.data.synth.class_names`. The images stay inside the tar shards: `AttributeData.loader` reads
them at their offsets (the shards' DALI indexes where fresh, else a scan of their tar headers).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from kclip.data.attributes import AttributeData, class_attribute_shares, read_id_names, require_dir
from kclip.data.loader import META_EXT, ShardRows, sample_metadata, shard_sources
from kclip.data.shards import DataError, RawSample, dataset_splits, resolve_shards
from kclip.data.synth import class_names

log = logging.getLogger(__name__)


def read_synth(root: str | os.PathLike, split: str) -> AttributeData:
    """Read the labels and attribute vectors of one split of a synthetic dataset root; decodes no image.

    Args:
        root: the folder `kclip data synth` wrote (dataset.json, attributes.txt, one folder per split).
        split: "train", "heldout" or "compositional".

    Returns:
        AttributeData(name="synth") with one row per sample in key order: `paths` the tar shard of each image and
        `keys` its sample key; `class_attributes` the share of each class's images with each attribute (as CUB's);
        `is_train` true throughout for the train split, false for the others.

    Raises:
        DataError: not a synthetic dataset root, a split it does not have (the message lists those it has), or a
            sample whose .json lacks its label or attributes or disagrees with attributes.txt.
    """
    root = require_dir(os.fspath(root), "kclip synthetic dataset", "attributes.txt")
    splits = dataset_splits(root)
    if split not in splits:
        have = f"its splits: {', '.join(splits)}" if splits else "it has no split with shards"
        raise DataError(f"{root}: no split {split!r} ({have})")
    attribute_names = [name for _, name in read_id_names(root / "attributes.txt")]
    classes = class_names()
    rows = ShardRows.build(shard_sources(resolve_shards(root / split)))
    if rows.problems:
        log.warning("%s: %d unreadable samples left out", root / split, len(rows.problems))
    usable = [r for r in range(len(rows)) if r not in rows.problems]
    order = sorted(usable, key=lambda r: rows.keys[r])
    labels = np.empty(len(order), dtype=np.int64)
    attributes = np.empty((len(order), len(attribute_names)), dtype=np.uint8)
    for i, sample in enumerate(rows.read(order, image=False)):
        meta = _sample_meta(sample, rows.shards[rows.shard[order[i]]], split, len(classes), len(attribute_names))
        labels[i], attributes[i] = meta["label"], meta["attributes"]
    class_attributes = class_attribute_shares(labels, attributes, len(classes))
    return AttributeData(
        name="synth",
        root=root,
        paths=[Path(rows.shards[rows.shard[r]]) for r in order],
        labels=labels,
        class_names=classes,
        attribute_names=attribute_names,
        attributes=attributes,
        class_attributes=class_attributes,
        is_train=np.full(len(order), split == "train"),
        keys=[rows.keys[r].decode() for r in order],
    )


def _sample_meta(sample: RawSample, shard: str, split: str, num_classes: int, num_attributes: int) -> dict:
    """A sample's label and attributes from its .json, checked against the dataset's classes and attributes."""
    where = f"{shard}: sample {sample.key}"
    if META_EXT not in sample.data:
        raise DataError(f"{where}: no .json (not a `kclip data synth` sample)")
    meta, why = sample_metadata(sample.data[META_EXT])
    if why is not None:
        raise DataError(f"{where}: {why}")
    if not 0 <= meta.get("label", -1) < num_classes:
        raise DataError(f"{where}: label {meta.get('label')!r} is not a class index in [0, {num_classes})")
    if len(meta.get("attributes", ())) != num_attributes:
        raise DataError(f"{where}: not {num_attributes} attributes, as attributes.txt names them")
    if meta.get("split") != split:
        raise DataError(f"{where}: its .json says split {meta.get('split')!r}, it lies in the {split!r} folder")
    return meta
