"""The embedded default dataset: procedurally drawn scenes of coloured shapes with compositional captions.

Each scene holds one or two *groups* of identical objects (same shape, colour, size and texture), one to four
objects in all. Group A, the *main* group, gives the class label (its colour and shape); when a group B is present,
A stands in one of four spatial relations to B (every A object lies wholly left of / right of / above / below every
B object). Captions come from several templates over a small grammar (saved as ``vocab.json``) and carry
phenomenon tags: ``count``, ``size``, ``texture``, ``colour_binding`` (two colour-shape bindings in one caption) and
``relation``. Each image also gets a binary attribute vector (names in ``attributes.txt``, as AWA2 ships its
predicates).

Splits: ``train`` and ``heldout`` draw from the same distribution, in which no object ever has one of the
HELD_OUT_PAIRS (colour, shape); in ``compositional`` the main group always has one of those pairs, so a model must
compose a colour and a shape it has seen only apart.

Output (img2dataset's webdataset layout)::

    DIR/dataset.json           seed, counts, image size, held-out pairs, class and attribute names
    DIR/attributes.txt         "1\tcolour_red" ... one attribute per line, in vector order
    DIR/classes.txt            "1\tred circle" ... class id (1-based in the file, 0-based in labels) and name
    DIR/vocab.json             the caption grammar: words, templates, relation phrases (see Grammar)
    DIR/<split>/SSSSS.tar      samples KKKKKKKKK.jpg / .txt / .json, key = shard * 10**4 + index (9 digits)
    DIR/<split>/SSSSS_stats.json

Shard numbers continue across splits (train from 0, heldout from 10000, compositional from 20000), so keys are
unique over the whole dataset. Every sample is drawn from its own generator seeded with (seed, split, index): the
tar files are byte-identical for a seed whatever the number of worker processes (only the timing fields of the
``_stats.json`` files change between runs).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from kclip._atomic import atomic_write_text
from kclip.data.shards import DataError, ShardWriter, cpu_count, process_context

log = logging.getLogger(__name__)

FORMAT = "kclip.synth"
VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross")
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 35),
    "green": (40, 160, 65),
    "blue": (40, 80, 215),
    "purple": (135, 55, 180),
    "pink": (245, 125, 185),
    "brown": (120, 75, 40),
}
# Object radius as a share of the image side.
SIZES: dict[str, float] = {"small": 0.085, "large": 0.15}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient", "checker")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
# Relation of group A to group B: caption phrase and the inverse relation (B to A).
RELATIONS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
INVERSE: dict[str, str] = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
# (colour, shape) pairs that never occur in train/heldout and always form the main group in compositional: one per
# colour and every shape at least once, so each word alone is still seen in training.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("orange", "hexagon"),
    ("yellow", "cross"),
    ("green", "triangle"),
    ("blue", "diamond"),
    ("purple", "triangle"),
    ("pink", "circle"),
    ("brown", "square"),
)
SPLITS: dict[str, int] = {"train": 0, "heldout": 1, "compositional": 2}
# First shard number of each split: keys stay unique over the dataset (shard * 10**4 + index, 9 digits).
SHARD_BASE: dict[str, int] = {"train": 0, "heldout": 10000, "compositional": 20000}
KEY_SAMPLES_PER_SHARD = 10**4  # img2dataset's key layout with --number_sample_per_shard up to 10000

# Caption templates. {A}, {B}: noun phrases of groups A and B; {rel}: A's relation to B; {inv}: B's relation to A;
# {be}: "is" / "are" agreeing with A.
TEMPLATES_ONE: tuple[str, ...] = ("{A}", "a photo of {A}", "there {be} {A}", "an image of {A}")
TEMPLATES_TWO: tuple[str, ...] = (
    "{A} {rel} {B}",
    "a photo of {A} {rel} {B}",
    "there {be} {A} {rel} {B}",
    "{B} {inv} {A}",
    "{A} and {B}",
)
SIZE_WORD_P = 0.5  # share of noun phrases that state the size
TEXTURE_WORD_P = 0.5  # share of noun phrases of a striped / dotted group that state the texture
TWO_GROUPS_P = 0.65


def attribute_names() -> list[str]:
    """Names of the binary attribute vector, in order: colour_*, shape_*, size_*, texture_* (any object has it),
    count_* (the main group's size), relation_* (the main group's relation to the other group), then
    <colour>_<shape> for every pair (any object has it)."""
    return (
        [f"colour_{c}" for c in COLOURS]
        + [f"shape_{s}" for s in SHAPES]
        + [f"size_{z}" for z in SIZES]
        + [f"texture_{t}" for t in TEXTURES]
        + [f"count_{w}" for w in COUNT_WORDS.values()]
        + [f"relation_{r}" for r in RELATIONS]
        + [f"{c}_{s}" for c in COLOURS for s in SHAPES]
    )


def class_names() -> list[str]:
    """Class label i is the main group's (colour, shape): i = colour_index * len(SHAPES) + shape_index."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def class_index(colour: str, shape: str) -> int:
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


