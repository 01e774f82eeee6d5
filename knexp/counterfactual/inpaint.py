"""Remove an object from an image with OpenCV inpainting (docs/method.md, "Stage 1: activation differences by
inpainting").

The paper inpaints the COCO bounding box with Telea's method; the region may instead be the instance's
segmentation mask, and either may be dilated by a number of pixels so that anti-aliased edges and
shadows go too.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from knexp.user_errors import ConfigError

INPAINT_METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
REGIONS = ("bbox", "segm")


def region_mask(
    shape: tuple[int, int],
    bbox: Sequence[float] | None = None,
    segmentation: np.ndarray | None = None,
    region: str = "bbox",
    dilation: int = 0,
) -> np.ndarray:
    """uint8 mask [H, W] (255 inside) of the region to inpaint.

    ``region="bbox"`` covers the COCO box ``[x, y, w, h]`` (pixels it touches, edges rounded outwards);
    ``region="segm"`` uses ``segmentation``, a boolean or 0/1 mask [H, W]. ``dilation`` grows the region
    by that many pixels (a square structuring element, so a dilated box stays a box).
    """
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    if region == "bbox":
        if bbox is None:
            raise ValueError("region='bbox' needs the annotation's bbox")
        x, y, bw, bh = bbox
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        x1, y1 = int(np.ceil(x + bw)), int(np.ceil(y + bh))
        mask[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] = 255
    elif region == "segm":
        if segmentation is None:
            raise ConfigError("region='segm' needs the annotation's segmentation mask")
        mask[np.asarray(segmentation, bool)] = 255
    else:
        raise ValueError(f"unknown inpainting region {region!r}; use 'bbox' or 'segm'")
    if dilation > 0:
        kernel = np.ones((2 * dilation + 1, 2 * dilation + 1), np.uint8)
        mask = cv2.dilate(mask, kernel)
    return mask


def inpaint(image: np.ndarray, mask: np.ndarray, radius: float = 3.0, method: str = "telea") -> np.ndarray:
    """``cv2.inpaint(image, mask, radius, flag)`` on an RGB uint8 image [H, W, 3]; returns a new image."""
    if method not in INPAINT_METHODS:
        raise ConfigError(f"unknown inpainting method {method!r}; use one of {sorted(INPAINT_METHODS)}")
    if image.dtype != np.uint8 or mask.dtype != np.uint8:
        raise TypeError("inpaint needs uint8 image and uint8 mask (cv2.inpaint's contract)")
    return cv2.inpaint(np.ascontiguousarray(image), mask, float(radius), INPAINT_METHODS[method])
