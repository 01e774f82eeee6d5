"""Procedural sprites: one distinctive drawing per catalog object.

Each sprite is drawn in unit coordinates on its own canvas (``x, y`` in [0, 1], ``y`` down) whose
aspect ratio suits the object (a bus is wide, a traffic light tall), then jittered in colour, texture,
rotation and mirroring. The same primitives draw the object's mask, so the COCO segmentation is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

RGB = tuple[int, int, int]


class Pen:
    """Draws anti-aliased primitives in unit coordinates onto an RGB canvas and its alpha mask."""

    def __init__(self, w: int, h: int, rng: np.random.Generator, colour_jitter: float = 18.0):
        self.w, self.h, self.rng = w, h, rng
        self.img = np.zeros((h, w, 3), np.uint8)
        self.alpha = np.zeros((h, w), np.uint8)
        self.jitter = colour_jitter
        self._shift = rng.normal(0.0, colour_jitter / 2, 3)  # one hue shift per sprite

    # colour -----------------------------------------------------------------
    def c(self, rgb: RGB, spread: float = 1.0) -> tuple[float, float, float]:
        """The sprite's colour ``rgb`` with its shared shift and a little per-part noise."""
        noisy = np.asarray(rgb, float) + spread * (self._shift + self.rng.normal(0.0, self.jitter / 3, 3))
        return tuple(float(v) for v in np.clip(noisy, 0, 255))

    def pick(self, palette: list[RGB]) -> RGB:
        return palette[int(self.rng.integers(len(palette)))]

    # geometry helpers ----------------------------------------------------------
    def _p(self, x: float, y: float) -> tuple[int, int]:
        return int(round(x * (self.w - 1))), int(round(y * (self.h - 1)))

    def _len(self, r: float) -> int:
        return max(1, int(round(r * min(self.w, self.h))))

    def _both(self, draw: Callable[[np.ndarray, tuple], None], colour: RGB, solid: bool = True) -> None:
        draw(self.img, self.c(colour))
        if solid:
            draw(self.alpha, (255,))

    # primitives (thickness t in units of the shorter side; t<0 fills) ----------
    def ellipse(self, cx, cy, rx, ry, colour, angle=0.0, start=0, end=360, t=-1.0, solid=True):
        axes = (max(1, int(round(rx * (self.w - 1)))), max(1, int(round(ry * (self.h - 1)))))
        th = -1 if t < 0 else self._len(t)
        self._both(
            lambda im, col: cv2.ellipse(im, self._p(cx, cy), axes, angle, start, end, col, th, cv2.LINE_AA),
            colour,
            solid,
        )

    def circle(self, cx, cy, r, colour, t=-1.0, solid=True):
        th = -1 if t < 0 else self._len(t)
        self._both(lambda im, col: cv2.circle(im, self._p(cx, cy), self._len(r), col, th, cv2.LINE_AA), colour, solid)

    def rect(self, x0, y0, x1, y1, colour, t=-1.0, solid=True):
        th = -1 if t < 0 else self._len(t)
        self._both(lambda im, col: cv2.rectangle(im, self._p(x0, y0), self._p(x1, y1), col, th, cv2.LINE_AA), colour,
                   solid)

    def poly(self, pts, colour, solid=True):
        arr = np.array([self._p(x, y) for x, y in pts], np.int32)
        self._both(lambda im, col: cv2.fillPoly(im, [arr], col, cv2.LINE_AA), colour, solid)

    def line(self, x0, y0, x1, y1, colour, t=0.03, solid=True):
        self._both(lambda im, col: cv2.line(im, self._p(x0, y0), self._p(x1, y1), col, self._len(t), cv2.LINE_AA),
                   colour, solid)

    def text(self, s, x, y, width, colour, t=0.04):
        """Write ``s`` starting at (x, y) (baseline), scaled so that it spans ``width`` of the canvas."""
        (tw, _), _ = cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, 1.0, self._len(t))
        fs = width * self.w / max(tw, 1)
        cv2.putText(self.img, s, self._p(x, y), cv2.FONT_HERSHEY_SIMPLEX, fs, self.c(colour, 0.3), self._len(t),
                    cv2.LINE_AA)

    def scatter(self, n, box, r, colour, inside: Callable[[float, float], bool] | None = None):
        """``n`` dots of radius ``r`` at random points of ``box=(x0, y0, x1, y1)`` (and ``inside``)."""
        x0, y0, x1, y1 = box
        placed = tries = 0
        while placed < n and tries < 20 * n:
            tries += 1
            x, y = self.rng.uniform(x0, x1), self.rng.uniform(y0, y1)
            if inside is None or inside(x, y):
                self.circle(x, y, r, colour, solid=False)
                placed += 1


