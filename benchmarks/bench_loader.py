"""Images per second of robustdet's training loader against torchvision's reference detection pipeline.

The data: ``--num-images`` (5,000) generated JPEGs of 640x480 (smooth texture plus filled boxes, quality
90, about the bytes per pixel of COCO photos) with COCO-like box counts (1 to 20, mean about 7, extents
log-uniform from 8 px to 60 % of the image), written once as a COCO json into ``--data``.

- ours: ``DetectionDataset`` (torchvision.io decode, horizontal flip with the per-sample seed,
  SanitizeBoundingBoxes) through ``build_train_loader`` (InfiniteBatchSampler);
- reference: ``torchvision.datasets.CocoDetection`` + ``wrap_dataset_for_transforms_v2`` + v2 transforms
  of the same kind (PIL decode, ToImage, RandomHorizontalFlip, SanitizeBoundingBoxes: uint8 images and
  XYXY boxes, as ours) through a shuffling DataLoader, collate ``tuple(zip(*batch))`` as in
  torchvision's references/detection.

Same files, same batch size, same number of images per timed run; runs alternate between the two so
that drift on a shared machine hits both alike; the clock starts when the first batch has arrived
(worker start-up is not throughput). Reported: median images/s over ``--repeats``.

``--headers N`` instead measures the image-header check (robustdet.data.headers.read_headers) on N
small JPEGs: not in robustdet's cache ("uncached") with each of ``--threads``, then a first run that
writes the cache and a cached run. The uncached runs go round-robin over the thread counts (and, with
``--cold``, over the files in the OS page cache or dropped from it first: ``posix_fadvise(DONTNEED)`` on
each file, which needs no root, so each open and read goes to the disk), medians of ``--repeats``.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_loader.py [--workers 0 1 2] [--repeats 3]``
and ``... benchmarks/bench_loader.py --headers 3000``. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from robustdet.config import AugmentConfig
from robustdet.data import DetectionDataset, build_train_loader, load_coco
from robustdet.data.headers import read_headers

WIDTH, HEIGHT = 640, 480


def _image(
    rng: np.random.Generator, width: int, height: int, noise: np.ndarray
) -> tuple[Image.Image, list[list[float]]]:
    coarse = rng.uniform(40, 215, size=(height // 16, width // 16, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    # sensor-like noise, for the JPEG size of a photo; one tile shifted per image is cheap to make
    fine = np.roll(noise, (int(rng.integers(height)), int(rng.integers(width))), axis=(0, 1))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + fine, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(int(np.clip(rng.poisson(6.5), 0, 19)) + 1):
        w, h = (float(np.exp(rng.uniform(np.log(8), np.log(0.6 * s)))) for s in (width, height))
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        draw.rectangle((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        boxes.append([round(x, 2), round(y, 2), round(w, 2), round(h, 2)])
    return image, boxes


def generate(folder: Path, count: int, width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Path:
    """``folder/instances.json`` over ``folder/images/*.jpg``; reused when it already exists."""
    ann_file = folder / "instances.json"
    if ann_file.is_file():
        return ann_file
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 6, size=(height, width, 3)).round().astype(np.int16)
    images, annotations = [], []
    for i in range(count):
        image, boxes = _image(rng, width, height, noise)
        name = f"{i:06d}.jpg"
        image.save(folder / "images" / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for box in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 81)),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    ann_file.write_text(json.dumps(data))
    return ann_file


def reference_collate(batch: list[Any]) -> tuple[Any, ...]:
    return tuple(zip(*batch, strict=True))  # torchvision references/detection/utils.py collate_fn


def ours(ann_file: Path, batch: int, workers: int, count: int) -> Iterable[Any]:
    data, root = load_coco(ann_file, ann_file.parent / "images")
    dataset = DetectionDataset(
        data, root, train=True, augment=AugmentConfig(hflip=True), validate=False, source=str(ann_file)
    )
    return build_train_loader(dataset, batch, seed=0, max_iter=count // batch, num_workers=workers)


def reference(ann_file: Path, batch: int, workers: int, count: int) -> Iterable[Any]:
    transforms = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(0.5), v2.SanitizeBoundingBoxes()])
    dataset = CocoDetection(str(ann_file.parent / "images"), str(ann_file), transforms=transforms)
    dataset = wrap_dataset_for_transforms_v2(dataset, target_keys=("image_id", "boxes", "labels"))
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=reference_collate
    )
    return itertools.islice(loader, count // batch)


def images_per_second(loader: Iterable[Any], batch: int) -> float:
    iterator = iter(loader)
    next(iterator)  # start-up (worker processes, first decode) is not throughput
    start, batches = time.perf_counter(), 0
    for _ in iterator:
        batches += 1
    return batches * batch / (time.perf_counter() - start)


def bench_loader(args: argparse.Namespace) -> None:
    ann_file = generate(Path(args.data), args.num_images)
    n_boxes = len(json.loads(ann_file.read_text())["annotations"])
    per_image = n_boxes / args.num_images
    print(f"{args.num_images} JPEGs {WIDTH}x{HEIGHT}, {per_image:.1f} boxes/image, in {ann_file.parent}")
    print(f"batch {args.batch}, {args.images} images per timed run, {args.repeats} repeats, torch threads 1\n")
    print("| workers | ours img/s | reference img/s | ours / reference |")
    print("|---|---|---|---|")
    for workers in args.workers:
        runs: dict[str, list[float]] = {"ours": [], "reference": []}
        for _ in range(args.repeats):
            for name, build in (("ours", ours), ("reference", reference)):
                loader = build(ann_file, args.batch, workers, args.images)
                runs[name].append(images_per_second(loader, args.batch))
        a, b = statistics.median(runs["ours"]), statistics.median(runs["reference"])
        print(f"| {workers} | {a:.0f} | {b:.0f} | {a / b:.2f} |", flush=True)


def drop_from_page_cache(paths: list[str]) -> None:
    """Evict the files' (clean) pages from the OS page cache, so that the next read goes to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_headers(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ann_file = generate(Path(tmp) / "data", args.headers, width=64, height=48)
        paths = sorted(str(p) for p in (ann_file.parent / "images").iterdir())
        os.sync()  # dirty pages cannot be dropped
        cache = Path(tmp) / "cache" / "headers.json"
        print(f"{len(paths)} JPEGs 64x48\n")
        print("| run | threads | seconds | vs 1 thread |")
        print("|---|---|---|---|")
        cases = [(cold, t) for cold in ((False, True) if args.cold else (False,)) for t in args.threads]
        times: dict[tuple[bool, int], list[float]] = {c: [] for c in cases}
        for r in range(args.repeats):
            for cold, threads in cases[r % len(cases) :] + cases[: r % len(cases)]:
                if cold:
                    drop_from_page_cache(paths)
                start = time.perf_counter()
                read_headers(paths, None, threads=threads)
                times[cold, threads].append(time.perf_counter() - start)
        for cold, threads in cases:
            median = statistics.median(times[cold, threads])
            one = statistics.median(times[cold, 1]) if (cold, 1) in times else math.nan
            where = "files dropped from the page cache" if cold else "files in the page cache"
            print(f"| uncached, {where} | {threads} | {median:.3f} | {median / one:.2f} |", flush=True)
        start = time.perf_counter()
        first = read_headers(paths, cache, threads=max(args.threads))
        print(f"| first run, writes the cache | {max(args.threads)} | {time.perf_counter() - start:.3f} |")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            assert read_headers(paths, cache, threads=max(args.threads)) == first
            times.append(time.perf_counter() - start)
        print(f"| cached (stat + lookup) | - | {statistics.median(times):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("ROBUSTDET_CACHE", Path.home() / ".cache" / "robustdet")) / "bench_loader"
    parser.add_argument("--data", default=str(default_data), help="where the generated JPEGs are kept")
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--images", type=int, default=800, help="images per timed run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--headers", type=int, default=0, help="measure the header check on this many JPEGs")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--cold", action="store_true", help="--headers: also with files dropped from the page cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.headers:
        bench_headers(args)
    else:
        bench_loader(args)


if __name__ == "__main__":
    main()