# ---- the grammar ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NounPhrase:
    """One group as a caption states it: count, optional size and texture, colour, shape."""

    count: int
    colour: str
    shape: str
    size: str | None = None
    texture: str | None = None


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    phrases: tuple[NounPhrase, ...]  # in caption order
    relation: str | None  # relation of phrases[0] to phrases[1], when stated


class Grammar:
    """The caption language: vocabulary, templates, and a parser back to noun phrases and relations.

    Saved as vocab.json by `synth`; `Grammar.load(path)` rebuilds it, so evaluation can build a word-level
    tokenizer (`words`) and tests can check captions against attribute vectors.
    """

    def __init__(self, spec: dict[str, Any] | None = None):
        spec = spec or grammar_spec()
        self.spec = spec
        self.colours: list[str] = spec["colours"]
        self.shapes: list[str] = spec["shapes"]
        self.plurals: dict[str, str] = spec["plurals"]
        self.sizes: list[str] = spec["sizes"]
        self.textures: list[str] = spec["textures"]
        self.counts: dict[str, int] = spec["count_words"]
        self.relations: dict[str, str] = spec["relations"]
        self.words: list[str] = spec["words"]
        shape_words = {**{s: s for s in self.shapes}, **{p: s for s, p in self.plurals.items()}}
        self._shape_of = shape_words
        alt = lambda words: "|".join(sorted(map(re.escape, words), key=len, reverse=True))
        self._np = re.compile(
            rf"\b(?P<count>{alt(self.counts)}) (?:(?P<size>{alt(self.sizes)}) )?(?:(?P<texture>{alt(self.textures)}) )?"
            rf"(?P<colour>{alt(self.colours)}) (?P<shape>{alt(shape_words)})\b"
        )
        self._rel = re.compile(rf"\b(?:{alt(self.relations.values())})\b")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Grammar:
        """Read a grammar saved as vocab.json (a dataset folder or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        return cls(json.loads(path.read_text()))

    def parse(self, caption: str) -> ParsedCaption:
        """Noun phrases (count, size, texture, colour, shape) and the stated relation of the first to the second."""
        phrases = tuple(
            NounPhrase(
                count=self.counts[m["count"]],
                colour=m["colour"],
                shape=self._shape_of[m["shape"]],
                size=m["size"],
                texture=m["texture"],
            )
            for m in self._np.finditer(caption)
        )
        rel = self._rel.search(caption)
        relation = None
        if rel is not None:
            relation = next(k for k, v in self.relations.items() if v == rel.group(0))
        return ParsedCaption(phrases, relation)


def grammar_spec() -> dict[str, Any]:
    """The caption grammar as saved in vocab.json."""
    count_words = {"a": 1, "an": 1, **{w: n for n, w in COUNT_WORDS.items()}}
    templates = {"one_group": list(TEMPLATES_ONE), "two_groups": list(TEMPLATES_TWO)}
    words: set[str] = set(count_words) | set(COLOURS) | set(SHAPES) | set(PLURALS.values()) | set(SIZES)
    words |= {t for t in TEXTURES if t != "solid"} | {"is", "are"}
    for phrase in RELATIONS.values():
        words |= set(phrase.split())
    for t in TEMPLATES_ONE + TEMPLATES_TWO:
        words |= {w for w in t.split() if not w.startswith("{")}
    return {
        "format": "kclip.synth.grammar",
        "version": VERSION,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "plurals": PLURALS,
        "sizes": list(SIZES),
        "textures": [t for t in TEXTURES if t != "solid"],  # solid is never stated
        "count_words": count_words,
        "relations": RELATIONS,
        "inverse_relations": INVERSE,
        "templates": templates,
        "noun_phrase": "<count> [<size>] [<texture>] <colour> <shape | plural>",
        "words": sorted(words),
    }


# ---- scenes -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    shape: str
    colour: str
    size: str
    texture: str
    count: int


@dataclasses.dataclass
class Scene:
    groups: list[Group]  # groups[0] is the main group A
    relation: str | None  # A's relation to B
    background: str
    background_rgb: tuple[int, int, int]
    objects: list[dict[str, Any]]  # drawn objects: group, x, y, r (pixels), angle


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _draw_group(rng: np.random.Generator, count: int, banned: set[tuple[str, str]], avoid: tuple | None) -> Group:
    while True:
        colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
        if (colour, shape) not in banned and (colour, shape) != avoid:
            return Group(shape, colour, _pick(rng, list(SIZES)), _pick(rng, TEXTURES), count)


def _place(
    rng: np.random.Generator, radii: list[float], box: tuple[float, float, float, float], placed: list[tuple]
) -> list[tuple[float, float]] | None:
    """Centres for circles of `radii` inside box (x0, y0, x1, y1), not overlapping each other or `placed`."""
    out: list[tuple[float, float]] = []
    others = list(placed)
    for r in radii:
        x0, y0, x1, y1 = box[0] + r, box[1] + r, box[2] - r, box[3] - r
        if x0 > x1 or y0 > y1:
            return None
        for _ in range(40):
            x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
            if all((x - ox) ** 2 + (y - oy) ** 2 > (r + orr + 2) ** 2 for ox, oy, orr in others):
                out.append((x, y))
                others.append((x, y, r))
                break
        else:
            return None
    return out


def draw_scene(rng: np.random.Generator, split: str, size: int) -> Scene:
    """Draw a scene of `split` (see the module docstring) for a square image of `size` pixels."""
    held = set(HELD_OUT_PAIRS)
    while True:
        two = rng.random() < TWO_GROUPS_P
        count_a = int(rng.integers(1, 4 if two else 5))
        if split == "compositional":
            colour, shape = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]
            a = Group(shape, colour, _pick(rng, list(SIZES)), _pick(rng, TEXTURES), count_a)
        else:
            a = _draw_group(rng, count_a, held, None)
        groups = [a]
        relation = None
        if two:
            count_b = int(rng.integers(1, min(2, 4 - count_a) + 1))
            groups.append(_draw_group(rng, count_b, held, (a.colour, a.shape)))
            relation = _pick(rng, list(RELATIONS))
        objects = _layout(rng, groups, relation, size)
        if objects is not None:
            break
    kind = _pick(rng, BACKGROUNDS)
    grey = int(rng.integers(95, 215))
    tint = rng.integers(-14, 15, size=3)
    bg = tuple(int(v) for v in np.clip(grey + tint, 0, 255))
    return Scene(groups, relation, kind, bg, objects)


def _layout(rng: np.random.Generator, groups: list[Group], relation: str | None, size: int) -> list[dict] | None:
    margin = 0.03 * size
    full = (margin, margin, size - margin, size - margin)
    if relation is None:
        boxes = [full]
    else:
        # A and B get the two sides of a split line; a gap keeps every A wholly on its side of every B.
        cut, gap = rng.uniform(0.42, 0.58) * size, 0.02 * size
        first, second = (full[0], full[1], cut - gap, full[3]), (cut + gap, full[1], full[2], full[3])
        if relation in ("above", "below"):
            first, second = (full[0], full[1], full[2], cut - gap), (full[0], cut + gap, full[2], full[3])
        boxes = [first, second] if relation in ("left_of", "above") else [second, first]
    objects: list[dict] = []
    placed: list[tuple] = []
    for gi, (group, box) in enumerate(zip(groups, boxes, strict=True)):
        radii = [SIZES[group.size] * size * rng.uniform(0.9, 1.1) for _ in range(group.count)]
        centres = _place(rng, radii, box, placed)
        if centres is None:
            return None
        for (x, y), r in zip(centres, radii, strict=True):
            placed.append((x, y, r))
            objects.append({"group": gi, "x": x, "y": y, "r": r, "angle": float(rng.uniform(-0.25, 0.25))})
    return objects


def _noun_phrase(rng: np.random.Generator, g: Group) -> tuple[str, set[str]]:
    words, tags = [], set()
    if g.count == 1:
        words.append("one" if rng.random() < 0.15 else "a")
    else:
        words.append(COUNT_WORDS[g.count])
    if words[0] == "one" or g.count > 1:
        tags.add("count")
    if rng.random() < SIZE_WORD_P:
        words.append(g.size)
        tags.add("size")
    if g.texture != "solid" and rng.random() < TEXTURE_WORD_P:
        words.append(g.texture)
        tags.add("texture")
    words += [g.colour, g.shape if g.count == 1 else PLURALS[g.shape]]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words), tags


def caption_scene(rng: np.random.Generator, scene: Scene) -> tuple[str, list[str], str]:
    """(caption, phenomenon tags, template) of a scene."""
    a, tags = _noun_phrase(rng, scene.groups[0])
    fields = {"A": a, "be": "is" if scene.groups[0].count == 1 else "are"}
    if len(scene.groups) == 1:
        template = _pick(rng, TEMPLATES_ONE)
    else:
        b, tags_b = _noun_phrase(rng, scene.groups[1])
        tags |= tags_b | {"colour_binding"}
        template = _pick(rng, TEMPLATES_TWO)
        fields.update(B=b, rel=RELATIONS[scene.relation], inv=RELATIONS[INVERSE[scene.relation]])
        if "{rel}" in template or "{inv}" in template:
            tags.add("relation")
    return template.format(**fields), sorted(tags), template


def attribute_vector(scene: Scene) -> np.ndarray:
    """uint8 [len(attribute_names())] of a scene."""
    names = attribute_names()
    index = {n: i for i, n in enumerate(names)}
    vec = np.zeros(len(names), np.uint8)
    for g in scene.groups:
        for name in (f"colour_{g.colour}", f"shape_{g.shape}", f"size_{g.size}", f"texture_{g.texture}"):
            vec[index[name]] = 1
        vec[index[f"{g.colour}_{g.shape}"]] = 1
    vec[index[f"count_{COUNT_WORDS[scene.groups[0].count]}"]] = 1
    if scene.relation is not None:
        vec[index[f"relation_{scene.relation}"]] = 1
    return vec


# ---- rendering --------------------------------------------------------------------------------------------------


def _polygon(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (
                x + radius * math.cos(phase + angle + 2 * math.pi * k / n),
                y + radius * math.sin(phase + angle + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape == "square":
        return ring(4, r, math.pi / 4)
    if shape == "triangle":
        return ring(3, r * 1.1, -math.pi / 2)
    if shape == "diamond":
        return [(x, y - r * 1.15), (x + r * 0.75, y), (x, y + r * 1.15), (x - r * 0.75, y)]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r * 1.15, -math.pi / 2), ring(5, r * 0.48, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        w = r * 0.36
        pts = [
            (w, r),
            (w, w),
            (r, w),
            (r, -w),
            (w, -w),
            (w, -r),
            (-w, -r),
            (-w, -w),
            (-r, -w),
            (-r, w),
            (-w, w),
            (-w, r),
        ]
        c, s = math.cos(angle), math.sin(angle)
        return [(x + px * c - py * s, y + px * s + py * c) for px, py in pts]
    return None  # circle


def _background(rng: np.random.Generator, scene: Scene, size: int) -> np.ndarray:
    base = np.asarray(scene.background_rgb, np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if scene.background == "noise":
        img += 7.0 * rng.standard_normal((size, size, 1), dtype=np.float32)
    elif scene.background == "gradient":
        ramp = np.linspace(-22.0, 22.0, size, dtype=np.float32)
        img += (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])[..., None]
    elif scene.background == "checker":
        cell = int(rng.integers(size // 16, size // 6))
        yy, xx = np.indices((size, size))
        img += np.where(((yy // cell + xx // cell) % 2)[..., None] == 0, 9.0, -9.0).astype(np.float32)
    return img


def render_scene(rng: np.random.Generator, scene: Scene, size: int) -> np.ndarray:
    """uint8 [size, size, 3] image of a scene."""
    from PIL import Image, ImageDraw

    img = _background(rng, scene, size)
    for obj in scene.objects:
        g = scene.groups[obj["group"]]
        r = obj["r"]
        # Draw the shape's mask on a small patch around the object, then fill it with its colour and texture.
        x0, y0 = max(0, int(obj["x"] - 1.3 * r)), max(0, int(obj["y"] - 1.3 * r))
        x1, y1 = min(size, int(obj["x"] + 1.3 * r) + 2), min(size, int(obj["y"] + 1.3 * r) + 2)
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = obj["x"] - x0, obj["y"] - y0
        poly = _polygon(g.shape, cx, cy, r, obj["angle"])
        if poly is None:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        else:
            draw.polygon(poly, fill=255)
        m = np.asarray(mask) > 127
        colour = np.asarray(COLOURS[g.colour], np.float32)
        fill = np.broadcast_to(colour, m.shape + (3,)).copy()
        yy, xx = np.indices(m.shape)
        if g.texture == "striped":
            period = max(4, int(r / 2.5))
            stripe = ((xx + yy) // (period // 2)) % 2 == 0
            fill[stripe] *= 0.55
        elif g.texture == "dotted":
            period = max(5, int(r / 2.2))
            dots = ((xx % period) - period // 2) ** 2 + ((yy % period) - period // 2) ** 2 <= (period // 4) ** 2
            fill[dots] = fill[dots] * 0.4 + 255 * 0.6
        patch = img[y0:y1, x0:x1]
        patch[m] = fill[m]
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


# ---- samples and shards -----------------------------------------------------------------------------------------


def make_sample(seed: int, split: str, index: int, image_size: int, jpeg_quality: int = 90) -> dict[str, Any]:
    """One sample of a split, a pure function of (seed, split, index): {"jpg": bytes, "txt": str, "meta": dict}."""
    from PIL import Image

    rng = np.random.default_rng([seed, SPLITS[split], index])
    scene = draw_scene(rng, split, image_size)
    caption, tags, template = caption_scene(rng, scene)
    pixels = render_scene(rng, scene, image_size)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=jpeg_quality)
    jpg = buf.getvalue()
    a = scene.groups[0]
    meta = {
        "split": split,
        "label": class_index(a.colour, a.shape),
        "class_name": f"{a.colour} {a.shape}",
        "tags": tags,
        "template": template,
        "attributes": attribute_vector(scene).tolist(),
        "relation": scene.relation,
        "groups": [dataclasses.asdict(g) for g in scene.groups],
        "objects": [{k: round(v, 2) if isinstance(v, float) else v for k, v in o.items()} for o in scene.objects],
        "background": scene.background,
    }
    return {"jpg": jpg, "txt": caption, "meta": meta}


def _write_shard(args: tuple) -> dict[str, Any]:
    out_dir, split, shard, first, count, seed, image_size = args
    start = time.time()
    path = Path(out_dir) / f"{shard:05d}.tar"
    with ShardWriter(path) as writer:
        for i in range(count):
            s = make_sample(seed, split, first + i, image_size)
            key = f"{shard * KEY_SAMPLES_PER_SHARD + i:09d}"
            record = {
                "url": f"kclip-synth://{seed}/{split}/{first + i}",
                "key": key,
                "status": "success",
                "error_message": None,
                "width": image_size,
                "height": image_size,
                "original_width": image_size,
                "original_height": image_size,
                "exif": None,
                "sha256": hashlib.sha256(s["jpg"]).hexdigest(),
                "caption": s["txt"],
                **s["meta"],
            }
            writer.write(key, {"jpg": s["jpg"], "txt": s["txt"].encode(), "json": json.dumps(record).encode()})
    end = time.time()
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": end - start,
        "start_time": start,
        "end_time": end,
        "status_dict": {"success": count},
    }
    atomic_write_text(Path(out_dir) / f"{shard:05d}_stats.json", json.dumps(stats, indent=4))
    return {"split": split, "shard": shard, "count": count}


_SHARD_FILE = re.compile(r"\d{5}(\.tar|_stats\.json|\.idx|_index\.json)")


def _clear_previous(split_dir: Path) -> None:
    """Remove the shards, stats and indexes of an earlier run, so that none of its shards outlives this one (a run
    with fewer samples) and no index of an overwritten shard remains."""
    for p in split_dir.iterdir():
        if _SHARD_FILE.fullmatch(p.name):
            p.unlink()


# The command-line flag of each split's sample count: errors name the flag a user typed.
_COUNT_FLAGS: dict[str, str] = {
    "train": "--num-samples",
    "heldout": "--num-heldout",
    "compositional": "--num-compositional",
}
MIN_IMAGE_SIZE = 32
MAX_SHARDS_PER_SPLIT = 10000  # shard numbers of a split stay below the next split's SHARD_BASE


def _check_args(counts: dict[str, int], *, seed: int, image_size: int, shard_size: int, workers: int | None) -> None:
    """Refuse out-of-range arguments of `synth` before any file is touched: an error found in the third split must
    not leave the first two cleared."""
    if not 1 <= shard_size <= KEY_SAMPLES_PER_SHARD:
        raise DataError(
            f"--shard-size {shard_size}: must be in [1, {KEY_SAMPLES_PER_SHARD}] samples per shard "
            f"(img2dataset's 9-digit keys hold at most {KEY_SAMPLES_PER_SHARD} per shard)"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"--image-size {image_size}: must be at least {MIN_IMAGE_SIZE} pixels")
    if seed < 0:
        raise DataError(f"--seed {seed}: must be >= 0")
    if workers is not None and workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1 (leave it out to use every usable CPU core)")
    for split, n in counts.items():
        if n < 0:
            raise DataError(f"{_COUNT_FLAGS[split]} {n}: the {split} split's sample count must be >= 0")
        if n > MAX_SHARDS_PER_SPLIT * shard_size:
            raise DataError(
                f"{_COUNT_FLAGS[split]} {n}: needs more than {MAX_SHARDS_PER_SPLIT} shards of --shard-size "
                f"{shard_size} (at most {MAX_SHARDS_PER_SPLIT * shard_size} samples); raise --shard-size"
            )


def synth(
    out: str | os.PathLike,
    num_samples: int = 20000,
    *,
    num_heldout: int | None = None,
    num_compositional: int | None = None,
    seed: int = 0,
    image_size: int = 128,
    shard_size: int = 1000,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the synthetic compositional dataset to `out` (layout in the module docstring).

    Args:
        out: output folder (created; the shards, stats and indexes of an earlier run there are removed first).
        num_samples: training samples.
        num_heldout, num_compositional: samples of the held-out and compositional splits (default num_samples / 10).
        seed: the dataset is a pure function of the seed and the sizes.
        image_size: side of the square JPEG images, pixels.
        shard_size: samples per tar shard (at most 10000: img2dataset's 9-digit key layout).
        workers: processes, at least 1 (default: the CPU cores this process may use).
        progress: show a tqdm bar over shards.

    Returns:
        the dataset.json record.

    Raises:
        DataError: an argument out of its range, named by its command-line flag; raised before anything is
            written or removed.
    """
    from tqdm.auto import tqdm

    default_eval = max(1, num_samples // 10)
    counts = {
        "train": num_samples,
        "heldout": default_eval if num_heldout is None else num_heldout,
        "compositional": default_eval if num_compositional is None else num_compositional,
    }
    _check_args(counts, seed=seed, image_size=image_size, shard_size=shard_size, workers=workers)
    out = Path(out)
    tasks = []
    for split, n in counts.items():
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        for j, first in enumerate(range(0, n, shard_size)):
            tasks.append(
                (str(split_dir), split, SHARD_BASE[split] + j, first, min(shard_size, n - first), seed, image_size)
            )
        _clear_previous(split_dir)
    workers = max(1, min(workers or cpu_count(), len(tasks) or 1))
    t0 = time.perf_counter()
    bar = tqdm(total=sum(counts.values()), unit="img", desc="synth", disable=not progress)
    if workers == 1:
        for task in tasks:
            bar.update(_write_shard(task)["count"])
    else:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=process_context()) as pool:
            for done in pool.map(_write_shard, tasks):
                bar.update(done["count"])
    bar.close()
    record = {
        "format": FORMAT,
        "version": VERSION,
        "seed": seed,
        "image_size": image_size,
        "shard_size": shard_size,
        "counts": counts,
        "splits": {s: f"{s}/" for s in counts},
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "classes": class_names(),
        "attributes": attribute_names(),
        "tags": ["colour_binding", "count", "relation", "size", "texture"],
    }
    atomic_write_text(out / "attributes.txt", "".join(f"{i + 1}\t{n}\n" for i, n in enumerate(attribute_names())))
    atomic_write_text(out / "classes.txt", "".join(f"{i + 1}\t{n}\n" for i, n in enumerate(class_names())))
    atomic_write_text(out / "vocab.json", json.dumps(grammar_spec(), indent=1))
    atomic_write_text(out / "dataset.json", json.dumps(record, indent=1))
    log.info(
        "synth: %d samples in %.1f s with %d workers -> %s",
        sum(counts.values()),
        time.perf_counter() - t0,
        workers,
        out,
    )
    return record
