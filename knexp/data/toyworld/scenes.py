"""Toy-world scenes: textured backgrounds with 1-3 non-overlapping sprites, and their captions.

A scene is fully determined by its seed. Training scenes may also hold *ghosts*: objects that were
drawn and then inpainted away (Telea or Navier-Stokes over a dilated box), whose words the caption
leaves out, so that a model learns not to name objects on inpainted patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from knexp.counterfactual.inpaint import inpaint, region_mask
from knexp.data.catalog import Catalog, Knowledge
from knexp.data.toyworld.sprites import render_sprite
from knexp.settings import Integer, Many, Number, SettingError, check_fields
from knexp.user_errors import ConfigError

BACKGROUNDS = ("gradient", "noise", "stripes", "grass", "wood", "tiles", "sky")
EMPTY_CAPTION = "The image shows an empty scene."


@dataclass
class SceneOptions:
    """How scenes are drawn. Defaults are the dataset's; training adds ghosts and empty scenes."""

    size: int = 224
    min_objects: int = 1
    max_objects: int = 3
    object_px: tuple[int, int] = (60, 120)  # longer side of a sprite, before rotation
    gap_px: int = 4  # free pixels between boxes
    empty_prob: float = 0.0  # chance of a scene with no visible object
    ghost_prob: float = 0.0  # chance of one extra object inpainted away
    ghost_dilation: tuple[int, int] = (2, 8)
    ghost_radius: tuple[int, int] = (3, 7)
    ghost_methods: tuple[str, ...] = ("telea", "ns")

    def __post_init__(self):
        """Check the settings a split is drawn with (``data.scene.*``; training's probabilities are ``task.*``)."""
        check_fields(self, "data.scene", size=Integer(low=32), min_objects=Integer(low=0), max_objects=Integer(low=0),
                     object_px=Many(Integer(low=24), min_len=2), gap_px=Integer(low=0))
        check_fields(self, "task", empty_prob=Number(0.0, 1.0), ghost_prob=Number(0.0, 1.0))
        lo, hi = self.object_px[0], self.object_px[-1]
        if len(self.object_px) != 2 or lo > hi or hi > self.size - 2:
            raise SettingError("data.scene.object_px", list(self.object_px),
                               f"use [smallest, largest] with 24 <= smallest <= "
                               f"largest <= data.scene.size - 2 = {self.size - 2}")
        if self.max_objects < self.min_objects:
            raise SettingError("data.scene.max_objects", self.max_objects,
                               f"use at least data.scene.min_objects={self.min_objects}")
        self.object_px = (lo, hi)


@dataclass
class PlacedObject:
    knowledge: Knowledge
    bbox: tuple[int, int, int, int]  # x, y, w, h (COCO order)
    mask: np.ndarray  # bool [H, W]


@dataclass
class Scene:
    image: np.ndarray  # RGB uint8 [H, W, 3]
    objects: list[PlacedObject]
    background: str
    caption: str
    ghosts: list[PlacedObject] = field(default_factory=list)


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted textured background [size, size, 3] uint8 of the given kind."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def smooth(cells: int, scale: float) -> np.ndarray:
        return cv2.resize(rng.normal(0, scale, (cells, cells)).astype(np.float32), (size, size),
                          interpolation=cv2.INTER_CUBIC)

    def muted() -> np.ndarray:
        return rng.uniform(90, 200, 3) * 0.6 + 0.4 * rng.uniform(110, 170)

    if kind == "gradient":
        a, b, t = muted(), muted(), rng.uniform(0, np.pi)
        w = (np.cos(t) * xx + np.sin(t) * yy)[..., None]
        img = a + (b - a) * (w - w.min()) / (np.ptp(w) + 1e-6)
    elif kind == "noise":
        img = muted() + smooth(8, 18)[..., None] + smooth(32, 6)[..., None]
    elif kind == "stripes":
        t, period = rng.uniform(0, np.pi), rng.uniform(10, 30)
        s = np.sin(2 * np.pi * (np.cos(t) * xx + np.sin(t) * yy) * size / period)[..., None]
        img = muted() + 12 * s
    elif kind == "grass":
        img = np.array([70, 130, 60]) + rng.normal(0, 10, 3) + smooth(40, 14)[..., None] * np.array([0.6, 1.0, 0.5])
    elif kind == "wood":
        grain = np.sin(yy * rng.uniform(30, 60) + 2.5 * smooth(6, 1.0))[..., None]
        img = np.array([150, 105, 65]) + rng.normal(0, 10, 3) + 14 * grain
    elif kind == "tiles":
        period = int(rng.integers(20, 40))
        grid = ((np.mgrid[0:size, 0:size] % period) < 2).any(0)[..., None]
        img = np.where(grid, muted() * 0.75, muted())
    elif kind == "sky":
        top, bottom = np.array([90, 140, 215]), np.array([190, 215, 240])
        img = top + (bottom - top) * yy[..., None] + rng.normal(0, 8, 3)
    else:
        raise ConfigError(f"unknown background {kind!r}; choose from {BACKGROUNDS}")
    img = img + rng.normal(0, 3, (size, size, 3))  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def caption_for(objects: list[Knowledge], rng: np.random.Generator | None = None) -> str:
    """"The image shows a banana and an umbrella." (objects in the given order; shuffled if ``rng``)."""
    if not objects:
        return EMPTY_CAPTION
    order = list(objects)
    if rng is not None:
        rng.shuffle(order)
    parts = [k.indefinite for k in order]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"The image shows {listed}."


