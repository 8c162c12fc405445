"""``DetectionDataset``: one class over the COCO dict that every format is turned into."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from robustdet.data.config import FORMATS, AugmentConfig, DataConfig, load_sources, parse_source
from robustdet.data.headers import cache_file, read_headers
from robustdet.data.merge import as_sources
from robustdet.data.noise import apply_source_noise
from robustdet.data.schema import ErrorList, coco_api, validate_coco
from robustdet.data.source import SourceSection
from robustdet.errors import DatasetError
from robustdet.files import write_json_atomic

Target = dict[str, Any]
Key = int | tuple[int, int]

# Boxes may stick out of the image by this much (float rounding in exported labels, e.g. x + w =
# 640.0001) before out_of_image="error" calls them wrong; they are clipped either way.
OUT_OF_IMAGE_TOLERANCE = 0.5  # px

# A training dataset with skip_corrupt replaces an image that fails to decode by the next one in index
# order; this many failures in a row mean something is broken beyond single files.
MAX_CORRUPT_IN_A_ROW = 16


@dataclass(frozen=True)
class SplitUse:
    """What ``build_dataset`` does to a split: one explicit choice each (``TRAINING``, ``EVALUATION``).

    ``audit`` builds its split as ``replace(TRAINING, augment=False, skip_empty=False, skip_corrupt=False)``:
    the training split with its noisy labels, without augmentation, every image, stopping at an unreadable one.
    """

    # the split a source without ``split`` reads ("train" or "val")
    default_split: str
    # apply the source's label_noise; False refuses a source that has one (such a split is for training)
    label_noise: bool
    # data.augment (flip, photometric, scale jitter); False: the images and boxes as annotated
    augment: bool
    # honour data.empty_images=skip (evaluation sees every image)
    skip_empty: bool
    # replace an image that fails to decode by the next one and report it (else: a DatasetError naming it)
    skip_corrupt: bool


TRAINING = SplitUse("train", label_noise=True, augment=True, skip_empty=True, skip_corrupt=True)
EVALUATION = SplitUse("val", label_noise=False, augment=False, skip_empty=False, skip_corrupt=False)


def split_use(train: bool | SplitUse) -> SplitUse:
    """``build_dataset``'s ``train``: True and False are the two presets, a ``SplitUse`` is itself."""
    if isinstance(train, SplitUse):
        return train
    return TRAINING if train else EVALUATION


def _sanitized_with_ids(inputs: Any) -> Any:
    """What ``SanitizeBoundingBoxes`` drops together with the boxes: the labels and the annotation ids,
    so that a box removed by a crop takes its id with it (a module-level function: workers pickle it)."""
    target = inputs[1] if isinstance(inputs, tuple | list) and len(inputs) > 1 else inputs
    if "annotation_ids" in target:
        return target["labels"], target["annotation_ids"]
    return target["labels"]


class ScaleJitter(v2.Transform):
    """Zoom by a log-uniform factor in ``scale_range``, then crop or zero-pad back to the input size.

    Unlike ``v2.ScaleJitter`` (a resize only, which the detector's own resize would undo), this
    changes the object sizes relative to the canvas: < 1 zooms out (the image lands at a random place
    on a black canvas), > 1 zooms in (a random crop). The output keeps the input size.
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        self.log_range = (math.log(scale_range[0]), math.log(scale_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.log_range
        scale = math.exp(lo + (hi - lo) * float(torch.rand(())))
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        # the crop window's corner in the resized image: negative values pad (zoom-out)
        top = int(torch.randint(min(0, new_h - height), max(0, new_h - height) + 1, ()))
        left = int(torch.randint(min(0, new_w - width), max(0, new_w - width) + 1, ()))
        return {"size": [new_h, new_w], "top": top, "left": left, "height": height, "width": width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        resized = self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)
        # crop pads images with zeros and clamps boxes where the window leaves the resized image
        return self._call_kernel(
            F.crop,
            resized,
            top=params["top"],
            left=params["left"],
            height=params["height"],
            width=params["width"],
        )


def build_transform(augment: AugmentConfig) -> v2.Transform:
    steps: list[Callable[..., Any]] = []
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if augment.photometric:
        steps.append(v2.RandomPhotometricDistort(p=0.5))
    if augment.scale_range is not None:
        lo, hi = augment.scale_range
        if not 0 < lo <= hi:
            raise DatasetError(
                f"data.augment.scale_range must be (low, high) with 0 < low <= high, got {lo, hi}"
            )
        steps.append(ScaleJitter((lo, hi)))
    # drops boxes that a crop cut away or squeezed below a pixel, with their labels and annotation ids
    steps.append(v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_sanitized_with_ids))
    return v2.Compose(steps)


def _decode_with_pil(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def _decoder_message(exc: BaseException) -> str:
    """The decoder's own words, without torchvision's C++ source location prefix."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^[\w:<>~()]+, \S+:\d+, ", "", text)


