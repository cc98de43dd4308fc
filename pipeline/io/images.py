"""Decoding, converting, resizing and writing images, with errors that name the image (their bytes are
read by ``fetch``)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from pipeline.errors import ImageError
from pipeline.io.fetch import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, READ_ATTEMPTS, READ_TIMEOUT_S, read_bytes

# Modes PIL decodes that carry no colour we can place in sRGB without guessing.
_REFUSED_MODES = {"F": "32-bit float pixels have no defined range"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def decode_rgb(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode to 8-bit RGB: grayscale, palette, CMYK, alpha (composited on white) and 16-bit
    images are converted; anything else is refused with the reason. An image of more than
    ``max_pixels`` pixels is refused from its header, before it is decoded."""
    if not data:
        raise ImageError(f"image {name!r}: the file is empty")
    too_large = f"image {name!r}: more than the {max_pixels}-pixel limit (max_image_pixels)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageError(f"image {name!r}: not an image format PIL can read") from exc
        except Image.DecompressionBombError as exc:  # PIL's own limit, if lower than ours
            raise ImageError(f"{too_large}: {exc}", "too_large") from exc
        except Exception as exc:  # a corrupt header
            raise ImageError(f"image {name!r}: cannot decode: {type(exc).__name__}: {exc}") from exc
        width, height = image.size
        if width * height > max_pixels:  # from the header: nothing is decoded yet
            raise ImageError(f"{too_large}: it is {width}x{height}", "too_large")
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{too_large}: {exc}", "too_large") from exc
        except Exception as exc:  # truncated or corrupt data
            raise ImageError(f"image {name!r}: cannot decode: {type(exc).__name__}: {exc}") from exc
    image = ImageOps.exif_transpose(image)  # camera orientation, as viewers show it
    mode = image.mode
    if mode in _REFUSED_MODES:
        raise ImageError(f"image {name!r}: mode {mode} cannot be converted to RGB: {_REFUSED_MODES[mode]}")
    if mode in _SIXTEEN_BIT:
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode != "I" or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    try:
        return image.convert("RGB")
    except Exception as exc:
        raise ImageError(f"image {name!r}: mode {mode} cannot be converted to RGB: {exc}") from exc


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre square (null-text inversion's
    ``load_512``, with a proper resampling filter)."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> Tensor:
    """``[3, H, W]`` float32 in ``[0, 1]``."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def read_image(
    source: str | bytes,
    size: int,
    name: str | None = None,
    storage_options: dict | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    timeout_s: float = READ_TIMEOUT_S,
    attempts: int = READ_ATTEMPTS,
) -> Image.Image:
    """Read, convert to RGB and resize one image: an 8-bit RGB ``size`` x ``size`` image."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    data = read_bytes(source, name, storage_options, max_bytes, timeout_s, attempts)
    return center_square(decode_rgb(data, name, max_pixels), size)


def load_image(source: str | bytes, size: int, name: str | None = None, **read) -> Tensor:
    """``read_image`` (``read``: its limits and storage options) as ``[3, size, size]`` in ``[0, 1]``."""
    return to_tensor(read_image(source, size, name, **read))


def to_uint8(pixels: Tensor) -> np.ndarray:
    """``[3, H, W]`` in ``[0, 1]`` to ``[H, W, 3]`` 8-bit RGB, rounded."""
    array = (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round()
    return array.astype(np.uint8)


def to_pil(pixels: Tensor) -> Image.Image:
    """``[3, H, W]`` in ``[0, 1]`` to an 8-bit RGB image."""
    return Image.fromarray(to_uint8(pixels), "RGB")


def encode_png(rgb: np.ndarray) -> bytes:
    """``[H, W, 3]`` 8-bit RGB as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(pixels: Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(pixels).save(path)
    return path
