"""COCO-format datasets (real COCO 2017 or a toy-world split) read through pycocotools.

``CocoScenes`` answers what the later stages ask: which images contain object ``k``, an image as RGB,
its instances (box, mask) and its reference captions. Missing files fail with a message that names the
path and the ``data.root`` key.
"""

from __future__ import annotations

import contextlib
import io
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
        """Boolean mask [H, W] of one instance (``COCO.annToMask``)."""
        return self.coco.annToMask(self.coco.anns[annotation_id]).astype(bool)

    def captions(self, image_id: int) -> list[str]:
        if self.captions_coco is None:
            return []
        return [a["caption"] for a in self.captions_coco.loadAnns(self.captions_coco.getAnnIds(imgIds=[image_id]))]


def _quiet_coco(path: Path) -> COCO:
    """pycocotools prints progress to stdout; keep it out of job logs."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"annotation file {path} is not valid COCO JSON ({exc}); check data.root") from exc