def read_image(path: str) -> torch.Tensor:
    """uint8 [3, H, W] RGB, EXIF orientation applied; DatasetError naming the file when undecodable."""
    try:
        image = decode_image(path, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as first:
        # torchvision.io decodes JPEG/PNG/WEBP/GIF; BMP and TIFF, which YOLO datasets allow, need PIL
        try:
            image = _decode_with_pil(path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise DatasetError(f"{path}: cannot decode the image ({_decoder_message(first)})") from None
    if image.dim() != 3 or image.shape[0] != 3:
        # e.g. an animated GIF decodes to [frames, 3, H, W]
        raise DatasetError(
            f"{path}: decoded to shape {tuple(image.shape)}, expected one RGB image [3, H, W] "
            "(an animated image? save its first frame as a still image)"
        )
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def verify_image_headers(dataset: DetectionDataset, cache_dir: str | Path | None = None) -> None:
    """Read each image's header: non-image files, animated GIFs (they decode to several frames) and
    sizes other than the annotated ones are reported together, naming the files, before training starts.

    The headers are read on rank 0 only, in threads, and cached in ``cache_dir`` (see data/headers.py),
    so a resume re-reads only the files that changed.
    """
    errors = ErrorList()
    paths = [dataset.image_path(index) for index in range(len(dataset))]
    cache = cache_file(cache_dir, dataset.source, str(dataset.image_root))
    for index, (path, header) in enumerate(zip(paths, read_headers(paths, cache), strict=True)):
        if isinstance(header, str):
            errors.add(f"{dataset.source}: {header}")
            continue
        width, height, frames = header
        if frames > 1:
            errors.add(f"{dataset.source}: {path}: an animated GIF with {frames} frames, expected a still image")
            continue
        annotated = dataset.annotated_size(index)
        if (height, width) != annotated:
            swapped = " (width and height swapped: EXIF orientation?)" if (width, height) == annotated else ""
            errors.add(
                f"{dataset.source}: {path}: the image is {width}x{height} but annotated as "
                f"{annotated[1]}x{annotated[0]}{swapped}"
            )
    errors.raise_if_any()


class DetectionDataset(Dataset[tuple[tv_tensors.Image, Target]]):
    """Images and boxes of a COCO-format dict; see docs/data.md.

    Labels are contiguous 0..C-1 in order of sorted category id; ``category_ids[label]`` maps back.
    Crowd (and VOC difficult) boxes are kept in ``coco`` for evaluation but never in the targets.
    ``out_of_image`` is applied at construction, to the targets and to ``coco`` alike, so training and
    evaluation see the same boxes; with ``empty_images="skip"`` a training dataset leaves out images
    without a non-crowd box (``coco`` still lists them). ``train`` turns both augmentation and that skip
    on; ``augmented`` and ``skip_empty`` set either alone (None: as ``train``).
    """

    # what data.train.label_noise changed (set by build_dataset; the trainer writes it to label_noise.json)
    label_noise: dict[str, Any] | None = None

    def __init__(
        self,
        coco_dict: dict[str, Any],
        image_root: str | Path,
        *,
        train: bool = False,
        augment: AugmentConfig | None = None,
        empty_images: Literal["keep", "skip"] = "keep",
        out_of_image: Literal["clip", "error"] = "clip",
        source: str = "dataset",
        validate: bool = True,
        skip_corrupt: bool = False,
        augmented: bool | None = None,
        skip_empty: bool | None = None,
    ) -> None:
        self.image_root = Path(image_root)
        self.train = train
        self.source = source
        # replace an image that fails to decode by the next readable one, and say so in the target's
        # "skipped" list of (path, reason), instead of raising (training only: see __getitem__)
        self.skip_corrupt = skip_corrupt
        data = validate_coco(coco_dict, source, self.image_root) if validate else coco_dict
        data = self._apply_out_of_image(data, out_of_image)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.classes: list[str] = [c["name"] for c in categories]
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}

        per_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            if not ann["iscrowd"]:
                per_image[ann["image_id"]].append(ann)

        # flat arrays instead of a list of per-image tensors: cheap to fork into workers and to pickle
        root = str(self.image_root)
        self.image_ids: list[int] = []
        self._files: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        offsets, boxes, labels, ann_ids = [0], [], [], []
        for img in data["images"]:
            anns = per_image[img["id"]]
            if (train if skip_empty is None else skip_empty) and empty_images == "skip" and not anns:
                continue
            self.image_ids.append(img["id"])
            self._files.append(f"{root}/{img['file_name']}")
            self._sizes.append((int(img["height"]), int(img["width"])))
            for ann in anns:
                x, y, w, h = ann["bbox"]
                boxes.append((x, y, x + w, y + h))
                labels.append(label_of[ann["category_id"]])
                ann_ids.append(ann["id"])
            offsets.append(len(boxes))
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self._labels = np.asarray(labels, dtype=np.int64)
        self._ann_ids = np.asarray(ann_ids, dtype=np.int64)
        self.coco = coco_api(data)
        augmented = train if augmented is None else augmented
        self.transform = build_transform(augment or AugmentConfig()) if augmented else None

    def _apply_out_of_image(self, data: dict[str, Any], policy: str) -> dict[str, Any]:
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        names = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = []
        for i, ann in enumerate(data["annotations"]):
            width, height = sizes[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                where = (
                    f"{self.source}: annotations[{i}] (id {ann['id']}, image {names[ann['image_id']]!r} "
                    f"{width}x{height})"
                )
                if x2 <= x1 or y2 <= y1:
                    raise DatasetError(f"{where}: box [x, y, w, h] = {ann['bbox']} lies outside the image")
                beyond = max(-x, -y, x + w - width, y + h - height)
                if policy == "error" and beyond > OUT_OF_IMAGE_TOLERANCE:
                    raise DatasetError(
                        f"{where}: box [x, y, w, h] = {ann['bbox']} sticks out of the image by "
                        f"{beyond:.1f} px (data.out_of_image=clip would clip it)"
                    )
                ann = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1]}
            annotations.append(ann)
        return {**data, "annotations": annotations}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> str:
        return self._files[index]

    def annotated_size(self, index: int) -> tuple[int, int]:
        """(height, width) as the annotation gives it."""
        return self._sizes[index]

    def target(self, index: int, canvas_size: tuple[int, int] | None = None) -> Target:
        """The un-augmented target of ``index``, without reading the image.

        ``annotation_ids[j]`` is the COCO annotation id of box ``j`` (augmentation drops it with its box);
        the detectors read ``boxes`` and ``labels`` only.
        """
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        boxes = torch.from_numpy(self._boxes[lo:hi].copy())
        return {
            "boxes": tv_tensors.BoundingBoxes(
                boxes, format="XYXY", canvas_size=canvas_size or self._sizes[index]
            ),
            "labels": torch.from_numpy(self._labels[lo:hi].copy()),
            "annotation_ids": torch.from_numpy(self._ann_ids[lo:hi].copy()),
            "image_id": self.image_ids[index],
        }

    def _read(self, index: int) -> torch.Tensor:
        path = self._files[index]
        image = read_image(path)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        if size != self._sizes[index]:
            hint = (
                " (width and height swapped: EXIF orientation?)" if size == self._sizes[index][::-1] else ""
            )
            raise DatasetError(
                f"{path}: decoded size {size[1]}x{size[0]} differs from the annotated "
                f"{self._sizes[index][1]}x{self._sizes[index][0]}{hint}"
            )
        return image

    def _read_or_substitute(self, index: int) -> tuple[int, torch.Tensor, list[tuple[str, str]]]:
        """(index actually read, its image, the corrupt images passed over as (path, reason)).

        The substitute is the next index (cyclically) that decodes: a function of the files alone, so a
        resumed run replaces exactly as the uninterrupted one did, in any worker process.
        """
        skipped: list[tuple[str, str]] = []
        for step in range(min(len(self), MAX_CORRUPT_IN_A_ROW)):
            current = (index + step) % len(self)
            try:
                return current, self._read(current), skipped
            except DatasetError as exc:
                if not self.skip_corrupt:
                    raise
                skipped.append((self._files[current], str(exc)))
        raise DatasetError(
            f"{self.source}: {len(skipped)} images in a row failed to decode, from {skipped[0][0]} on: "
            f"{skipped[0][1]}"
        )

    def __getitem__(self, key: Key) -> tuple[tv_tensors.Image, Target]:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        index, image, skipped = self._read_or_substitute(index)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        target = self.target(index, size)
        if skipped:
            target["skipped"] = skipped
        sample = (tv_tensors.Image(image), target)
        if self.transform is None:
            return sample
        if sample_seed is None:  # a plain index: the caller's RNG decides, as in torchvision
            return self.transform(sample)
        # the seed alone decides the augmentation, whatever process runs it, and the caller's RNG
        # stream continues as if nothing happened (needed for bitwise-exact resume)
        with torch.random.fork_rng(devices=[]):
            # default_generator only: torch.manual_seed would also reseed (or queue a reseed of) CUDA
            torch.default_generator.manual_seed(sample_seed)
            return self.transform(sample)


