"""Image headers: threaded reads, the (path, size, mtime_ns) cache, bad caches, rank 0 only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from robustdet.data import DataConfig, build_dataset, parse_source
from robustdet.data import headers as hdr
from robustdet.errors import DatasetError


def _images(folder: Path) -> list[str]:
    """Plain JPEGs and PNGs of varied sizes, an EXIF-rotated JPEG, an animated GIF, a non-image file."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(12):
        path = folder / f"im{i}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.new("RGB", (10 + i, 20 + 2 * i), (i * 20, 0, 0)).save(path)
        paths.append(str(path))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: decoded as 20 wide, 40 high
    Image.new("RGB", (40, 20)).save(folder / "rot.jpg", exif=exif)
    frames = [Image.new("RGB", (8, 8), (c, c, c)) for c in (0, 255)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "text.jpg").write_text("not an image")
    return [*paths, str(folder / "rot.jpg"), str(folder / "anim.gif"), str(folder / "text.jpg")]


def _pil_reference(path: str) -> tuple[int, int, int] | None:
    """Independent of read_header: decode fully with PIL, transposing per EXIF."""
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            width, height = im.size
    except OSError:
        return None
    return (height, width, frames) if orientation in (5, 6, 7, 8) else (width, height, frames)


class _Counting:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self._read = hdr.read_header

    def __call__(self, path: str | Path) -> tuple[int, int, int]:
        self.paths.append(str(path))
        return self._read(path)


def test_threaded_reads_match_serial_reads_and_pil(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img")
    serial = hdr.read_headers(paths, None, threads=1)
    threaded = hdr.read_headers(paths, None, threads=4)
    assert serial == threaded
    for path, header in zip(paths, serial, strict=True):
        expected = _pil_reference(path)
        if expected is None:
            assert isinstance(header, str) and header.startswith(f"{path}: cannot read the image header")
        else:
            assert header == expected, path
    assert serial[-3] == (20, 40, 1) and serial[-2] == (8, 8, 2)
    missing = hdr.read_headers([str(tmp_path / "gone.jpg")], None)
    assert isinstance(missing[0], str) and "gone.jpg" in missing[0]


def test_cache_rereads_only_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _images(tmp_path / "img")
    cache = hdr.cache_file(tmp_path / "cache", "instances.json", str(tmp_path / "img"))
    first = hdr.read_headers(paths, cache)
    assert cache.is_file()
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == len(paths) - 1  # the failed read is not cached

    counting = _Counting()
    monkeypatch.setattr(hdr, "read_header", counting)
    written = cache.stat().st_mtime_ns
    assert hdr.read_headers(paths, cache) == first
    assert counting.paths == [paths[-1]]  # only the unreadable file is tried again
    assert cache.stat().st_mtime_ns == written  # nothing changed, nothing written

    # same size, new mtime: re-read; new content and size: re-read, and the new size is reported
    stat = os.stat(paths[1])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    Image.new("RGB", (33, 17)).save(paths[2], format="JPEG")
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # coarse clocks
    counting.paths.clear()
    again = hdr.read_headers(paths, cache)
    assert sorted(counting.paths) == sorted([paths[1], paths[2], paths[-1]])
    assert again[2] == (33, 17, 1) and again[1] == first[1]
    counting.paths.clear()
    assert hdr.read_headers(paths, cache) == again and counting.paths == [paths[-1]]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "version", "entry", "empty"])
