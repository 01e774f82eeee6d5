"""Where image tokens sit on the image (the adapter's patch grid), for heatmaps and mask IoU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatchGeometry:
    """Where image tokens sit on the image: token ``t`` covers the box ``boxes[t]``.

    ``boxes`` is float [P, 4] of ``(x0, y0, x1, y1)`` in [0, 1] image coordinates (of the image as the
    model sees it, i.e. after its resize). ``grid`` is the (rows, cols) layout for heatmaps when tokens
    tile a regular grid row-major, else None.
    """

    boxes: np.ndarray
    grid: tuple[int, int] | None

    @classmethod
    def row_major(cls, rows: int, cols: int) -> PatchGeometry:
        """Token t covers cell (t // cols, t % cols) of a rows x cols grid."""
        t = np.arange(rows * cols)
        r, c = t // cols, t % cols
        boxes = np.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], 1).astype(np.float32)
        return cls(boxes, (rows, cols))

    def __len__(self) -> int:
        return len(self.boxes)
