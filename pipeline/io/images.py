"""Reading, converting, resizing and writing images, with errors that name the image."""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request
import warnings
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


# Limits against decompression bombs and runaway downloads; the batch job's config sets its own.
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 64_000_000  # about 190 MB decoded as 8-bit RGB
READ_ATTEMPTS = 3  # a transient storage error (timeout, 5xx, dropped connection) is retried ...
READ_BACKOFF_S = 0.5  # ... after 0.5 s, then 1 s


def read_bytes(
    source: str | bytes,
    name: str | None = None,
    storage_options: dict | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> bytes:
    """The raw bytes of an image given as bytes, a local path or any fsspec URI.

    A missing object or a refused one is permanent and fails at once; any other storage error is
    retried with backoff (s3fs retries some of its own too; HTTP and others do not). An object
    larger than ``max_bytes`` is refused without reading the rest of it."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = _read_with_retries(source, name, storage_options or {}, max_bytes)
    if len(data) > max_bytes:
        raise ImageError(
            f"image {name!r}: larger than the {max_bytes}-byte limit (max_image_bytes)", "too_large"
        )
    return data


def _read_with_retries(uri: str, name: str, storage_options: dict, max_bytes: int) -> bytes:
    import fsspec

    web = uri.startswith(("http://", "https://"))
    for attempt in range(READ_ATTEMPTS):
        try:
            if web:
                return _get(uri, max_bytes + 1)
            with fsspec.open(uri, "rb", **storage_options) as f:
                return f.read(max_bytes + 1)
        except ImageError:
            raise
        except FileNotFoundError as exc:
            raise ImageError(f"image {name!r}: not found", "not_found") from exc
        except PermissionError as exc:
            raise ImageError(f"image {name!r}: access denied: {exc}", "access_denied") from exc
        except IsADirectoryError as exc:
            raise ImageError(f"image {name!r}: is a folder, not a file", "bad_image") from exc
        except Exception as exc:
            status = getattr(exc, "status", None)  # HTTP (aiohttp) errors carry their status
            if status in (401, 403):
                raise ImageError(f"image {name!r}: access denied: HTTP {status}", "access_denied") from exc
            if status in (404, 410):
                raise ImageError(f"image {name!r}: not found: HTTP {status}", "not_found") from exc
            if attempt + 1 == READ_ATTEMPTS:
                raise ImageError(
                    f"image {name!r}: cannot read after {READ_ATTEMPTS} attempts: "
                    f"{type(exc).__name__}: {exc}",
                    "read_failed",
                ) from exc
            time.sleep(READ_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ImageError(
            f"image {req.full_url!r}: redirects to {newurl!r}; redirects are not followed", "not_allowed"
        )


def _get(url: str, limit: int) -> bytes:
    """One GET of at most ``limit`` bytes. Hand-written on urllib: fsspec's HTTP filesystem
    first probes the size and reports any failure of the probe (403, 503) as "not found",
    hiding the status that says whether to retry; and redirects are refused, so an allowed
    host cannot send the reader to an address the allow-list would refuse."""
    with urllib.request.build_opener(_NoRedirects).open(url, timeout=60) as response:
        return response.read(limit)


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


def load_image(
    source: str | bytes,
    size: int,
    name: str | None = None,
    storage_options: dict | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Tensor:
    """Read, convert to RGB and resize one image: ``[3, size, size]`` in ``[0, 1]``."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    data = read_bytes(source, name, storage_options, max_bytes)
    return to_tensor(center_square(decode_rgb(data, name, max_pixels), size))


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