def test_a_bad_cache_is_ignored_and_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    paths = _images(tmp_path / "img")[:-1]
    cache = hdr.cache_file(tmp_path / "cache", "x")
    good = hdr.read_headers(paths, cache)
    text = cache.read_text()
    if damage == "garbage":
        cache.write_bytes(b"\x00\xff not json")
    elif damage == "truncated":
        cache.write_text(text[: len(text) // 2])
    elif damage == "version":
        cache.write_text(text.replace('"version":1', '"version":999'))
    elif damage == "empty":
        cache.write_text("")
    else:  # one entry claims the right size and mtime but nonsense dimensions
        data = json.loads(text)
        key = os.path.abspath(paths[0])
        data["entries"][key] = [*data["entries"][key][:2], "wide", 3, 1]
        cache.write_text(json.dumps(data))
    counting = _Counting()
    monkeypatch.setattr(hdr, "read_header", counting)
    assert hdr.read_headers(paths, cache) == good
    assert counting.paths == ([paths[0]] if damage == "entry" else paths)
    assert json.loads(cache.read_text()) == json.loads(text)  # rewritten whole
    counting.paths.clear()
    assert hdr.read_headers(paths, cache) == good and counting.paths == []


def test_an_unwritable_cache_costs_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _images(tmp_path / "img")[:3]
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    assert hdr.read_headers(paths, tmp_path / "blocked" / "headers.json") == hdr.read_headers(paths, None)
    assert "cannot write the image header cache" in capsys.readouterr().err


def test_build_dataset_reports_bad_headers_with_a_warm_cache(tmp_path: Path) -> None:
    root = tmp_path / "img"
    paths = _images(root)[:4]
    data = {
        "images": [
            {"id": i + 1, "file_name": Path(p).name, "width": w, "height": h}
            for i, (p, (w, h, _)) in enumerate(zip(paths, hdr.read_headers(paths, None), strict=True))
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    source = parse_source({"format": "coco", "path": str(tmp_path / "ann.json"), "image_root": str(root)})
    cache_dir = tmp_path / "cache"
    assert len(build_dataset(source, DataConfig(), train=False, cache_dir=cache_dir)) == 4
    assert len(list(cache_dir.iterdir())) == 1
    Image.new("RGB", (5, 5)).save(paths[1], format="JPEG")  # replaced by an image of another size
    os.utime(paths[1], ns=(0, os.stat(paths[1]).st_mtime_ns + 2_000_000_000))  # coarse clocks
    with pytest.raises(DatasetError, match=r"im1\.jpg: the image is 5x5 but annotated as 11x22"):
        build_dataset(source, DataConfig(), train=False, cache_dir=cache_dir)


def test_only_rank_0_reads_and_the_others_receive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collective is torch's; what is checked here is who reads, who caches and what is broadcast."""
    paths = _images(tmp_path / "img")
    counting = _Counting()
    monkeypatch.setattr(hdr, "read_header", counting)
    monkeypatch.setattr(hdr.dist, "is_distributed", lambda: True)
    sent: list[object] = []
    monkeypatch.setattr(hdr.dist, "rank", lambda: 0)
    monkeypatch.setattr(hdr.dist, "broadcast_object", lambda obj: sent.append(obj) or obj)
    on_rank0 = hdr.read_headers(paths, tmp_path / "cache0" / "h.json")
    assert sorted(counting.paths) == sorted(paths) and len(sent) == 1
    assert on_rank0 == hdr.read_headers(paths, None) and (tmp_path / "cache0" / "h.json").is_file()

    counting.paths.clear()
    monkeypatch.setattr(hdr.dist, "rank", lambda: 1)
    monkeypatch.setattr(hdr.dist, "broadcast_object", lambda obj: sent[0] if obj is None else pytest.fail("sent"))
    assert hdr.read_headers(paths, tmp_path / "cache1" / "h.json") == on_rank0
    assert counting.paths == [] and not (tmp_path / "cache1").exists()

    # rank 0 failing unexpectedly tells the others (instead of leaving them in the broadcast) and raises
    monkeypatch.setattr(hdr.dist, "rank", lambda: 0)
    monkeypatch.setattr(hdr.dist, "broadcast_object", lambda obj: sent.append(obj) or obj)
    monkeypatch.setattr(hdr, "_read_all", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        hdr.read_headers(paths, None)
    assert sent[-1] == ("error", "ZeroDivisionError: division by zero")
    monkeypatch.setattr(hdr.dist, "rank", lambda: 1)
    monkeypatch.setattr(hdr.dist, "broadcast_object", lambda obj: sent[-1])
    with pytest.raises(DatasetError, match=r"failed on rank 0 \(ZeroDivisionError"):
        hdr.read_headers(paths, None)
