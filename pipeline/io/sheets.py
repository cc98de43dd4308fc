"""Contact sheets: images in a grid on white, each with its caption wrapped under its tile."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from pipeline.io.images import to_pil

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
