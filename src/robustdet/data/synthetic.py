"""The built-in synthetic detection dataset: generated from a seed, cached on disk, in COCO format.

Each image has a textured, low-saturation background with distractor strokes and 1-8 objects of
``num_classes`` classes. Class ``c`` is shape ``SHAPES[c % 6]`` drawn in hue band ``c`` of ``num_classes``
(random saturation and brightness within it): classes differ by shape and by hue. (Version 1 told up to
six classes apart by shape alone, which at 8-16 px leaves a ring, an ellipse and a cross a few pixels
apart; the hue makes every class identifiable at every size: a linear probe on the centre pixel's
colour alone names the class of 98 % of the objects.)
Object extents are log-uniform from 8 px to half the image, so every RetinaNet level P3-P7 sees
objects. Objects may overlap partially (never more than half of either box). Boxes are the tight
pixel extent of the drawn shape (amodal: an object partly covered by a later one keeps its full box).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, PrivateAttr

from robustdet.data.coco import load_coco
from robustdet.data.schema import annotation_record
from robustdet.data.source import SourceSection
from robustdet.errors import DatasetError
from robustdet.section import Section

# Bump whenever the generator's output changes, so old caches are not mistaken for new ones.
VERSION = 2
SHAPES: tuple[str, ...] = ("rectangle", "ellipse", "triangle", "ring", "cross", "star")
SPLITS: tuple[str, ...] = ("train", "val")
MIN_OBJECT = 8  # px, the smallest extent drawn (the longer side of the box)
MAX_OBJECTS = 8
# Overlap allowed between two objects: enough to teach occlusion, never enough to hide one.
MAX_IOU = 0.3
MAX_COVERED = 0.5
MIN_CONTRAST = 50.0  # luma difference between an object and the background under it


class SyntheticConfig(Section):
    """``data.synthetic``: the built-in shapes, generated once per setting into a cache folder."""

    num_classes: int = Field(5, ge=1)
    image_size: int = Field(128, ge=32)
    num_train: int = Field(2000, ge=1)
    num_val: int = Field(200, ge=1)
    seed: int = 0
    # None: $ROBUSTDET_CACHE or ~/.cache/robustdet/synthetic
    cache_dir: str | None = None


class SyntheticSource(SourceSection):
    """``format: synthetic`` (the default): ``split`` train or val of ``data.synthetic``."""

    format: Literal["synthetic"] = "synthetic"
    # What to generate. Written once for train and val as ``data.synthetic`` (both splits are one dataset),
    # so not a key of this section: the data section hands it over when it loads the split
    # (``data.config.load_sources``); a source alone has the defaults.
    _settings: SyntheticConfig = PrivateAttr(default_factory=SyntheticConfig)

    @property
    def settings(self) -> SyntheticConfig:
        return self._settings

    def with_settings(self, settings: SyntheticConfig) -> SyntheticSource:
        """This source generating the dataset ``settings`` describe."""
        source = self.model_copy()
        source._settings = settings
        return source

    def load(self, split: str, cache_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
        return load_synthetic(self._settings, split)


def cache_base(cfg: SyntheticConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("ROBUSTDET_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "robustdet") / "synthetic"


def dataset_key(cfg: SyntheticConfig) -> str:
    """Names the cache folder: everything that changes the generated files, and nothing else."""
    spec = {
        "num_classes": cfg.num_classes,
        "image_size": cfg.image_size,
        "num_train": cfg.num_train,
        "num_val": cfg.num_val,
        "seed": cfg.seed,
        "version": VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def class_names(num_classes: int) -> list[str]:
    families = math.ceil(num_classes / len(SHAPES))
    if families == 1:
        return list(SHAPES[:num_classes])
    return [f"{SHAPES[c % len(SHAPES)]}_hue{c // len(SHAPES)}" for c in range(num_classes)]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(60, 190) + rng.uniform(-20, 20, size=3)
    cells = int(rng.integers(3, 9))
    # low-frequency blotches: a coarse random grid upsampled smoothly
    coarse = rng.normal(0.0, 22.0, size=(cells, cells, 3)).astype(np.float32)
    blotches = np.stack(
        [np.asarray(Image.fromarray(coarse[..., k]).resize((size, size), Image.BICUBIC)) for k in range(3)],
        axis=-1,
    )
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gradient = rng.uniform(0, 30) * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None])
    # fine texture (fixed per image, unlike the final sensor noise)
    grain = rng.normal(0.0, rng.uniform(3, 10), size=(size, size, 1)).astype(np.float32)
    return np.clip(base + blotches + gradient[..., None] + grain, 0, 255).astype(np.float32)


def _strokes(rng: np.random.Generator, image: Image.Image, size: int) -> None:
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        width = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            points = [
                tuple(float(v) for v in rng.uniform(0, size, size=2)) for _ in range(int(rng.integers(2, 5)))
            ]
            draw.line(points, fill=colour, width=width, joint="curve")
        else:
            x, y = rng.uniform(-0.2 * size, size, size=2)
            r = rng.uniform(0.1, 0.6) * size
            start = float(rng.uniform(0, 360))
            draw.arc(
                [x, y, x + r, y + r], start, start + float(rng.uniform(40, 200)), fill=colour, width=width
            )


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = w - 1, h - 1
    if shape == "rectangle":
        draw.rectangle([0, 0, x1, y1], fill=255)
    elif shape == "ellipse":
        draw.ellipse([0, 0, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(x1 / 2, 0), (0, y1), (x1, y1)], fill=255)
    elif shape == "ring":
        t = max(2.0, 0.22 * min(w, h))
        draw.ellipse([0, 0, x1, y1], fill=255)
        draw.ellipse([t, t, x1 - t, y1 - t], fill=0)
    elif shape == "cross":
        tx, ty = max(2.0, 0.3 * w), max(2.0, 0.3 * h)
        draw.rectangle([(x1 - tx) / 2, 0, (x1 + tx) / 2, y1], fill=255)
        draw.rectangle([0, (y1 - ty) / 2, x1, (y1 + ty) / 2], fill=255)
    elif shape == "star":
        cx, cy = x1 / 2, y1 / 2
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * cx * math.cos(a), cy + radius * cy * math.sin(a)))
        draw.polygon(points, fill=255)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    return np.asarray(mask) > 0


def _colour(rng: np.random.Generator, family: int, families: int, background_luma: float) -> np.ndarray:
    # each family keeps to the middle 70% of its hue band, so photometric hue jitter cannot swap them
    lo = (family + 0.15) / families
    width = 0.7 / families
    rgb = np.zeros(3)
    for _ in range(20):
        hue = (lo + width * rng.random()) % 1.0
        rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.3, 1.0))) * 255
        if abs(float(_luma(rgb)) - background_luma) >= MIN_CONTRAST:
            return rgb
    # fall back to the extreme value away from the background
    value = 0.2 if background_luma > 128 else 1.0
    return np.array(colorsys.hsv_to_rgb(lo + width / 2, 0.8, value)) * 255


def _too_close(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = box
    for px, py, pw, ph in placed:
        iw = min(x + w, px + pw) - max(x, px)
        ih = min(y + h, py + ph) - max(y, py)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        if inter / (w * h + pw * ph - inter) > MAX_IOU or inter > MAX_COVERED * min(w * h, pw * ph):
            return True
    return False


def render_image(rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, list[Any]]:
    """One image (uint8 [size, size, 3]) and its objects [(class, [x, y, w, h])], from ``rng`` alone."""
    background = _background(rng, size)
    canvas = Image.fromarray(background.astype(np.uint8))
    _strokes(rng, canvas, size)
    image = np.asarray(canvas).astype(np.float32)
    max_extent = size / 2
    objects: list[Any] = []
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        cls = int(rng.integers(num_classes))
        extent = math.exp(rng.uniform(math.log(MIN_OBJECT), math.log(max_extent)))
        ratio = rng.uniform(0.6, 1.0)
        long_side, short_side = max(MIN_OBJECT, round(extent)), max(6, round(extent * ratio))
        w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        for _attempt in range(20):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if not _too_close((x, y, w, h), placed):
                break
        else:
            continue
        mask = _shape_mask(SHAPES[cls % len(SHAPES)], w, h)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        region = image[y : y + h, x : x + w]
        colour = _colour(rng, cls, num_classes, float(_luma(region[mask]).mean()))
        # a mild shading across the object, so that it is not one flat colour
        shade = 1.0 + rng.uniform(-0.12, 0.12) * np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        region[mask] = np.clip(colour[None, :] * np.broadcast_to(shade, (h, w))[mask][:, None], 0, 255)
        placed.append((x, y, w, h))
        box = [
            float(x + cols[0]),
            float(y + rows[0]),
            float(cols[-1] - cols[0] + 1),
            float(rows[-1] - rows[0] + 1),
        ]
        objects.append((cls, box))
    noise = rng.normal(0.0, rng.uniform(1.5, 5.0), size=image.shape)
    return np.clip(image + noise, 0, 255).round().astype(np.uint8), objects


def _generate_split(cfg: SyntheticConfig, split: str, count: int, folder: Path) -> dict[str, Any]:
    image_dir = folder / "images" / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    split_code = SPLITS.index(split)
    for index in range(count):
        # one independent stream per image: the output does not depend on generation order
        rng = np.random.default_rng([cfg.seed % 2**64, split_code, index])
        pixels, objects = render_image(rng, cfg.image_size, cfg.num_classes)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, compress_level=1)
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size}
        )
        for cls, box in objects:
            annotations.append(annotation_record(len(annotations) + 1, image_id, cls, box, 0))
    return {
        "info": {
            "description": f"robustdet synthetic v{VERSION}",
            "config": cfg.model_dump(exclude={"cache_dir"}),
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c + 1, "name": n, "supercategory": "shape"}
            for c, n in enumerate(class_names(cfg.num_classes))
        ],
    }


def ensure_synthetic(cfg: SyntheticConfig) -> Path:
    """The folder of the dataset ``cfg`` describes, generated first if it is not cached yet.

    The folder appears by one rename of a complete temporary folder, so a generation that is killed
    leaves at most a ``.tmp-*`` folder behind, never a half dataset; processes generating the same
    dataset at once (e.g. all ranks of a torchrun) each finish and the first rename wins.
    """
    base = cache_base(cfg)
    final = base / f"synthetic-{dataset_key(cfg)}"
    if final.is_dir():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=base))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
            data = _generate_split(cfg, split, count, tmp)
            (tmp / f"{split}.json").write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_synthetic(cfg: SyntheticConfig, split: str) -> tuple[dict[str, Any], Path]:
    if split not in SPLITS:
        raise DatasetError(f"data.synthetic: split must be one of {SPLITS}, got {split!r}")
    root = ensure_synthetic(cfg)
    return load_coco(root / f"{split}.json", root / "images" / split)
