"""Reading an image file as the RGB a viewer would show, or rejecting it with the reason.

Pillow decodes the whole file (``Image.load``), so a truncated or corrupt file raises instead of yielding a half-grey
picture, as OpenCV's decoder does with a warning. Then:

* EXIF orientation is applied (``ImageOps.exif_transpose``): a photo taken on its side is shown upright;
* grayscale, palette and CMYK images become RGB (``Image.convert``);
* an alpha channel is composited over white, as an image viewer on a white page shows it;
* 16-bit and 32-bit integer images are scaled to 8 bits by their type's full range (65535 -> 255), not clipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from knexp.data.data_errors import ImageError

WHITE = (255, 255, 255)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a decoded Pillow image of any mode."""
    if img.mode.startswith("I"):  # 16-bit ("I;16*"), or 32-bit integer ("I") holding 16-bit data unless it exceeds it
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, None)  # [H, W]
        top = max(65535, int(wide.max())) if img.mode == "I" else 65535
        gray = (wide * 255 // top).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        flt = np.nan_to_num(np.asarray(img, dtype=np.float64))
        span = float(flt.max() - flt.min()) or 1.0
        gray = ((flt - flt.min()) / span * 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        page = Image.new("RGBA", rgba.size, WHITE + (255,))
        return np.asarray(Image.alpha_composite(page, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def read_rgb(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of the image file at ``path``, upright (EXIF); ``ImageError`` naming the file and why it
    cannot be used if it is missing, truncated, corrupt or not an image."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decodes everything: a truncated file raises here
                upright = ImageOps.exif_transpose(img)
                return np.ascontiguousarray(_to_rgb(upright))
    except UnidentifiedImageError as exc:
        raise ImageError(f"image {path} is not an image file Pillow can read ({exc})") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(f"image {path} is truncated or corrupt ({exc})") from exc
