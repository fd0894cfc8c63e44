"""Animals with Attributes 2 (AWA2) in its distributed layout::

    ROOT/                         (Animals_with_Attributes2/)
      JPEGImages/<class>/<class>_<n>.jpg
      classes.txt                 "<id>\t<class>", 1-based ids, 50 classes (names with '+' for spaces)
      predicates.txt              "<id>\t<predicate>", 85 attributes
      predicate-matrix-binary.txt 50 rows of 85 space-separated 0/1, classes x predicates
      trainclasses.txt, testclasses.txt  (optional) the proposed zero-shot split, one class name a line

Attributes are per class: each image gets its class's row.
"""

from __future__ import annotations

import os

import numpy as np

from kclip.data.attributes import AttributeData, read_id_names, require_dir
from kclip.data.shards import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_awa2(root: str | os.PathLike) -> AttributeData:
    """Read AWA2's labels and list its images (sorted by class, then file name); decodes no image.

    Raises:
        DataError: a missing file, or files that disagree (matrix shape, unknown class folders).
    """
    root = require_dir(os.fspath(root), "AWA2", "predicate-matrix-binary.txt")
    classes = [name for _, name in read_id_names(root / "classes.txt")]
    predicates = [name for _, name in read_id_names(root / "predicates.txt")]
    matrix_path = root / "predicate-matrix-binary.txt"
    matrix = np.loadtxt(matrix_path, dtype=np.int64, ndmin=2)
    if matrix.shape != (len(classes), len(predicates)):
        raise DataError(
            f"{matrix_path}: shape {matrix.shape}, expected (classes, predicates) = ({len(classes)}, {len(predicates)})"
        )
    if not np.isin(matrix, (0, 1)).all():
        raise DataError(f"{matrix_path}: values other than 0 and 1")
    images = root / "JPEGImages"
    if not images.is_dir():
        raise DataError(f"{images}: missing (AWA2 images, one folder per class)")
    paths, labels = [], []
    for c, name in enumerate(classes):
        folder = images / name
        if not folder.is_dir():
            raise DataError(f"{folder}: missing (class {c + 1} of classes.txt)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [c] * len(files)
    labels_arr = np.asarray(labels, dtype=np.int64)
    is_train = None
    train_file, test_file = root / "trainclasses.txt", root / "testclasses.txt"
    if train_file.is_file() and test_file.is_file():
        train = {line.strip() for line in train_file.read_text().splitlines() if line.strip()}
        unknown = train - set(classes)
        if unknown:
            raise DataError(f"{train_file}: classes not in classes.txt: {sorted(unknown)}")
        is_train = np.isin(labels_arr, [classes.index(c) for c in train])
    return AttributeData(
        name="awa2",
        root=root,
        paths=paths,
        labels=labels_arr,
        class_names=classes,
        attribute_names=predicates,
        attributes=matrix.astype(np.uint8)[labels_arr],
        class_attributes=matrix.astype(np.float32),
        is_train=is_train,
    )
