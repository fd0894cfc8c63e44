"""Caltech-UCSD Birds-200-2011 (CUB) in its distributed layout::

    ROOT/                              (CUB_200_2011/)
      images/<class folder>/<file>.jpg
      images.txt                       "<image_id> <class folder>/<file>.jpg"
      classes.txt                      "<class_id> <class folder>"   (200 classes, e.g. 001.Black_footed_Albatross)
      image_class_labels.txt           "<image_id> <class_id>"
      train_test_split.txt             "<image_id> <is_training_image>"
      attributes/image_attribute_labels.txt
                                       "<image_id> <attribute_id> <is_present> <certainty_id> <time>"
      attributes.txt                   "<attribute_id> <name>" (312); the archive puts it beside ROOT, some
                                       copies in ROOT or ROOT/attributes: all three are looked in

A few lines of image_attribute_labels.txt carry extra fields; only the first four are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kclip.data.attributes import AttributeData, class_attribute_shares, read_id_names, require_dir
from kclip.data.shards import DataError


def _id_column(path: Path, n: int) -> np.ndarray:
    """Second column of "<image_id> <value>" lines, ordered by image id 1..n."""
    pairs = read_id_names(path)
    ids = np.array([i for i, _ in pairs])
    if sorted(ids.tolist()) != list(range(1, n + 1)):
        raise DataError(f"{path}: image ids are not 1..{n} as in images.txt")
    out = np.empty(n, dtype=np.int64)
    out[ids - 1] = [int(v) for _, v in pairs]
    return out


def _attributes_file(root: Path) -> Path:
    for candidate in (root / "attributes.txt", root / "attributes" / "attributes.txt", root.parent / "attributes.txt"):
        if candidate.is_file():
            return candidate
    raise DataError(f"attributes.txt: not found in {root}, {root / 'attributes'} or {root.parent}")


def read_cub(root: str | os.PathLike) -> AttributeData:
    """Read CUB's labels, per-image attributes and split; decodes no image.

    Raises:
        DataError: a missing file, or files that disagree (ids, class folders).
    """
    root = require_dir(os.fspath(root), "CUB-200-2011", "images.txt")
    images = read_id_names(root / "images.txt")
    n = len(images)
    if [i for i, _ in images] != list(range(1, n + 1)):
        raise DataError(f"{root / 'images.txt'}: image ids are not 1..{n} in order")
    classes = [name for _, name in read_id_names(root / "classes.txt")]
    labels = _id_column(root / "image_class_labels.txt", n) - 1
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(classes):
        raise DataError(f"{root / 'image_class_labels.txt'}: class ids outside 1..{len(classes)}")
    is_train = _id_column(root / "train_test_split.txt", n).astype(bool)
    names = [name for _, name in read_id_names(_attributes_file(root))]
    a = len(names)
    labels_path = root / "attributes" / "image_attribute_labels.txt"
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: missing")
    attributes = np.zeros((n, a), dtype=np.uint8)
    certainty = np.zeros((n, a), dtype=np.uint8)
    with open(labels_path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                img, att, present, cert = int(fields[0]), int(fields[1]), int(fields[2]), int(fields[3])
            except (IndexError, ValueError) as e:
                want = "'<image> <attribute> <present> <certainty> ...'"
                raise DataError(f"{labels_path}:{lineno}: expected {want}") from e
            if not (1 <= img <= n and 1 <= att <= a):
                raise DataError(f"{labels_path}:{lineno}: image {img} or attribute {att} out of range")
            attributes[img - 1, att - 1] = present
            certainty[img - 1, att - 1] = cert
    class_attributes = class_attribute_shares(labels, attributes, len(classes))
    return AttributeData(
        name="cub",
        root=root,
        paths=[root / "images" / rel for _, rel in images],
        labels=labels,
        class_names=classes,
        attribute_names=names,
        attributes=attributes,
        class_attributes=class_attributes,
        is_train=is_train,
        certainty=certainty,
    )
