"""Reading, converting, resizing and writing images, with errors that name the image."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from pipeline.errors import ImageError

# Modes PIL decodes that carry no colour we can place in sRGB without guessing.
_REFUSED_MODES = {"F": "32-bit float pixels have no defined range"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def read_bytes(source: str | bytes, name: str | None = None, storage_options: dict | None = None) -> bytes:
    """The raw bytes of an image given as bytes, a local path or any fsspec URI."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    import fsspec

    try:
        with fsspec.open(source, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ImageError(f"image {name or source!r}: not found") from exc
    except Exception as exc:
        raise ImageError(f"image {name or source!r}: cannot read: {type(exc).__name__}: {exc}") from exc


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """Decode to 8-bit RGB: grayscale, palette, CMYK, alpha (composited on white) and 16-bit
    images are converted; anything else is refused with the reason."""
    if not data:
        raise ImageError(f"image {name!r}: the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as exc:
        raise ImageError(f"image {name!r}: not an image format PIL can read") from exc
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


def load_image(
    source: str | bytes, size: int, name: str | None = None, storage_options: dict | None = None
) -> Tensor:
    """Read, convert to RGB and resize one image: ``[3, size, size]`` in ``[0, 1]``."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    return to_tensor(center_square(decode_rgb(read_bytes(source, name, storage_options), name), size))


def to_pil(pixels: Tensor) -> Image.Image:
    """``[3, H, W]`` in ``[0, 1]`` to an 8-bit RGB image."""
    array = (pixels.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round()
    return Image.fromarray(array.astype(np.uint8), "RGB")


def encode_png(pixels: Tensor) -> bytes:
    buffer = io.BytesIO()
    to_pil(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def contact_sheet(rows: Sequence[Sequence[Tensor]], pad: int = 2) -> Image.Image:
    """A grid of images, one list per row, on white; rows may differ in length."""
    tiles = [[to_pil(t) for t in row] for row in rows]
    w = max(t.width for row in tiles for t in row)
    h = max(t.height for row in tiles for t in row)
    columns = max(len(row) for row in tiles)
    sheet = Image.new("RGB", (columns * (w + pad) + pad, len(tiles) * (h + pad) + pad), "white")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def save_png(pixels: Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(pixels).save(path)
    return path