def build_dataset(
    source: SourceSection | Sequence[SourceSection],
    data_cfg: DataConfig,
    train: bool | SplitUse,
    cache_dir: str | Path | None = None,
) -> DetectionDataset:
    """Load ``source`` with the loader of its format and wrap it.

    ``train``: what is done to the split (``SplitUse``): True is ``TRAINING`` (label noise, augmentation,
    data.empty_images, corrupt images skipped), False is ``EVALUATION`` (none of them). A list of sources
    is one split merged from them (data/merge.py). ``cache_dir`` holds the image-header cache (None:
    ``$ROBUSTDET_CACHE/headers`` or ``~/.cache/robustdet/headers``; see data/headers.py).
    """
    use = split_use(train)
    sources = as_sources(source)
    data, image_root, name = load_sources(sources, data_cfg, use.default_split == "train", cache_dir)
    # the sources of a list agree on label_noise (DataConfig checks it): applied once, to the merged split
    data, noise_report = apply_source_noise(data, sources[0].label_noise, name, use.label_noise)
    dataset = DetectionDataset(
        data,
        image_root,
        train=use.default_split == "train",
        augmented=use.augment,
        skip_empty=use.skip_empty,
        augment=data_cfg.augment,
        empty_images=data_cfg.empty_images,
        out_of_image=data_cfg.out_of_image,
        source=name,
        validate=False,  # the loader just did
        # training skips (and the trainer reports) images that fail to decode, up to
        # data.max_corrupt_images; evaluation needs every image and stops naming the file
        skip_corrupt=use.skip_corrupt,
    )
    dataset.label_noise = noise_report
    # yolo took its sizes from the headers; the synthetic images are generated here
    if data_cfg.verify_images and any(s.verify_headers for s in sources):
        verify_image_headers(dataset, cache_dir)
    return dataset


def convert_to_coco(fmt: str, path: str | Path, split: str, out_json: str | Path) -> Path:
    """Write a YOLO or VOC split as a COCO json (atomically); returns the image root it refers to.

    The json's ``file_name``s are relative to that root: load it with
    ``load_coco(out_json, image_root)`` or ``format: coco, path: out_json, image_root: <root>``.
    """
    if fmt not in FORMATS or fmt in ("synthetic", "coco"):
        raise DatasetError(f"convert: the input format must be yolo or voc, got {fmt!r}")
    source = parse_source({"format": fmt, "path": str(path), "split": split})
    data, image_root = source.load(split)
    write_json_atomic(out_json, data, indent=None)
    return image_root
