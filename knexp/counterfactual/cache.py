"""Inpainted images cached on disk, keyed by dataset, image, annotation and inpainting options.

Files are PNG (lossless) named by a hash of the key, written to a temporary name and renamed, so
concurrent jobs never read a torn file. ``InpaintOptions`` are the knobs of METHOD.md's Stage 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from knexp.counterfactual.inpaint import inpaint, region_mask
from knexp.io import atomic_path
from knexp.store import stable_key


@dataclass(frozen=True)
class InpaintOptions:
    region: str = "bbox"  # the paper: the COCO box; or "segm"
    dilation: int = 0  # pixels
    radius: float = 3.0
    method: str = "telea"  # or "ns" (Navier-Stokes)

    def mask(self, shape: tuple[int, int], bbox, segmentation: np.ndarray | None) -> np.ndarray:
        return region_mask(shape, bbox=bbox, segmentation=segmentation, region=self.region, dilation=self.dilation)

    def apply(self, image: np.ndarray, bbox, segmentation: np.ndarray | None) -> np.ndarray:
        """The image with the instance's region inpainted away."""
        return inpaint(image, self.mask(image.shape[:2], bbox, segmentation), self.radius, self.method)


class InpaintCache:
    """``get(...)`` returns the inpainted image, computing and storing it on a miss. ``root=None``: no disk."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) / "inpainted" if root is not None else None
        self.hits = self.misses = 0

    def get(self, dataset_id: str, image_id: int, annotation_id: int, image: np.ndarray, bbox, segmentation: np.ndarray | None,
            opts: InpaintOptions) -> np.ndarray:
        path = None
        if self.root is not None:
            path = self.root / f"{stable_key(dataset_id, image_id, annotation_id, opts)}.png"
            cached = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.exists() else None
            if cached is not None and cached.shape[:2] == image.shape[:2]:
                self.hits += 1
                return cv2.cvtColor(cached, cv2.COLOR_BGR2RGB)
        self.misses += 1
        out = opts.apply(image, bbox, segmentation)
        if path is not None:
            with atomic_path(path) as tmp:
                cv2.imwrite(str(tmp), cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
        return out