@dataclass(frozen=True)
class SpriteSpec:
    aspect: float  # width / height of the sprite's canvas
    draw: Callable[[Pen], None]
    mirror: bool = True  # may be flipped left-right (False where text would read backwards)


# ----------------------------------------------------------------------------------------------------
# the 30 sprites (colours RGB)
# ----------------------------------------------------------------------------------------------------
def _banana(p: Pen):
    p.ellipse(0.5, 0.0, 0.42, 0.78, (245, 215, 50), start=25, end=155, t=0.24)
    p.ellipse(0.5, 0.0, 0.42, 0.86, (200, 170, 30), start=40, end=140, t=0.03, solid=False)
    p.circle(0.13, 0.5, 0.05, (100, 70, 20))
    p.circle(0.87, 0.5, 0.05, (100, 70, 20))


def _pizza(p: Pen):
    p.circle(0.5, 0.5, 0.48, (215, 160, 85))
    p.circle(0.5, 0.5, 0.40, (205, 55, 30))
    p.scatter(7, (0.2, 0.2, 0.8, 0.8), 0.07, (245, 215, 120), lambda x, y: (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.09)
    p.scatter(6, (0.22, 0.22, 0.78, 0.78), 0.065, (130, 20, 25), lambda x, y: (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08)
    for a in (0, 60, 120):
        rad = np.deg2rad(a)
        dx, dy = 0.4 * np.cos(rad), 0.4 * np.sin(rad)
        p.line(0.5 - dx, 0.5 - dy, 0.5 + dx, 0.5 + dy, (150, 90, 40), 0.015, solid=False)


def _cake(p: Pen):
    p.ellipse(0.5, 0.93, 0.49, 0.06, (200, 200, 210))
    p.rect(0.1, 0.45, 0.9, 0.92, p.pick([(240, 165, 190), (120, 70, 40), (250, 235, 200)]))
    p.rect(0.1, 0.62, 0.9, 0.68, (255, 250, 245))
    p.rect(0.1, 0.38, 0.9, 0.47, (255, 250, 250))
    p.scatter(8, (0.12, 0.39, 0.88, 0.46), 0.025, (220, 40, 60))
    p.rect(0.46, 0.14, 0.54, 0.38, (80, 120, 230))
    p.ellipse(0.5, 0.08, 0.05, 0.07, (255, 170, 20))


def _bear(p: Pen):
    fur = p.pick([(120, 75, 40), (90, 55, 30), (60, 45, 35)])
    p.ellipse(0.5, 0.66, 0.38, 0.32, fur)
    p.circle(0.3, 0.12, 0.09, fur)
    p.circle(0.7, 0.12, 0.09, fur)
    p.circle(0.5, 0.32, 0.23, fur)
    p.ellipse(0.5, 0.39, 0.11, 0.08, (205, 165, 115))
    p.circle(0.5, 0.36, 0.035, (20, 15, 10))
    p.circle(0.41, 0.27, 0.025, (20, 15, 10))
    p.circle(0.59, 0.27, 0.025, (20, 15, 10))
    p.ellipse(0.5, 0.7, 0.2, 0.17, (165, 115, 70), solid=False)


def _giraffe(p: Pen):
    coat, spot = (230, 175, 70), (130, 75, 25)
    for x in (0.38, 0.47, 0.72, 0.81):
        p.rect(x, 0.55, x + 0.06, 0.99, coat)
    p.ellipse(0.6, 0.55, 0.3, 0.13, coat)
    p.poly([(0.32, 0.52), (0.46, 0.48), (0.3, 0.12), (0.2, 0.14)], coat)
    p.ellipse(0.18, 0.11, 0.14, 0.06, coat, angle=-15)
    p.line(0.2, 0.07, 0.19, 0.01, spot, 0.04)
    p.line(0.26, 0.07, 0.26, 0.01, spot, 0.04)
    p.scatter(12, (0.33, 0.45, 0.88, 0.65), 0.045, spot, lambda x,
              y: ((x - 0.6) / 0.28) ** 2 + ((y - 0.55) / 0.11) ** 2 < 1)
    p.scatter(5, (0.24, 0.18, 0.4, 0.48), 0.04, spot, lambda x, y: abs((x - 0.22) - (0.5 - y) * 0.4) < 0.08)


def _horse(p: Pen):
    coat = p.pick([(140, 70, 30), (90, 50, 25), (200, 190, 180), (40, 30, 25)])
    dark = (30, 20, 15)
    for x in (0.27, 0.36, 0.62, 0.71):
        p.rect(x, 0.5, x + 0.05, 0.97, coat)
        p.rect(x, 0.9, x + 0.05, 0.98, dark)
    p.ellipse(0.5, 0.47, 0.3, 0.17, coat)
    p.poly([(0.68, 0.42), (0.78, 0.12), (0.88, 0.16), (0.82, 0.48)], coat)
    p.ellipse(0.89, 0.2, 0.1, 0.07, coat, angle=35)
    p.line(0.74, 0.15, 0.67, 0.42, dark, 0.05)
    p.poly([(0.2, 0.4), (0.24, 0.44), (0.14, 0.82), (0.08, 0.78)], dark)


def _bus(p: Pen):
    body = p.pick([(245, 195, 20), (210, 35, 30), (40, 110, 200)])
    p.rect(0.02, 0.08, 0.98, 0.8, body)
    for i in range(6):
        x = 0.06 + i * 0.145
        p.rect(x, 0.18, x + 0.11, 0.45, (160, 210, 235))
    p.rect(0.02, 0.55, 0.98, 0.6, (40, 40, 40))
    p.circle(0.22, 0.82, 0.15, (25, 25, 25))
    p.circle(0.78, 0.82, 0.15, (25, 25, 25))
    p.circle(0.22, 0.82, 0.06, (170, 170, 170))
    p.circle(0.78, 0.82, 0.06, (170, 170, 170))


def _airplane(p: Pen):
    body = (232, 232, 238)
    p.poly([(0.48, 0.5), (0.62, 0.5), (0.42, 0.97), (0.33, 0.97)], (185, 188, 200))
    p.poly([(0.48, 0.5), (0.62, 0.5), (0.42, 0.03), (0.33, 0.03)], (185, 188, 200))
    p.poly([(0.04, 0.5), (0.16, 0.5), (0.09, 0.16), (0.03, 0.16)], (40, 80, 170))
    p.ellipse(0.5, 0.5, 0.47, 0.11, body)
    p.line(0.08, 0.53, 0.9, 0.53, (40, 80, 170), 0.035, solid=False)
    for i in range(9):
        p.circle(0.25 + i * 0.065, 0.47, 0.018, (40, 50, 80), solid=False)
    p.ellipse(0.92, 0.47, 0.04, 0.04, (40, 50, 80), solid=False)


def _bicycle(p: Pen):
    frame, tyre = p.pick([(205, 30, 30), (30, 140, 210), (40, 170, 60)]), (25, 25, 25)
    for cx in (0.22, 0.78):
        p.circle(cx, 0.68, 0.29, tyre, t=0.05)
        for a in range(0, 180, 45):
            rad = np.deg2rad(a)
            dx, dy = 0.17 * np.cos(rad), 0.27 * np.sin(rad)
            p.line(cx - dx, 0.68 - dy, cx + dx, 0.68 + dy, (150, 150, 150), 0.012)
    for a, b in [((0.22, 0.68), (0.45, 0.3)), ((0.45, 0.3), (0.72, 0.28)), ((0.72, 0.28), (0.78, 0.68)),
                 ((0.22, 0.68), (0.5, 0.68)), ((0.5, 0.68), (0.45, 0.3)), ((0.5, 0.68), (0.72, 0.28))]:
        p.line(*a, *b, frame, 0.05)
    p.ellipse(0.44, 0.26, 0.07, 0.035, tyre)
    p.line(0.68, 0.2, 0.78, 0.2, tyre, 0.04)


def _bed(p: Pen):
    wood = (110, 65, 35)
    p.rect(0.02, 0.12, 0.13, 0.97, wood)
    p.rect(0.92, 0.5, 0.98, 0.97, wood)
    p.rect(0.1, 0.75, 0.97, 0.86, wood)
    p.rect(0.1, 0.5, 0.97, 0.76, (245, 245, 240))
    cover = p.pick([(60, 90, 190), (190, 60, 70), (70, 150, 90)])
    p.rect(0.36, 0.45, 0.97, 0.8, cover)
    for i in range(4):
        x = 0.42 + i * 0.14
        p.rect(x, 0.45, x + 0.05, 0.8, (235, 225, 200), solid=False)
    p.ellipse(0.23, 0.47, 0.1, 0.07, (255, 255, 252))


def _toilet(p: Pen):
    white, edge = (245, 245, 245), (120, 120, 130)
    p.rect(0.15, 0.04, 0.85, 0.4, edge)
    p.rect(0.18, 0.06, 0.82, 0.38, white)
    p.rect(0.66, 0.1, 0.76, 0.14, (170, 170, 180))
    p.poly([(0.33, 0.6), (0.67, 0.6), (0.62, 0.96), (0.38, 0.96)], white)
    p.ellipse(0.5, 0.55, 0.42, 0.16, edge)
    p.ellipse(0.5, 0.55, 0.39, 0.13, white)
    p.ellipse(0.5, 0.55, 0.25, 0.07, (170, 200, 220), solid=False)


def _refrigerator(p: Pen):
    p.rect(0.05, 0.02, 0.95, 0.98, (90, 95, 100))
    p.rect(0.08, 0.03, 0.92, 0.97, p.pick([(205, 210, 215), (240, 240, 240), (170, 175, 180)]))
    p.line(0.08, 0.38, 0.92, 0.38, (70, 70, 75), 0.03)
    p.rect(0.78, 0.12, 0.85, 0.32, (60, 60, 65))
    p.rect(0.78, 0.45, 0.85, 0.72, (60, 60, 65))
    p.scatter(3, (0.2, 0.5, 0.65, 0.85), 0.04, (220, 60, 60))


def _microwave(p: Pen):
    p.rect(0.02, 0.15, 0.98, 0.85, p.pick([(185, 185, 190), (245, 245, 245), (40, 40, 45)]))
    p.rect(0.07, 0.25, 0.68, 0.75, (30, 32, 38))
    p.line(0.12, 0.33, 0.3, 0.33, (90, 95, 110), 0.03, solid=False)
    p.rect(0.72, 0.25, 0.93, 0.75, (140, 140, 145))
    p.rect(0.75, 0.28, 0.9, 0.36, (60, 200, 90))
    for r in range(3):
        for c in range(3):
            p.rect(0.75 + c * 0.055, 0.42 + r * 0.1, 0.79 + c * 0.055, 0.48 + r * 0.1, (225, 225, 230), solid=False)


def _toaster(p: Pen):
    chrome = (205, 207, 215)
    p.rect(0.24, 0.06, 0.43, 0.3, (215, 165, 95))
    p.rect(0.56, 0.1, 0.75, 0.3, (200, 145, 80))
    p.ellipse(0.5, 0.3, 0.42, 0.1, chrome)
    p.rect(0.08, 0.3, 0.92, 0.95, chrome)
    p.rect(0.22, 0.26, 0.45, 0.32, (30, 30, 30))
    p.rect(0.55, 0.26, 0.78, 0.32, (30, 30, 30))
    p.rect(0.92, 0.5, 0.99, 0.57, (20, 20, 20))
    p.line(0.1, 0.6, 0.9, 0.6, (150, 150, 160), 0.02, solid=False)


def _tennis_racket(p: Pen):
    frame = p.pick([(40, 160, 60), (200, 40, 40), (40, 80, 200)])
    for i in range(1, 8):
        x = 0.1 + i * 0.1
        p.line(x, 0.06, x, 0.6, (235, 235, 230), 0.012)
        y = 0.02 + i * 0.078
        p.line(0.12, y, 0.88, y, (235, 235, 230), 0.012)
    p.ellipse(0.5, 0.33, 0.42, 0.31, frame, t=0.08)
    p.poly([(0.42, 0.62), (0.58, 0.62), (0.53, 0.7), (0.47, 0.7)], frame)
    p.rect(0.44, 0.68, 0.56, 0.98, (25, 25, 25))
    for y in (0.75, 0.83, 0.91):
        p.line(0.44, y, 0.56, y + 0.03, (240, 240, 240), 0.015, solid=False)


def _surfboard(p: Pen):
    base = p.pick([(30, 190, 200), (250, 130, 30), (240, 240, 235)])
    p.ellipse(0.5, 0.5, 0.46, 0.49, base)
    p.line(0.5, 0.04, 0.5, 0.96, (250, 250, 250) if base[0] < 200 else (230, 60, 60), 0.09, solid=False)
    p.poly([(0.47, 0.8), (0.53, 0.8), (0.5, 0.9)], (30, 30, 30), solid=False)


def _snowboard(p: Pen):
    p.ellipse(0.5, 0.1, 0.45, 0.1, (35, 35, 55))
    p.ellipse(0.5, 0.9, 0.45, 0.1, (35, 35, 55))
    p.rect(0.05, 0.1, 0.95, 0.9, (35, 35, 55))
    graphic = p.pick([(170, 240, 40), (240, 40, 170), (250, 150, 20)])
    for i in range(4):
        y = 0.42 + i * 0.06
        p.poly([(0.06, y), (0.94, y - 0.1), (0.94, y - 0.07), (0.06, y + 0.03)], graphic, solid=False)
    p.rect(0.02, 0.3, 0.98, 0.36, (15, 15, 15))
    p.rect(0.02, 0.68, 0.98, 0.74, (15, 15, 15))


def _fire_hydrant(p: Pen):
    red = p.pick([(205, 30, 25), (240, 200, 30)])
    p.rect(0.2, 0.88, 0.8, 0.98, red)
    p.rect(0.3, 0.3, 0.7, 0.9, red)
    p.ellipse(0.5, 0.3, 0.2, 0.12, red)
    p.rect(0.44, 0.08, 0.56, 0.2, red)
    p.rect(0.12, 0.45, 0.3, 0.58, red)
    p.rect(0.7, 0.45, 0.88, 0.58, red)
    p.circle(0.5, 0.52, 0.07, (120, 15, 10), solid=False)
    p.line(0.3, 0.3, 0.7, 0.3, (120, 15, 10), 0.03, solid=False)


def _stop_sign(p: Pen):
    p.rect(0.45, 0.55, 0.55, 0.99, (150, 150, 155))
    pts = [(0.5 + 0.48 * np.cos(np.deg2rad(22.5 + 45 * i)),
            0.33 + 0.3 * np.sin(np.deg2rad(22.5 + 45 * i))) for i in range(8)]
    p.poly(pts, (250, 250, 250))
    inner = [(0.5 + 0.43 * np.cos(np.deg2rad(22.5 + 45 * i)),
              0.33 + 0.27 * np.sin(np.deg2rad(22.5 + 45 * i))) for i in range(8)]
    p.poly(inner, (210, 25, 30))
    p.text("STOP", 0.15, 0.4, 0.7, (255, 255, 255), t=0.05)


def _traffic_light(p: Pen):
    p.rect(0.43, 0.78, 0.57, 0.99, (120, 120, 125))
    p.rect(0.12, 0.02, 0.88, 0.8, (30, 30, 32))
    on = int(p.rng.integers(3))
    for i, colour in enumerate([(235, 40, 30), (250, 200, 30), (40, 220, 80)]):
        dim = 1.0 if i == on else 0.55
        p.circle(0.5, 0.16 + 0.25 * i, 0.28, tuple(int(v * dim) for v in colour))


def _keyboard(p: Pen):
    p.rect(0.01, 0.08, 0.99, 0.92, p.pick([(55, 55, 60), (225, 225, 228)]))
    key = (205, 205, 210) if p.img[p.h // 2, 2].mean() < 128 else (70, 70, 75)
    for r in range(4):
        for c in range(13):
            x, y = 0.04 + c * 0.072, 0.15 + r * 0.17
            p.rect(x, y, x + 0.055, y + 0.12, key, solid=False)
    p.rect(0.3, 0.83, 0.7, 0.88, key, solid=False)


def _cell_phone(p: Pen):
    p.rect(0.05, 0.02, 0.95, 0.98, (20, 20, 25))
    top, bottom = np.array(p.pick([(60, 90, 220), (140, 60, 200), (30, 160, 180)])), np.array((240, 120, 160))
    for i in range(16):
        y = 0.1 + i * 0.047
        col = tuple(int(v) for v in top + (bottom - top) * i / 15)
        p.rect(0.12, y, 0.88, y + 0.05, col, solid=False)
    for r in range(3):
        for c in range(3):
            p.rect(0.2 + c * 0.22, 0.18 + r * 0.16, 0.32 + c * 0.22, 0.26 + r * 0.16, (250, 250, 250), solid=False)
    p.circle(0.5, 0.92, 0.07, (90, 90, 95), solid=False)


def _laptop(p: Pen):
    p.poly([(0.14, 0.04), (0.86, 0.04), (0.86, 0.6), (0.14, 0.6)], (40, 40, 45))
    p.rect(0.18, 0.08, 0.82, 0.56, p.pick([(90, 150, 225), (60, 180, 160), (220, 120, 80)]))
    p.poly([(0.14, 0.6), (0.86, 0.6), (0.99, 0.92), (0.01, 0.92)], (190, 190, 198))
    for i in range(3):
        y = 0.64 + i * 0.06
        p.line(0.16 - i * 0.02, y, 0.84 + i * 0.02, y, (120, 120, 130), 0.02, solid=False)
    p.rect(0.42, 0.82, 0.58, 0.89, (160, 160, 168), solid=False)


def _scissors(p: Pen):
    grip = p.pick([(245, 120, 20), (30, 90, 200), (220, 30, 60)])
    blade = (175, 178, 188)
    p.line(0.36, 0.64, 0.64, 0.03, blade, 0.09)
    p.line(0.64, 0.64, 0.36, 0.03, blade, 0.09)
    p.circle(0.3, 0.8, 0.17, grip, t=0.07)
    p.circle(0.7, 0.8, 0.17, grip, t=0.07)
    p.circle(0.5, 0.33, 0.04, (60, 60, 70))


def _book(p: Pen):
    cover = p.pick([(30, 110, 60), (30, 50, 130), (130, 25, 40), (200, 120, 30)])
    p.rect(0.9, 0.04, 0.97, 0.96, (245, 235, 210))
    p.rect(0.04, 0.02, 0.91, 0.98, cover)
    p.rect(0.04, 0.02, 0.16, 0.98, tuple(int(v * 0.6) for v in cover))
    p.rect(0.27, 0.18, 0.82, 0.32, (230, 190, 60))
    for y in (0.45, 0.52, 0.59):
        p.line(0.3, y, 0.78, y, (230, 190, 60), 0.015, solid=False)


def _clock(p: Pen):
    p.circle(0.5, 0.5, 0.48, p.pick([(20, 20, 20), (150, 30, 30), (180, 140, 60)]))
    p.circle(0.5, 0.5, 0.42, (250, 250, 245))
    for i in range(12):
        a = np.deg2rad(30 * i)
        p.line(0.5 + 0.34 * np.cos(a), 0.5 + 0.34 * np.sin(a), 0.5 + 0.4 * np.cos(a), 0.5 + 0.4 * np.sin(a),
               (20, 20, 20), 0.025)
    h, m = np.deg2rad(p.rng.uniform(0, 360)), np.deg2rad(p.rng.uniform(0, 360))
    p.line(0.5, 0.5, 0.5 + 0.2 * np.cos(h), 0.5 + 0.2 * np.sin(h), (20, 20, 20), 0.045)
    p.line(0.5, 0.5, 0.5 + 0.32 * np.cos(m), 0.5 + 0.32 * np.sin(m), (20, 20, 20), 0.03)
    p.circle(0.5, 0.5, 0.035, (210, 30, 30))


def _vase(p: Pen):
    glaze = p.pick([(40, 80, 180), (30, 140, 130), (170, 60, 40), (230, 230, 235)])
    p.poly([(0.36, 0.02), (0.64, 0.02), (0.6, 0.16), (0.92, 0.5), (0.76, 0.96), (0.24, 0.96), (0.08, 0.5), (0.4, 0.16)],
           glaze)
    band = (250, 250, 250) if glaze[0] < 200 else (40, 80, 180)
    xs = np.linspace(0.14, 0.86, 12)
    for a, b in zip(xs[:-1], xs[1:], strict=True):
        p.line(a, 0.5 + 0.04 * np.sin(a * 40), b, 0.5 + 0.04 * np.sin(b * 40), band, 0.04, solid=False)
    p.line(0.2, 0.72, 0.8, 0.72, band, 0.025, solid=False)


def _suitcase(p: Pen):
    shell = p.pick([(110, 60, 30), (30, 30, 35), (170, 30, 40), (40, 90, 150)])
    p.rect(0.36, 0.04, 0.64, 0.2, (25, 25, 25), t=0.05)
    p.rect(0.05, 0.18, 0.95, 0.9, shell)
    for x in (0.3, 0.5, 0.7):
        p.line(x, 0.22, x, 0.86, tuple(int(v * 0.6) for v in shell), 0.03, solid=False)
    for x in (0.05, 0.95):
        for y in (0.18, 0.9):
            p.circle(x, y, 0.05, (200, 170, 60))
    p.circle(0.15, 0.95, 0.05, (20, 20, 20))
    p.circle(0.85, 0.95, 0.05, (20, 20, 20))


def _backpack(p: Pen):
    cloth = p.pick([(50, 130, 60), (240, 120, 30), (110, 50, 150), (200, 40, 50)])
    p.ellipse(0.5, 0.1, 0.14, 0.07, (30, 30, 30), t=0.04)
    p.ellipse(0.5, 0.24, 0.38, 0.14, cloth)
    p.rect(0.12, 0.24, 0.88, 0.96, cloth)
    p.rect(0.22, 0.56, 0.78, 0.9, tuple(int(v * 0.65) for v in cloth))
    p.line(0.25, 0.62, 0.75, 0.62, (230, 230, 230), 0.02, solid=False)
    p.line(0.3, 0.2, 0.25, 0.55, (35, 35, 35), 0.05, solid=False)
    p.line(0.7, 0.2, 0.75, 0.55, (35, 35, 35), 0.05, solid=False)


def _umbrella(p: Pen):
    palette = [(220, 30, 40), (250, 250, 250), (30, 80, 200), (250, 200, 30), (40, 160, 70)]
    a, b = (int(i) for i in p.rng.choice(len(palette), 2, replace=False))
    for i in range(6):
        p.ellipse(0.5, 0.48, 0.48, 0.44, palette[a] if i % 2 == 0 else palette[b], start=180 + 30 * i, end=210 + 30 * i)
    p.line(0.5, 0.05, 0.5, 0.86, (60, 40, 30), 0.035)
    p.ellipse(0.59, 0.86, 0.09, 0.09, (60, 40, 30), start=0, end=180, t=0.035)


SPRITES: dict[str, SpriteSpec] = {
    "banana": SpriteSpec(1.5, _banana),
    "pizza": SpriteSpec(1.0, _pizza),
    "cake": SpriteSpec(0.95, _cake),
    "bear": SpriteSpec(0.9, _bear),
    "giraffe": SpriteSpec(0.7, _giraffe),
    "horse": SpriteSpec(1.3, _horse),
    "bus": SpriteSpec(2.0, _bus),
    "airplane": SpriteSpec(1.8, _airplane),
    "bicycle": SpriteSpec(1.6, _bicycle),
    "bed": SpriteSpec(1.5, _bed),
    "toilet": SpriteSpec(0.8, _toilet),
    "refrigerator": SpriteSpec(0.55, _refrigerator),
    "microwave": SpriteSpec(1.6, _microwave),
    "toaster": SpriteSpec(1.25, _toaster),
    "tennis racket": SpriteSpec(0.55, _tennis_racket),
    "surfboard": SpriteSpec(0.33, _surfboard),
    "snowboard": SpriteSpec(0.33, _snowboard),
    "fire hydrant": SpriteSpec(0.7, _fire_hydrant),
    "stop sign": SpriteSpec(0.62, _stop_sign, mirror=False),
    "traffic light": SpriteSpec(0.42, _traffic_light),
    "keyboard": SpriteSpec(2.8, _keyboard),
    "cell phone": SpriteSpec(0.5, _cell_phone),
    "laptop": SpriteSpec(1.3, _laptop),
    "scissors": SpriteSpec(0.8, _scissors),
    "book": SpriteSpec(0.75, _book),
    "clock": SpriteSpec(1.0, _clock),
    "vase": SpriteSpec(0.65, _vase),
    "suitcase": SpriteSpec(1.1, _suitcase),
    "backpack": SpriteSpec(0.8, _backpack),
    "umbrella": SpriteSpec(1.1, _umbrella),
}


def render_sprite(name: str, size: int, rng: np.random.Generator,
                  max_rotation: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw object ``name`` with its longer side ``size`` px; returns (RGB uint8 [h, w, 3], alpha uint8 [h, w]).

    Jitter: colour (per sprite and per part), a smooth multiplicative texture, a rotation of up to
    ``max_rotation`` degrees and, where allowed, a left-right mirror.
    """
    spec = SPRITES[name]
    w, h = (size, max(8, round(size / spec.aspect))) if spec.aspect >= 1 else (max(8, round(size * spec.aspect)), size)
    pen = Pen(w, h, rng)
    spec.draw(pen)
    img, alpha = pen.img.astype(np.float32), pen.alpha
    texture = cv2.resize(rng.normal(0.0, 1.0, (6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img * (1.0 + 0.06 * texture[..., None]), 0, 255).astype(np.uint8)
    if spec.mirror and rng.random() < 0.5:
        img, alpha = img[:, ::-1].copy(), alpha[:, ::-1].copy()
    angle = rng.uniform(-max_rotation, max_rotation)
    if abs(angle) > 0.5:
        img, alpha = _rotate(img, alpha, angle)
    return img, alpha


def _rotate(img: np.ndarray, alpha: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = alpha.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * sin + w * cos + 0.5), int(h * cos + w * sin + 0.5)
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    img = cv2.warpAffine(img, m, (nw, nh), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(alpha, m, (nw, nh), flags=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(alpha > 8)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return img[y0:y1, x0:x1], alpha[y0:y1, x0:x1]
