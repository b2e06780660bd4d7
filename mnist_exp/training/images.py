"""Image files made to look like MNIST's (for `mnist-predict` and `data=image_folder`), with
NumPy and Pillow only: grayscale or RGB, light ink on dark, and unless the size is right
already, the ink's bounding box scaled to 20/28 of the frame and centred by its centre of mass."""

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


def mnist_pixels(image: Image.Image, size: int = SIZE, channels: int | None = 1) -> np.ndarray:
    """A float32 `C x size x size` array of pixels in [0, 255]: bright ink on black, fitted like
    MNIST (28: MNIST's own size). `channels`: 1 gray, 3 RGB, None 3 if the image has colour
    else 1. Inversion, ink box and centring follow the luminance; every channel moves alike."""
    if "A" in image.getbands():  # transparent parts become white paper
        paper = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    rgb = colour(image) if channels != 1 else None
    planes = gray[None] if rgb is None else np.moveaxis(rgb, -1, 0)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:
        gray, planes = 255 - gray, 255 - planes
    if gray.shape != (size, size):
        planes = _fit(planes, gray, size)
    return np.repeat(planes, 3, axis=0) if channels == 3 and len(planes) == 1 else planes


def colour(image: Image.Image) -> np.ndarray | None:
    """The image's float32 RGB pixels `H x W x 3`, or None when it has no colour (every pixel's
    red, green and blue equal, as in a gray image saved as RGB)."""
    if len(image.getbands()) == 1 and image.mode != "P":  # one band, no palette: gray
        return None
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return None if (rgb == rgb[..., :1]).all() else rgb


def _fit(planes: np.ndarray, gray: np.ndarray, size: int) -> np.ndarray:
    """Scale the ink's bounding box (in `gray`, the luminance) into the central box, centred by
    its centre of mass, and each of `planes` (channels x H x W) alike."""
    ink = gray > 0.1 * gray.max() if gray.max() > 0 else np.zeros_like(gray, dtype=bool)
    if not ink.any():
        return np.stack([_resize(plane, size, size) for plane in planes])
    rows, cols = np.nonzero(ink)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    crop = gray[box]
    scale = round(size * BOX_SHARE) / max(crop.shape)
    height, width = (max(1, round(n * scale)) for n in crop.shape)
    placed = [_resize(plane[box], height, width) for plane in planes]
    digit = placed[0] if len(placed) == 1 else _resize(crop, height, width)  # gray: the same
    weights = digit.sum() or 1.0
    centre_y = (digit.sum(1) * np.arange(height)).sum() / weights
    centre_x = (digit.sum(0) * np.arange(width)).sum() / weights
    top = min(max(round(size / 2 - centre_y), 0), size - height)
    left = min(max(round(size / 2 - centre_x), 0), size - width)
    out = np.zeros((len(planes), size, size), dtype=np.float32)
    out[:, top : top + height, left : left + width] = placed
    return out


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(plane.clip(0, 255).astype(np.uint8))
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.float32)
