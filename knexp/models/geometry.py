"""Where image tokens sit on the image (the adapter's patch grid), for heatmaps and mask IoU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatchGeometry:
    """Where image tokens sit on the image: token ``t`` covers the box ``boxes[t]``.

    ``boxes`` is float [P, 4] of ``(x0, y0, x1, y1)`` in [0, 1] image coordinates (of the image as the
    model sees it, i.e. after its resize). ``grid`` is the (rows, cols) layout for heatmaps when tokens
    tile a regular grid row-major, else None. ``views`` (int8 [P], default all 0) keeps apart the views of the image a
    model sees more than once: 0 is the finest (the tiles; the heatmaps use it), 1 a coarser view of the whole image
    (LLaVA-NeXT's base image, Idefics3's global image, CLIP's CLS token).
    """

    boxes: np.ndarray
    grid: tuple[int, int] | None
    views: np.ndarray | None = None

    @classmethod
    def row_major(cls, rows: int, cols: int) -> PatchGeometry:
        """Token t covers cell (t // cols, t % cols) of a rows x cols grid."""
        t = np.arange(rows * cols)
        r, c = t // cols, t % cols
        boxes = np.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], 1).astype(np.float32)
        return cls(boxes, (rows, cols))

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def finest(self) -> np.ndarray:
        """bool [P]: the tokens of the finest view (every token when there is one view)."""
        return np.ones(len(self), bool) if self.views is None else np.asarray(self.views) == 0

    def tokens_covering(self, x: float, y: float) -> np.ndarray:
        """The tokens whose box holds the point (x, y) (image coordinates in [0, 1])."""
        b = self.boxes
        return np.flatnonzero((b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3]))

    def object_tokens(self, mask: np.ndarray) -> np.ndarray:
        """The image tokens over an object: those of the finest view whose box centre lies in its ``mask`` (bool [H,
        W]); the token under the mask's centroid where no centre does, none for an empty mask."""
        h, w = mask.shape
        b = self.boxes
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        inside = mask[np.clip((cy * h).astype(int), 0, h - 1), np.clip((cx * w).astype(int), 0, w - 1)] & self.finest
        if inside.any():
            return np.flatnonzero(inside)
        ys, xs = np.nonzero(mask)
        if not len(xs):
            return np.zeros(0, np.int64)
        return self.tokens_covering(float(xs.mean()) / w, float(ys.mean()) / h)[:1]
