"""Image files made to look like MNIST's (for `mnist-predict` and `data=image_folder`), with
NumPy and Pillow only: grayscale, light ink on dark, and unless the size is right already, the
ink's bounding box scaled to 20/28 of the frame and centred by its centre of mass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist_exp.errors import UserError

SIZE = 28  # MNIST's images are 28x28 ...
BOX_SHARE = 20 / SIZE  # ... each digit fitted into the central 20x20


def read_image(path: Path) -> Image.Image:
    """The image in `path`, or a `UserError` saying why there is none."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError as exc:
        raise UserError(f"{path}: no such file") from exc
    except UnidentifiedImageError as exc:
        raise UserError(f"{path} is not an image file (PNG, JPEG, BMP, ...)") from exc
    except OSError as exc:
        raise UserError(f"{path}: cannot read the image ({exc.strerror or exc})") from exc


def mnist_pixels(image: Image.Image, size: int = SIZE) -> np.ndarray:
    """A float32 `size` x `size` array of pixels in [0, 255]: bright ink on black, fitted like
    MNIST (28: MNIST's own size)."""
    if "A" in image.getbands():  # transparent parts become white paper
        paper = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:
        gray = 255 - gray
    if gray.shape == (size, size):
        return gray
    return _fit(gray, size)


def _fit(gray: np.ndarray, size: int) -> np.ndarray:
    """Scale the ink's bounding box into the central box, centred by its centre of mass."""
    ink = gray > 0.1 * gray.max() if gray.max() > 0 else np.zeros_like(gray, dtype=bool)
    if not ink.any():
        return _resize(gray, size, size)
    rows, cols = np.nonzero(ink)
    crop = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = round(size * BOX_SHARE) / max(crop.shape)
    height, width = (max(1, round(n * scale)) for n in crop.shape)
    digit = _resize(crop, height, width)
    weights = digit.sum() or 1.0
    centre_y = (digit.sum(1) * np.arange(height)).sum() / weights
    centre_x = (digit.sum(0) * np.arange(width)).sum() / weights
    top = min(max(round(size / 2 - centre_y), 0), size - height)
    left = min(max(round(size / 2 - centre_x), 0), size - width)
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + height, left : left + width] = digit
    return out


def _resize(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(gray.clip(0, 255).astype(np.uint8))
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.float32)
