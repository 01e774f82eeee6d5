"""COCO-format datasets (real COCO 2017 or a toy-world split) read through pycocotools.

``CocoScenes`` answers what the later stages ask: which images contain object ``k``, an image as RGB,
its instances (box, mask) and its reference captions. The annotation files are checked entry by entry
(``knexp.data.validation``): unusable entries are dropped and counted in ``audit``, or stop the run with
``strict``. An image is read whole (``knexp.data.images``): a missing, truncated or corrupt file, or one whose
size disagrees with its entry, raises ``ImageError`` with the reason, which the stages skip and list. Missing
files fail with a message that names the path and the ``data.root`` key.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from knexp.data.data_errors import DatasetError, EntryError, ImageError
from knexp.data.images import read_rgb
from knexp.data.validation import Audit, Fault, audit_coco

__all__ = ["CocoScenes", "DatasetError", "EntryError", "ImageError", "Instance", "SIZE_POLICIES"]
log = logging.getLogger(__name__)
SIZE_POLICIES = ("rescale", "reject")
ASPECT_TOLERANCE = 0.01  # rescale only when the aspect ratios agree this closely
WARN_PER_KIND = 3  # faulty entries named in the log per kind (data_faults.json and task=validate_data list them all)


@dataclass(frozen=True)
class Instance:
    annotation_id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h
    area: float


class CocoScenes:
    """A COCO-format folder: ``<root>/[annotations/]instances_<split>.json`` (+ ``captions_<split>.json``) and the
    images under ``<root>/<image_dir or split>``. ``strict``: stop at the first faulty entry instead of skipping it.
    ``size_mismatch``: what to do with an image whose decoded size differs from its entry's: ``rescale`` it to the
    entry's size when the aspect ratios agree (boxes and masks are in the entry's coordinates, so they stay exact), or
    ``reject`` it."""

    def __init__(self, root: str | Path, split: str, image_dir: str | None = None, strict: bool = False,
                 size_mismatch: str = "rescale"):
        if size_mismatch not in SIZE_POLICIES:
            raise DatasetError(f"data.size_mismatch={size_mismatch!r}; use one of {', '.join(SIZE_POLICIES)}")
        self.root, self.split, self.strict, self.size_mismatch = Path(root), split, strict, size_mismatch
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
        self.audit = Audit(str(instances.parent))
        self.coco = self._read(instances)
        captions = instances.with_name(f"captions_{split}.json")
        self.captions_coco = self._read(captions) if captions.exists() else None
        self._image_faults: dict[int, Fault | None] = {}
        if self.audit.faults:
            for kind, faults in self.audit.to_dict(first=WARN_PER_KIND)["faults"].items():
                for fault in faults:
                    log.warning("%s: %s (%s%s)", fault["entry"], fault["detail"], kind,
                                ", kept" if fault["kept"] else ", skipped")
            log.warning("%s; the first %d of each kind are above, task=validate_data lists every one",
                        self.audit.summary(), WARN_PER_KIND)

    def _read(self, path: Path) -> COCO:
        """The file, checked entry by entry (``audit_coco``, faults into ``audit``) and indexed by pycocotools, whose
        progress prints stay out of job logs."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
            raise DatasetError(f"annotation file {path} is not readable JSON ({exc}); check data.root") from exc
        self.audit.extend(audit_coco(data, str(path), captions=path.name.startswith("captions_"), strict=self.strict))
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
        return coco

    @property
    def image_ids(self) -> list[int]:
        return sorted(self.coco.getImgIds())

    def image_ids_with(self, category_id: int) -> list[int]:
        return sorted(self.coco.getImgIds(catIds=[category_id]))

    def file_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int) -> np.ndarray:
        """RGB uint8 [H, W, 3] at the entry's height and width (``knexp.data.images.read_rgb``, then ``size_mismatch``);
        an image that cannot be used raises ``ImageError`` naming it and why (with ``strict``, a ``DatasetError`` that
        stops the run)."""
        entry = self.coco.imgs[image_id]
        try:
            image = read_rgb(self.file_path(image_id))
        except ImageError as exc:
            raise self._image_fault(image_id, ImageError(f"{exc} (image id {image_id})", exc.kind)) from exc
        height, width = image.shape[:2]
        if (height, width) == (entry["height"], entry["width"]):
            return image
        aspect = entry["width"] / entry["height"]
        same_aspect = abs(width / height - aspect) <= ASPECT_TOLERANCE * aspect
        what = (f"image {self.file_path(image_id)} is {width}x{height} but its entry (id {image_id}) says "
                f"{entry['width']}x{entry['height']}")
        if self.size_mismatch == "rescale" and same_aspect:
            self._image_fault(image_id, ImageError(f"{what}: rescaled to the entry's size", "image_rescaled"),
                              kept=True)
            return cv2.resize(image, (entry["width"], entry["height"]),
                              interpolation=cv2.INTER_AREA if width > entry["width"] else cv2.INTER_LINEAR)
        why = "the aspect ratios differ" if self.size_mismatch == "rescale" else "data.size_mismatch=reject"
        raise self._image_fault(image_id, ImageError(f"{what} ({why}); fix the entry or the file", "image_size"))

    def _image_fault(self, image_id: int, error: ImageError, kept: bool = False) -> ImageError:
        """Record ``error`` in ``audit`` once per image (raising it as a DatasetError with ``strict``); returns it."""
        if image_id not in self._image_faults:
            fault = Fault(error.kind, f"image id {image_id}", str(error), kept=kept)
            self._image_faults[image_id] = fault
            if not kept:
                log.warning("skipping %s", error)
            self.audit.add(fault, self.strict)
        return error

    def image_problem(self, image_id: int) -> str:
        """Why image ``image_id`` cannot be used, or "" (decodes it once; later calls remember)."""
        if image_id not in self._image_faults:
            try:
                self.load_image(image_id)
            except ImageError:
                pass
            self._image_faults.setdefault(image_id, None)
        fault = self._image_faults[image_id]
        return fault.detail if fault is not None and not fault.kept else ""

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
            raise EntryError(f"annotation {annotation_id}: its segmentation cannot be decoded ({exc!r}); fix or drop "
                             "it "
                               "in the annotation file under data.root") from exc

    def object_mask(self, image_id: int, category_id: int) -> np.ndarray:
        """Boolean mask [H, W] of every instance of ``category_id`` in the image (their union); all False without
        one."""
        masks = [self.instance_mask(i.annotation_id) for i in self.instances(image_id) if i.category_id == category_id]
        if masks:
            return np.logical_or.reduce(masks)
        entry = self.coco.imgs[image_id]  # the size load_image and annToMask give, without reading the image
        return np.zeros((entry["height"], entry["width"]), bool)

    def captions(self, image_id: int) -> list[str]:
        if self.captions_coco is None:
            return []
        return [a["caption"] for a in self.captions_coco.loadAnns(self.captions_coco.getAnnIds(imgIds=[image_id]))]
