"""Reading, converting, resizing and writing images, with errors that name the image."""

from __future__ import annotations

import io
import os
import stat
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import Tensor

from pipeline.errors import ImageError

# Modes PIL decodes that carry no colour we can place in sRGB without guessing.
_REFUSED_MODES = {"F": "32-bit float pixels have no defined range"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


# Limits against decompression bombs and runaway downloads; the batch job's config sets its own.
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 64_000_000  # about 190 MB decoded as 8-bit RGB
READ_ATTEMPTS = 3  # tries of one read: botocore's own for S3 (standard mode), ours for the rest
READ_TIMEOUT_S = 60.0  # all the tries of one read together: a stalled store ends as read_failed
READ_BACKOFF_S = 0.5  # our tries wait 0.5 s, then 1 s


def read_bytes(
    source: str | bytes,
    name: str | None = None,
    storage_options: dict | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout_s: float = READ_TIMEOUT_S,
    attempts: int = READ_ATTEMPTS,
) -> bytes:
    """The raw bytes of an image given as bytes, a local path or any fsspec URI.

    A missing object or a refused one is permanent and fails at once; any other storage error is
    tried ``attempts`` times in all, and every try together takes at most ``timeout_s`` (then
    ``read_failed``). A local file that is not a regular file (a named pipe, a device) is refused
    before it is opened: reading one could wait forever. An object larger than ``max_bytes`` is
    refused from its size, unread."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = _read_with_retries(source, name, storage_options or {}, max_bytes, timeout_s, attempts)
    if len(data) > max_bytes:
        raise ImageError(
            f"image {name!r}: larger than the {max_bytes}-byte limit (max_image_bytes)", "too_large"
        )
    return data


def _is_s3(uri: str) -> bool:
    return urlparse(uri).scheme in ("s3", "s3a")


def _s3_client_settings(storage_options: dict, timeout_s: float, attempts: int) -> dict:
    """botocore retries in its standard mode (throttling and 5xx, with backoff), each request
    given its share of the read's time to connect and between bytes (the defaults wait 60 s)."""
    per_request = timeout_s / attempts
    config = {
        **storage_options.get("config_kwargs", {}),
        "connect_timeout": per_request,
        "read_timeout": per_request,
        "retries": {"mode": "standard", "total_max_attempts": attempts},
    }
    return {**storage_options, "config_kwargs": config}


def _read_with_retries(
    uri: str, name: str, storage_options: dict, max_bytes: int, timeout_s: float, attempts: int
) -> bytes:
    started = time.monotonic()
    deadline = started + timeout_s
    if _is_s3(uri):  # botocore retries: one more loop here would multiply its tries
        storage_options, tries = _s3_client_settings(storage_options, timeout_s, attempts), 1
    else:
        tries = attempts
    for attempt in range(tries):
        try:
            return _read_once(uri, name, storage_options, max_bytes, deadline, timeout_s / attempts)
        except ImageError:
            raise
        except FileNotFoundError as exc:
            raise ImageError(f"image {name!r}: not found", "not_found") from exc
        except PermissionError as exc:
            raise ImageError(f"image {name!r}: access denied: {exc}", "access_denied") from exc
        except IsADirectoryError as exc:
            raise ImageError(f"image {name!r}: is a folder, not a file", "bad_image") from exc
        except Exception as exc:
            status = getattr(exc, "status", None)  # HTTP errors carry their status
            if status in (401, 403):
                raise ImageError(f"image {name!r}: access denied: HTTP {status}", "access_denied") from exc
            if status in (404, 410):
                raise ImageError(f"image {name!r}: not found: HTTP {status}", "not_found") from exc
            backoff = READ_BACKOFF_S * 2**attempt
            if attempt + 1 == tries or time.monotonic() + backoff >= deadline:
                raise ImageError(
                    f"image {name!r}: cannot read it (up to {attempts} attempts, "
                    f"{time.monotonic() - started:.1f} s of the {timeout_s:g} s allowed): {_describe(exc)}",
                    "read_failed",
                ) from exc
            time.sleep(backoff)
    raise AssertionError("unreachable")


def _describe(exc: Exception) -> str:
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "FSTimeoutError":
        return "no answer in time (a stalled store or server)"
    return f"{type(exc).__name__}: {exc}"


def _read_once(
    uri: str, name: str, storage_options: dict, max_bytes: int, deadline: float, per_request_s: float
) -> bytes:
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        return _get(uri, max_bytes + 1, deadline, per_request_s)
    if scheme in ("", "file"):
        return _read_local(os.path.expanduser(urlparse(uri).path if scheme else uri), name, max_bytes)
    return _read_object(uri, name, storage_options, max_bytes, deadline)


_SPECIAL_FILES = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _refuse_special_file(mode: int, name: str) -> None:
    if stat.S_ISDIR(mode):
        raise ImageError(f"image {name!r}: is a folder, not a file", "bad_image")
    if not stat.S_ISREG(mode):
        kind = _SPECIAL_FILES.get(stat.S_IFMT(mode), "a special file")
        raise ImageError(f"image {name!r}: is {kind}, not a regular file", "bad_image")


def _read_local(path: str, name: str, max_bytes: int) -> bytes:
    """A regular file's first bytes. A named pipe or device is refused from its stat, unopened;
    the open does not wait either (O_NONBLOCK), and the opened file is checked again, in case a
    pipe took the file's place in between."""
    _refuse_special_file(os.stat(path).st_mode, name)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        _refuse_special_file(os.fstat(f.fileno()).st_mode, name)
        return f.read(max_bytes + 1)


def _read_object(uri: str, name: str, storage_options: dict, max_bytes: int, deadline: float) -> bytes:
    """An object's bytes through fsspec: its size first (a HEAD: too large is refused unread),
    then one GET. Async stores (S3, GCS, HTTP) stop each call at the deadline."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if _is_s3(uri):
        fs.retries = 1  # s3fs retries SlowDown 5 times over botocore's tries; botocore's are enough

    def bounded() -> dict:  # fsspec takes 0 as "no limit"
        return {"timeout": max(deadline - time.monotonic(), 0.01)} if getattr(fs, "async_impl", False) else {}

    info = fs.info(path, **bounded())
    if info.get("type") == "directory":
        raise ImageError(f"image {name!r}: is a folder, not a file", "bad_image")
    size = info.get("size")
    if size is not None and size > max_bytes:
        raise ImageError(
            f"image {name!r}: {size} bytes, larger than the {max_bytes}-byte limit (max_image_bytes)",
            "too_large",
        )
    return b"" if size == 0 else fs.cat_file(path, **bounded())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ImageError(
            f"image {req.full_url!r}: redirects to {newurl!r}; redirects are not followed", "not_allowed"
        )


def _get(url: str, limit: int, deadline: float, per_request_s: float) -> bytes:
    """One GET of at most ``limit`` bytes, done by ``deadline``. Hand-written on urllib: fsspec's
    HTTP filesystem first probes the size and reports any failure of the probe (403, 503) as "not
    found", hiding the status that says whether to retry; and redirects are refused, so an
    allowed host cannot send the reader to an address the allow-list would refuse. A server
    that sends a byte now and then is cut off at the deadline, not at each socket timeout."""
    timeout = max(0.01, min(per_request_s, deadline - time.monotonic()))
    chunks, size = [], 0
    with urllib.request.build_opener(_NoRedirects).open(url, timeout=timeout) as response:
        while size < limit:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: the answer did not end in time")
            chunk = response.read(min(2**20, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


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
    timeout_s: float = READ_TIMEOUT_S,
    attempts: int = READ_ATTEMPTS,
) -> Tensor:
    """Read, convert to RGB and resize one image: ``[3, size, size]`` in ``[0, 1]``."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    data = read_bytes(source, name, storage_options, max_bytes, timeout_s, attempts)
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


# The batch sheets' tile: 4x a 64 px model's output, half of SD 1.5's 512 px, a third of SD 2's 768 px.
SHEET_TILE = 256
LABEL_LINES = 3  # a caption's most lines under its tile; a longer one ends with an ellipsis
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def contact_sheet(
    rows: Sequence[Sequence[Tensor]],
    pad: int = 2,
    labels: Sequence[Sequence[str | None]] | None = None,
    tile: int | None = None,
) -> Image.Image:
    """A grid of images, one list per row, on white; rows may differ in length. ``tile`` resizes
    each image so its longer side is that many pixels; ``labels`` (one caption or None per image,
    rows as in ``rows``) are written in black under the images, wrapped to the cell's width in at
    most ``LABEL_LINES`` lines."""
    if labels is not None and [len(r) for r in labels] != [len(r) for r in rows]:
        raise ValueError(
            f"contact sheet: labels per row {[len(r) for r in labels]} do not match images per row "
            f"{[len(r) for r in rows]}"
        )
    tiles = [[_sheet_tile(to_pil(t), tile) for t in row] for row in rows]
    w = max(t.width for row in tiles for t in row)
    h = max(t.height for row in tiles for t in row)
    font, line = _caption_font(w)
    band = LABEL_LINES * line + 4 if labels is not None else 0  # the same under every row
    columns = max(len(row) for row in tiles)
    cell_h = h + band
    sheet = Image.new("RGB", (columns * (w + pad) + pad, len(tiles) * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(tiles):
        for c, image in enumerate(row):
            x, y = pad + c * (w + pad), pad + r * (cell_h + pad)
            sheet.paste(image, (x, y))
            caption = labels[r][c] if labels is not None else None
            for n, text in enumerate(wrap_caption(caption or "", font, w - 4)):
                draw.text((x + 2, y + h + 2 + n * line), text, fill="black", font=font)
    return sheet


def edit_caption(target: str, eta: float) -> str:
    """An edit's caption on a contact sheet: its eta first, so a long prompt cannot cut it off."""
    return f"eta {eta:g}: {target}"


def _sheet_tile(image: Image.Image, tile: int | None) -> Image.Image:
    if tile is None or max(image.size) == tile:
        return image
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # A whole-number upscale repeats pixels (NEAREST): a small model's output is shown as it is,
    # not smoothed into detail it lacks; any other scale needs LANCZOS's filtering against aliasing.
    whole = tile % max(image.size) == 0
    return image.resize(size, Image.Resampling.NEAREST if whole else Image.Resampling.LANCZOS)


def _caption_font(width: int) -> tuple[Font, int]:
    """Pillow's own font at a size for captions under tiles ``width`` px wide (12 px at 256), and
    its line height: from the size, not the glyphs, so a sheet's size depends on no font file."""
    size = max(10, width // 20)
    return ImageFont.load_default(size=size), size * 4 // 3


def wrap_caption(text: str, font: Font, width: float, lines: int = LABEL_LINES) -> list[str]:
    """``text`` in at most ``lines`` lines of at most ``width`` pixels in ``font``, broken at
    spaces (and inside a word wider than a line); text left over ends the last line with an
    ellipsis."""
    out: list[str] = []
    current = ""
    for word in text[: int(lines * width)].split():  # no glyph is under 1 px: the rest cannot show
        if len(out) > lines:
            break
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            out.append(current)
        current = word
        while len(current) > 1 and font.getlength(current) > width and len(out) <= lines:
            n = _fitting(current, font, width)
            out.append(current[:n])
            current = current[n:]
    if current:
        out.append(current)
    if len(out) <= lines:
        return out
    last = out[lines - 1]
    while last and font.getlength(last + "\u2026") > width:
        last = last[:-1]
    return [*out[: lines - 1], last.rstrip() + "\u2026"]


def _fitting(text: str, font: Font, width: float) -> int:
    """How many of ``text``'s first characters fit in ``width`` (at least one): a binary search,
    as a caption may be one very long word."""
    low, high = 1, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if font.getlength(text[:middle]) <= width else (low, middle - 1)
    return low


def save_png(pixels: Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(pixels).save(path)
    return path