def _place(occupied: list[tuple[int, int, int, int]], w: int, h: int, size: int, gap: int,
           rng) -> tuple[int, int] | None:
    if w > size - 2 or h > size - 2:
        return None
    for _ in range(60):
        x, y = int(rng.integers(1, size - w)), int(rng.integers(1, size - h))
        if all(x + w + gap <= ox or ox + ow + gap <= x or y + h + gap <= oy or oy + oh + gap <= y
               for ox, oy, ow, oh in occupied):
            return x, y
    return None


def _paste(canvas: np.ndarray, sprite: np.ndarray, alpha: np.ndarray, x: int, y: int) -> np.ndarray:
    """Alpha-composite the sprite at (x, y); returns the instance mask (bool [H, W], holes filled)."""
    h, w = alpha.shape
    a = (alpha.astype(np.float32) / 255.0)[..., None]
    region = canvas[y : y + h, x : x + w].astype(np.float32)
    canvas[y : y + h, x : x + w] = (a * sprite + (1 - a) * region).round().astype(np.uint8)
    mask = np.zeros(canvas.shape[:2], np.uint8)
    mask[y : y + h, x : x + w] = alpha > 127
    # the instance region is the filled outline (COCO convention): a racket's strings, a wheel's spokes
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(mask, contours, -1, 1, thickness=cv2.FILLED).astype(bool)


def make_scene(catalog: Catalog, rng: np.random.Generator, opts: SceneOptions | None = None) -> Scene:
    """Draw one scene: background, ``min..max_objects`` distinct objects, optional ghost; then caption it."""
    opts = opts or SceneOptions()
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    image = background(kind, opts.size, rng)
    n = 0 if rng.random() < opts.empty_prob else int(rng.integers(opts.min_objects, opts.max_objects + 1))
    with_ghost = rng.random() < opts.ghost_prob
    names = [str(x) for x in rng.choice(catalog.names, n + int(with_ghost), replace=False)]
    placed: list[PlacedObject] = []
    occupied: list[tuple[int, int, int, int]] = []
    for i, name in enumerate(names):
        last_ghost = with_ghost and i == len(names) - 1
        ghost_gap = opts.ghost_dilation[1] + opts.ghost_radius[1] + opts.gap_px if last_ghost else opts.gap_px
        size = int(rng.integers(opts.object_px[0], opts.object_px[1] + 1))
        spot = None
        for _ in range(6):  # shrink until it fits beside what is already there
            sprite, alpha = render_sprite(name, size, rng)
            spot = _place(occupied, alpha.shape[1], alpha.shape[0], opts.size, ghost_gap, rng)
            if spot is not None:
                break
            size = max(24, int(size * 0.85))
        if spot is None:
            continue
        mask = _paste(image, sprite, alpha, *spot)
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        occupied.append((spot[0], spot[1], alpha.shape[1], alpha.shape[0]))
        placed.append(PlacedObject(catalog[name], bbox, mask))
    ghosts: list[PlacedObject] = []
    if with_ghost and len(placed) == len(names):
        ghost = placed.pop()
        region = region_mask(image.shape[:2], bbox=ghost.bbox,
                             dilation=int(rng.integers(*opts.ghost_dilation, endpoint=True)))
        method = opts.ghost_methods[int(rng.integers(len(opts.ghost_methods)))]
        image = inpaint(image, region, int(rng.integers(*opts.ghost_radius, endpoint=True)), method)
        ghosts.append(ghost)
    caption = caption_for([o.knowledge for o in placed], rng)
    return Scene(image=image, objects=placed, background=kind, caption=caption, ghosts=ghosts)

