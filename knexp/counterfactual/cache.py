"""Inpainted images cached on disk, keyed by dataset, image, annotation and inpainting options.

Files are PNG (lossless) named by a hash of the key, written to a temporary name and renamed, so
concurrent jobs never read a torn file. Each carries its key and a checksum of its pixels (``knexp.checked``): a file
cut short, edited or copied from another entry is inpainted again, with a warning. ``InpaintOptions`` are the knobs
of docs/method.md, "Stage 1: activation differences by inpainting".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knexp.checked import Damaged, damaged, read_png, write_png
from knexp.counterfactual.inpaint import INPAINT_METHODS, REGIONS, inpaint, region_mask
from knexp.settings import Choice, Integer, Number, check_fields
from knexp.store import stable_key


@dataclass(frozen=True)
class InpaintOptions:
    region: str = "bbox"  # the paper: the COCO box; or "segm"
    dilation: int = 0  # pixels
    radius: float = 3.0
    method: str = "telea"  # or "ns" (Navier-Stokes)

    def __post_init__(self):
        """Check the settings (``inpaint.*``): each raises ``SettingError`` naming the key."""
        check_fields(self, "inpaint", region=Choice(REGIONS), dilation=Integer(low=0),
                     radius=Number(low=0.0, low_open=True), method=Choice(tuple(INPAINT_METHODS)))

    def mask(self, shape: tuple[int, int], bbox, segmentation: np.ndarray | None) -> np.ndarray:
        return region_mask(shape, bbox=bbox, segmentation=segmentation, region=self.region, dilation=self.dilation)

    def apply(self, image: np.ndarray, bbox, segmentation: np.ndarray | None) -> np.ndarray:
        """The image with the instance's region inpainted away."""
        return self.apply_many(image, [(bbox, segmentation)])

    def apply_many(self, image: np.ndarray, regions: list[tuple]) -> np.ndarray:
        """The image with every (bbox, segmentation) instance region inpainted away at once (their union)."""
        mask = np.zeros(image.shape[:2], np.uint8)
        for bbox, segmentation in regions:
            mask |= self.mask(image.shape[:2], bbox, segmentation)
        return inpaint(image, mask, self.radius, self.method)


class InpaintCache:
    """``get(...)`` returns the inpainted image, computing and storing it on a miss. ``root=None``: no disk."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) / "inpainted" if root is not None else None
        self.hits = self.misses = self.damaged = 0

    def get(self, dataset_id: str, image_id: int, annotation_id: int, image: np.ndarray, bbox,
            segmentation: np.ndarray | None, opts: InpaintOptions) -> np.ndarray:
        return self.get_many(dataset_id, image_id, [annotation_id], image, [(bbox, segmentation)], opts)

    def get_many(self, dataset_id: str, image_id: int, annotation_ids: list[int], image: np.ndarray,
                 regions: list[tuple], opts: InpaintOptions) -> np.ndarray:
        """The image with the instances ``annotation_ids`` (their ``regions``: (bbox, segmentation)) inpainted away."""
        path = None
        # one id: the single-instance key
        ids = annotation_ids[0] if len(annotation_ids) == 1 else sorted(annotation_ids)
        key = stable_key(dataset_id, image_id, ids, opts)
        if self.root is not None:
            path = self.root / f"{key}.png"
            try:
                cached = read_png(path, key)
                if cached.shape != image.shape:
                    raise Damaged(f"sized {cached.shape[:2]}, the image {image.shape[:2]}")
                self.hits += 1
                return cached
            except FileNotFoundError:
                pass
            except Damaged as exc:
                self.damaged += 1
                damaged("inpainted images", path, str(exc))
        self.misses += 1
        out = opts.apply_many(image, regions)
        if path is not None:
            write_png(path, out, key)
        return out

    def without(self, data, dataset_id: str, image_id: int, category_id: int, opts: InpaintOptions) -> np.ndarray:
        """Image ``image_id`` of ``data`` (``knexp.data.coco.CocoScenes``) with every instance of ``category_id``
        inpainted away at once: the counterfactual of an evaluation image of that object."""
        image = data.load_image(image_id)
        insts = [i for i in data.instances(image_id) if i.category_id == category_id]
        return self.get_many(dataset_id, image_id, [i.annotation_id for i in insts], image,
                             [(i.bbox, data.instance_mask(i.annotation_id)) for i in insts], opts)
