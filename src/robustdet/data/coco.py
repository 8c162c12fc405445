"""``format: coco``: a COCO detection json and the folder its ``file_name``s are relative to."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from robustdet.data.schema import read_json, validate_coco
from robustdet.data.source import FileSource


def load_coco(json_path: str | Path, image_root: str | Path) -> tuple[dict[str, Any], Path]:
    """Read and validate a COCO detection json whose ``file_name``s are relative to ``image_root``."""
    json_path = Path(json_path)
    image_root = Path(image_root)
    data = validate_coco(read_json(json_path), str(json_path), image_root)
    return data, image_root


class CocoSource(FileSource):
    """``format: coco``: ``path`` is the annotation json, ``image_root`` the folder its ``file_name``s are
    relative to (default: the json's folder)."""

    format: Literal["coco"] = "coco"
    verify_headers: ClassVar[bool] = True

    def load(self, split: str, cache_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
        path = Path(self.path or "")
        return load_coco(path, self.image_root if self.image_root is not None else path.parent)


__all__ = ["CocoSource", "load_coco"]
