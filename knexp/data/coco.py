"""COCO-format datasets (real COCO 2017 or a toy-world split) read through pycocotools.

``CocoScenes`` answers what the later stages ask: which images contain object ``k``, an image as RGB,
its instances (box, mask) and its reference captions. Missing files fail with a message that names the
path and the ``data.root`` key.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO


class DatasetError(FileNotFoundError):
    """A dataset file is missing or unreadable; the message names it and the config key to fix."""


@dataclass(frozen=True)
class Instance:
    annotation_id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h
    area: float


class CocoScenes:
    def __init__(self, root: str | Path, split: str, image_dir: str | None = None):
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist; set data.root to a COCO-format folder")
        self.image_dir = self.root / (image_dir or split)
        instances = self.root / f"instances_{split}.json"
        for candidate in (instances, self.root / "annotations" / f"instances_{split}.json"):
            if candidate.exists():
                instances = candidate
                break
        else:
            raise DatasetError(f"annotation file {instances} not found; check data.root and data.split")
        self.coco = _quiet_coco(instances)
        captions = instances.with_name(f"captions_{split}.json")
        self.captions_coco = _quiet_coco(captions) if captions.exists() else None

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.coco.getImgIds())

    def image_ids_with(self, category_id: int) -> list[int]:
        return sorted(self.coco.getImgIds(catIds=[category_id]))

    def file_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int) -> np.ndarray:
        """RGB uint8 [H, W, 3]; a missing or corrupt file raises DatasetError naming it."""
        path = self.file_path(image_id)
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"image {path} is missing or unreadable (image id {image_id})")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def instances(self, image_id: int) -> list[Instance]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], iscrowd=False))
        return [Instance(a["id"], a["image_id"], a["category_id"], tuple(a["bbox"]), float(a["area"])) for a in anns]

    def category_ids(self, image_id: int) -> set[int]:
        return {inst.category_id for inst in self.instances(image_id)}

    def instance_mask(self, annotation_id: int) -> np.ndarray:
        """Boolean mask [H, W] of one instance (``COCO.annToMask``); a segmentation pycocotools cannot decode
        raises DatasetError naming the annotation."""
        try:
            return self.coco.annToMask(self.coco.anns[annotation_id]).astype(bool)
        except (ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError) as exc:
            raise DatasetError(f"annotation {annotation_id}: its segmentation cannot be decoded ({exc!r}); fix or drop it "
                               "in the annotation file under data.root") from exc

    def captions(self, image_id: int) -> list[str]:
        if self.captions_coco is None:
            return []
        return [a["caption"] for a in self.captions_coco.loadAnns(self.captions_coco.getAnnIds(imgIds=[image_id]))]


def _quiet_coco(path: Path) -> COCO:
    """The file, checked (``check_coco``) and indexed by pycocotools, whose progress prints stay out of job logs."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise DatasetError(f"annotation file {path} is not readable JSON ({exc}); check data.root") from exc
    problem = check_coco(data, captions=path.name.startswith("captions_"))
    if problem:
        raise DatasetError(f"annotation file {path} is not valid COCO: {problem}; check data.root")
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)  # optional here; pycocotools' lookups need it
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


MAX_SIDE = 1 << 16


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _check_segmentation(seg) -> str:
    if isinstance(seg, list):
        for poly in seg:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(_is_num(v) for v in poly)):
                return "a polygon is not an even list of at least 6 finite numbers"
        return ""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 0 < v <= MAX_SIDE for v in size)):
            return "an RLE segmentation has no valid size [h, w]"
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts))):
            return "an RLE segmentation has no valid counts"
        return ""
    return "a segmentation is neither polygons nor RLE"


def check_coco(data, captions: bool = False) -> str:
    """Why ``data`` (parsed JSON) is not a COCO annotation file knexp can use, or "" when it is.

    Checks the fields and types every later stage relies on: images (int id, file_name, height and width in
    1..65536), annotations (int id, an image_id that exists; for instances an int category_id, a finite
    [x, y, w, h] box with w, h >= 0, a finite area, polygon or RLE segmentation; for captions a caption string)
    and categories (int id, name)."""
    if not isinstance(data, dict):
        return "the top level is not an object"
    for key in ("images", "annotations") + (() if captions else ("categories",)):
        if not isinstance(data.get(key), list):
            return f"{key!r} is missing or not a list"
    images = set()
    for i, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)):
            return f"images[{i}] needs an int id and a file_name"
        if not all(_is_int(img.get(k)) and 0 < img[k] <= MAX_SIDE for k in ("height", "width")):
            return f"images[{i}] needs int height and width in 1..{MAX_SIDE}"
        images.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        if not (isinstance(ann, dict) and _is_int(ann.get("id")) and _is_int(ann.get("image_id")) and ann["image_id"] in images):
            return f"annotations[{i}] needs an int id and the id of a listed image"
        if captions:
            if not isinstance(ann.get("caption"), str):
                return f"annotations[{i}] has no caption string"
            continue
        box = ann.get("bbox")
        if not (_is_int(ann.get("category_id")) and isinstance(box, list) and len(box) == 4 and all(_is_num(v) for v in box)
                and box[2] >= 0 and box[3] >= 0 and _is_num(ann.get("area"))):
            return f"annotations[{i}] needs an int category_id, a finite bbox [x, y, w >= 0, h >= 0] and an area"
        if ann.get("iscrowd", 0) not in (0, 1):
            return f"annotations[{i}] has iscrowd other than 0 or 1"
        if "segmentation" in ann and (why := _check_segmentation(ann["segmentation"])):
            return f"annotations[{i}]: {why}"
    if not captions:
        for i, cat in enumerate(data["categories"]):
            if not (isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
                return f"categories[{i}] needs an int id and a name"
    return ""
