"""open_clip-style CSV data: one row per image-caption pair (``--csv-img-key filepath --csv-caption-key title``,
tab-separated by default, a header row naming the columns).

Rows are streamed, never held all at once. Relative image paths are resolved against `root`, by default the
folder of the CSV file (open_clip resolves them against the working directory: pass ``root="."`` for that). A
row's sample key is its key column when one is named, else its 0-based row number as 9 digits.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from kclip.data.shards import DataError

CSV_SUFFIXES: tuple[str, ...] = (".csv", ".tsv")


@dataclasses.dataclass(frozen=True)
class CsvSpec:
    """Where a CSV's columns are. Attributes mirror open_clip's flags: img_key (--csv-img-key, "filepath"),
    caption_key (--csv-caption-key, "title"), sep (--csv-separator, a tab); key_column names the sample key
    (None: the row number); root resolves relative image paths (None: the CSV's folder)."""

    img_key: str = "filepath"
    caption_key: str = "title"
    sep: str = "\t"
    key_column: str | None = None
    root: str | None = None


@dataclasses.dataclass(frozen=True)
class CsvRow:
    row: int  # 0-based, header excluded
    key: str
    image: Path
    caption: str


def _open_checked(path: Path, spec: CsvSpec):
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    f = open(path, newline="", encoding="utf-8")
    reader = csv.DictReader(f, delimiter=spec.sep)
    fields = reader.fieldnames or []
    wanted = [spec.img_key, spec.caption_key] + ([spec.key_column] if spec.key_column else [])
    missing = [c for c in wanted if c not in fields]
    if missing:
        f.close()
        sep = "tab" if spec.sep == "\t" else repr(spec.sep)
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))} in the header {fields!r} (separator {sep}); "
            "set the image / caption columns and the separator (--csv-img-key, --csv-caption-key, --csv-sep)"
        )
    return f, reader


def check_csv(path: str | os.PathLike, spec: CsvSpec | None = None) -> None:
    """Raise DataError now if the CSV is missing or lacks its columns (before any training starts)."""
    f, _ = _open_checked(Path(path), spec or CsvSpec())
    f.close()


def iter_csv(path: str | os.PathLike, spec: CsvSpec | None = None) -> Iterator[CsvRow]:
    """Rows of an open_clip-style CSV file, in file order (see the module docstring)."""
    path, spec = Path(path), spec or CsvSpec()
    root = Path(spec.root) if spec.root is not None else path.parent
    f, reader = _open_checked(path, spec)
    with f:
        for i, row in enumerate(reader):
            image = Path(row[spec.img_key] or "")
            if not image.is_absolute():
                image = root / image
            key = row[spec.key_column] if spec.key_column else f"{i:09d}"
            yield CsvRow(i, key, image, (row[spec.caption_key] or "").strip())
