"""AWA2 and CUB-200-2011 readers on small fixtures laid out as the distributed archives are."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from kclip.data import DataError, read_awa2, read_cub
from kclip.data.transforms import TransformConfig


def _jpeg(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    path.write_bytes(buf.getvalue())


AWA2_CLASSES = ["antelope", "grizzly+bear", "killer+whale"]
AWA2_PREDICATES = ["black", "white", "blue", "stripes"]
AWA2_MATRIX = [[0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


@pytest.fixture
def awa2(tmp_path):
    """Animals_with_Attributes2/ as unzipped from AwA2-data.zip (tab-separated, right-aligned ids)."""
    root = tmp_path / "Animals_with_Attributes2"
    root.mkdir()
    (root / "classes.txt").write_text("".join(f"{i + 1:6d}\t{c}\n" for i, c in enumerate(AWA2_CLASSES)))
    (root / "predicates.txt").write_text("".join(f"{i + 1:6d}\t{p}\n" for i, p in enumerate(AWA2_PREDICATES)))
    (root / "predicate-matrix-binary.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in AWA2_MATRIX))
    (root / "trainclasses.txt").write_text("antelope\nkiller+whale\n")
    (root / "testclasses.txt").write_text("grizzly+bear\n")
    for c, name in enumerate(AWA2_CLASSES):
        for n in range(2 + c):
            _jpeg(root / "JPEGImages" / name / f"{name}_{10001 + n}.jpg", (60 * c, 100, 50))
    return root


def test_awa2_reader(awa2):
    data = read_awa2(awa2)
    assert data.class_names == AWA2_CLASSES and data.attribute_names == AWA2_PREDICATES
    assert len(data) == 2 + 3 + 4
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert data.paths[2].name == "grizzly+bear_10001.jpg"
    np.testing.assert_array_equal(data.attributes, np.asarray(AWA2_MATRIX)[data.labels])
    assert data.is_train.tolist() == [True, True, False, False, False, True, True, True, True]
    test = data.subset(~data.is_train)
    assert len(test) == 3 and set(test.labels.tolist()) == {1}
    batch = next(iter(data.loader(TransformConfig(image_size=32), batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["index"].tolist() == [0, 1, 2, 3]


def test_awa2_reader_rejects_a_broken_layout(awa2, tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        read_awa2(tmp_path / "nope")
    (awa2 / "predicate-matrix-binary.txt").write_text("0 1\n1 0\n")
    with pytest.raises(DataError, match="shape"):
        read_awa2(awa2)


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
CUB_ATTRIBUTES = ["has_bill_shape::curved_(up_or_down)", "has_bill_shape::dagger", "has_wing_color::blue"]


@pytest.fixture
def cub(tmp_path):
    """CUB_200_2011/ as extracted from CUB_200_2011.tgz, attributes.txt beside it (where the archive puts it)."""
    root = tmp_path / "CUB_200_2011"
    images = [
        (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, 0),
        (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 1, 1),
        (3, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 2, 1),
    ]
    for _, rel, label, _ in images:
        _jpeg(root / "images" / rel, (40 * label, 80, 120))
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in images))
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CUB_CLASSES)))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in images))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in images))
    present = {(1, 2), (2, 2), (2, 3), (3, 1)}
    lines = []
    for i, *_ in images:
        for a in range(1, 4):
            extra = " 0" if (i, a) == (2, 1) else ""  # a few real lines carry an extra field
            lines.append(f"{i} {a} {int((i, a) in present)} {3 if (i, a) in present else 1}{extra} 12.5\n")
    (root / "attributes").mkdir()
    (root / "attributes" / "image_attribute_labels.txt").write_text("".join(lines))
    (tmp_path / "attributes.txt").write_text("".join(f"{i + 1} {a}\n" for i, a in enumerate(CUB_ATTRIBUTES)))
    return root


def test_cub_reader(cub):
    data = read_cub(cub)
    assert data.class_names == CUB_CLASSES and data.attribute_names == CUB_ATTRIBUTES
    assert data.labels.tolist() == [0, 0, 1] and data.is_train.tolist() == [False, True, True]
    assert data.paths[2] == cub / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0002_1027.jpg"
    np.testing.assert_array_equal(data.attributes, [[0, 1, 0], [0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(data.certainty[0], [1, 3, 1])
    np.testing.assert_allclose(data.class_attributes, [[0, 1, 0.5], [1, 0, 0]])
    batch = next(iter(data.loader(TransformConfig(image_size=24), batch_size=8)))
    assert batch["image"].shape == (3, 3, 24, 24) and torch.isfinite(batch["image"]).all()


def test_cub_reader_finds_attributes_txt_and_reports_missing_files(cub):
    (cub.parent / "attributes.txt").rename(cub / "attributes" / "attributes.txt")
    assert read_cub(cub).attribute_names == CUB_ATTRIBUTES
    (cub / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="train_test_split.txt: missing"):
        read_cub(cub)


def test_eval_loader_survives_a_bad_image(cub):
    (cub / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0002_1027.jpg").write_bytes(b"\xff\xd8broken")
    batch = next(iter(read_cub(cub).loader(TransformConfig(image_size=24), batch_size=8)))
    assert batch["index"].tolist() == [0, 1] and [i for i, _ in batch["bad"]] == [2]
