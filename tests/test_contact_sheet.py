"""Contact sheets: tiles at the size asked for, a caption under each, and ``jobs.run``'s sheet of
an output, which never fails the job. No Ray, no model."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFont

from pipeline.batch.output import Output
from pipeline.batch.report import edit_rows, short_id, write_contact_sheet
from pipeline.io.images import to_tensor
from pipeline.io.sheets import LABEL_LINES, SHEET_TILE, contact_sheet, edit_caption, wrap_caption
from pipeline.io.storage import Location
from schemas import results as res

BAND = LABEL_LINES * 16 + 4  # three 16 px lines (12 px type under 256 px tiles) and a margin


def dark(array: np.ndarray) -> int:
    return int((array.min(axis=-1) < 128).sum())


def test_a_labelled_sheet_writes_each_caption_under_its_upscaled_tile(pixels):
    a, b, c = pixels  # three 64x64 photographs
    rows = [[a, b], [c]]
    labels = [["astronaut", "eta 0.8: a photo of a robot"], [None]]
    sheet = np.asarray(contact_sheet(rows, pad=2, labels=labels, tile=256))
    assert sheet.shape == (2 * (256 + BAND + 2) + 2, 2 * (256 + 2) + 2, 3)

    def band(row: int, column: int) -> np.ndarray:  # cells are 256 + 52 high and 256 wide, padded by 2
        top, left = 2 + row * 310 + 256, 2 + column * 258
        return sheet[top : top + BAND, left : left + 256]

    assert dark(band(0, 0)) > 50 and dark(band(0, 1)) > 50, "black text under each labelled tile"
    assert dark(band(1, 0)) == 0, "no caption: a white band"
    assert not np.array_equal(band(0, 0), band(0, 1)), "different captions, different pixels"
    # 64 -> 256 is a whole-number upscale: each model pixel becomes a 4x4 block, nothing smoothed.
    tile = (b.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(sheet[2:258, 260:516], tile.repeat(4, axis=0).repeat(4, axis=1))

    plain = np.asarray(contact_sheet(rows, pad=2, tile=256))
    assert plain.shape == (2 * 258 + 2, 2 * 258 + 2, 3), "no labels: no band, the old geometry"
    assert np.array_equal(plain[2:258, 2:258], sheet[2:258, 2:258])
    # Without ``tile`` every image keeps its size: old callers get the sheet they had.
    assert contact_sheet(rows, pad=2).size == (2 * 66 + 2, 2 * 66 + 2)


def test_a_tile_that_is_no_whole_multiple_is_filtered_to_its_size(pixels):
    sheet = contact_sheet([[pixels[0]]], pad=0, tile=100)
    assert sheet.size == (100, 100)
    wide = torch.nn.functional.interpolate(pixels[:1], size=(32, 64), mode="area")[0]  # 64 wide, 32 high
    assert contact_sheet([[wide]], pad=0, tile=SHEET_TILE).size == (256, 128)


def test_a_long_caption_wraps_to_three_lines_and_ends_with_an_ellipsis():
    font = ImageFont.load_default(size=12)
    text = "a watercolor painting of a cat wearing a tall green hat, sitting on a red chair by a window"
    lines = wrap_caption(text, font, 252)
    assert len(lines) == 2 and " ".join(lines) == text  # fits in two lines of 256 px tiles
    lines = wrap_caption(text * 3, font, 252)
    assert len(lines) == 3 and lines[-1].endswith("\u2026")
    assert all(font.getlength(line) <= 252 for line in lines)
    assert " ".join(lines)[:-1] in text * 3
    unbroken = wrap_caption("x" * 300, font, 100)  # a word wider than a line is cut inside
    assert len(unbroken) == 3 and unbroken[-1].endswith("\u2026")
    assert all(font.getlength(line) <= 100 for line in unbroken)
    assert wrap_caption("", font, 100) == []


def test_a_long_caption_draws_three_lines_and_no_more(pixels):
    one = np.asarray(contact_sheet([[pixels[0]]], labels=[["short"]], tile=256))
    many = np.asarray(contact_sheet([[pixels[0]]], labels=[["a long prompt " * 40]], tile=256))
    rows_with_ink = lambda a: np.flatnonzero((a[258:, 2:258].min(axis=-1) < 128).any(axis=1))  # noqa: E731
    assert rows_with_ink(one).max() < 16 and rows_with_ink(many).max() >= 2 * 16
    assert one.shape == many.shape, "the band does not grow with the caption"


def test_labels_must_match_the_images_row_by_row(pixels):
    with pytest.raises(ValueError, match=r"labels per row \[1\] do not match images per row \[2\]"):
        contact_sheet([[pixels[0], pixels[1]]], labels=[["only one"]])


def test_captions_put_the_eta_first_and_shorten_long_ids():
    assert edit_caption("a photo of a tiger", 0.800000011920929) == "eta 0.8: a photo of a tiger"
    assert short_id("astronaut") == "astronaut"
    long_id = "s3://bucket/" + "x" * 100 + "/photo-0042.jpg"
    assert len(short_id(long_id)) == 40 and short_id(long_id).endswith("x/photo-0042.jpg"[-15:])


def write_output(tmp_path, photos) -> tuple[Output, Location, str]:
    """An output as jobs.run leaves it: one input, two edits in its results table."""
    source = tmp_path / "astronaut.png"
    Image.fromarray(photos["astronaut"]).save(source)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"id": ["astronaut"], "image": [str(source)]}), manifest)
    output = Output.at(str(tmp_path / "out"))
    rows = []
    for t, (prompt, eta) in enumerate([("a photo of a robot", 0.8), ("a photo of a horse", 1.0)]):
        path = tmp_path / "out" / "images" / f"{t}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos["coffee"][:64, t * 64 : t * 64 + 64]).save(path)
        rows.append(
            {
                res.ID: "astronaut",
                res.TARGET_INDEX: t,
                res.TARGET_PROMPT: prompt,
                res.ETA: eta,
                res.GUIDANCE: 7.5,
                res.IMAGE_URI: str(path),
                res.CONFIG_FINGERPRINT: "f",
            }
        )
    (tmp_path / "out" / "results").mkdir()
    table = pa.Table.from_pylist(rows, schema=res.RESULTS_SCHEMA)
    pq.write_table(table, tmp_path / "out" / "results" / "run-20261125T000000-a-0.parquet")
    return output, Location(str(manifest)), str(source)


def test_an_outputs_sheet_captions_the_input_and_each_edit(tmp_path, photos):
    output, manifest, _ = write_output(tmp_path, photos)
    (row,) = edit_rows(output, manifest)
    assert [caption for _, caption in row] == [
        "astronaut",
        "eta 0.8: a photo of a robot",
        "eta 1: a photo of a horse",
    ]
    assert all(pixels.shape == (3, 64, 64) for pixels, _ in row)
    assert torch.equal(row[1][0], to_tensor(Image.open(tmp_path / "out" / "images" / "0.png").convert("RGB")))
    uri = write_contact_sheet(output, manifest, images=4)
    assert uri == output.contact_sheet.uri and uri.endswith("out/contact_sheet.png")
    assert Image.open(tmp_path / "out" / "contact_sheet.png").size == (3 * 258 + 2, 256 + BAND + 4)


def test_a_sheet_that_cannot_be_made_is_a_warning_not_a_failure(tmp_path, photos, caplog):
    output, manifest, source = write_output(tmp_path, photos)
    (tmp_path / "astronaut.png").unlink()  # the input, deleted since the job read it
    with caplog.at_level(logging.WARNING, logger="pipeline.batch.report"):
        assert write_contact_sheet(output, manifest, images=4) is None
    assert not (tmp_path / "out" / "contact_sheet.png").exists()
    (message,) = [r.getMessage() for r in caplog.records if r.name == "pipeline.batch.report"]
    assert message.startswith("no contact sheet for") and "not found" in message
    assert write_contact_sheet(Output.at(str(tmp_path / "empty")), manifest, images=4) is None
