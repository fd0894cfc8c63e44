"""Image sets labelled with classes and binary attributes, for the attribute probes of evaluation (AWA2, CUB and
kclip's synthetic set)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from kclip.data.shards import DataError


@dataclasses.dataclass
class AttributeData:
    """An evaluation image set with class labels and binary attributes.

    Attributes:
        name: "awa2", "cub" or "synth".
        root: the dataset's folder.
        paths: image files, [N]; where `keys` is set, the tar shard holding each image (the synthetic set).
        labels: int64 [N], 0-based class of each image.
        class_names: [C], in label order (as the dataset's classes.txt spells them).
        attribute_names: [A], in attribute order.
        attributes: uint8 [N, A], 1 where the image has the attribute (AWA2: its class's row of the binary matrix).
        class_attributes: float32 [C, A], the class-level attribute matrix (AWA2: binary; CUB and the synthetic set:
            share of the class's images labelled with the attribute, 0 for a class without images).
        is_train: bool [N], the dataset's proposed split (AWA2: its train classes; CUB: train_test_split.txt; the
            synthetic set: whether the split read is "train"), None where the files are absent.
        certainty: uint8 [N, A], CUB's certainty of each label (1 not visible ... 4 definitely), None for the others.
        keys: [N], the sample key of each image inside its tar shard (the synthetic set, sorted), None for image
            files.
    """

    name: str
    root: Path
    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    attribute_names: list[str]
    attributes: np.ndarray
    class_attributes: np.ndarray
    is_train: np.ndarray | None = None
    certainty: np.ndarray | None = None
    keys: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask: np.ndarray) -> AttributeData:
        """The images where mask [N] is true."""
        idx = np.flatnonzero(mask)
        pick = lambda a: None if a is None else a[idx]
        return dataclasses.replace(
            self,
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            attributes=self.attributes[idx],
            is_train=pick(self.is_train),
            certainty=pick(self.certainty),
            keys=None if self.keys is None else [self.keys[i] for i in idx],
        )

    def loader(self, cfg=None, batch_size: int = 64, num_workers: int = 0):
        """DataLoader of the images in row order with the deterministic evaluation transform (kclip.data.loader).

        Batches: {"image": float32 [B, 3, S, S], "index": int64 [B] (rows of this set), "bad": [(row, reason)] of
        the images that do not load}. Image files are read as they are; where `keys` is set, each image is read
        from its tar shard at the offset its index (or a scan of the tar's headers) gives.

        Raises:
            DataError: a shard that holds no image for its key.
        """
        from kclip.data.loader import image_list_loader, image_spans
        from kclip.data.transforms import TransformConfig

        spans = None if self.keys is None else image_spans(self.paths, self.keys)
        return image_list_loader(self.paths, cfg or TransformConfig(), batch_size, num_workers, spans=spans)


def class_attribute_shares(labels: np.ndarray, attributes: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [C, A]: the share of each class's images with each attribute (0 for a class without images); C is
    num_classes, or more where a label is beyond it."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float32)
    shares = np.zeros((len(counts), attributes.shape[1]), dtype=np.float32)
    np.add.at(shares, labels, attributes.astype(np.float32))
    return shares / np.maximum(counts, 1)[:, None]


def read_id_names(path: Path) -> list[tuple[int, str]]:
    """Lines "<id> <name>" (tab or spaces, leading blanks allowed) -> [(id, name)]."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path}:{n}: expected '<id> <name>', got {line!r}")
        out.append((int(parts[0]), parts[1].strip()))
    return out


def require_dir(root: str, what: str, marker: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such directory ({what})")
    if not (path / marker).exists():
        raise DataError(f"{path}: not the {what} layout (no {marker})")
    return path
