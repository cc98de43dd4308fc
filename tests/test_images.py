"""Images in every mode PIL decodes become the right RGB pixels; unusable ones are refused by name.

The content is scikit-image's photographs, saved through PIL in the mode and format under test. A
square 64x64 crop is loaded at 64, where resizing is the identity, so pixels compare exactly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ImageError, InputError
from pipeline.io.fetch import read_bytes
from pipeline.io.images import center_square, decode_rgb, load_image
from pipeline.io.sheets import contact_sheet

SIZE = 64


def encode(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def as_tensor(image: Image.Image) -> torch.Tensor:
    """What the pixels of an 8-bit RGB image are, ``[3, H, W]`` in ``[0, 1]``, computed here."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.fixture(scope="module")
def cat(photos) -> Image.Image:
    """Chelsea the cat, cropped square at the size images are loaded at (no resampling)."""
    return center_square(Image.fromarray(photos["chelsea"]), SIZE)


def assert_rgb_unit_range(pixels: torch.Tensor, size: int = SIZE) -> None:
    assert pixels.shape == (3, size, size)
    assert pixels.dtype == torch.float32
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0


# --- conversions ---------------------------------------------------------------------------------


def test_grayscale_has_three_equal_channels_holding_the_gray_values(cat):
    gray = cat.convert("L")
    pixels = load_image(encode(gray), SIZE)
    assert_rgb_unit_range(pixels)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    expected = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=1e-6)
    assert float(pixels.std()) > 0.05  # a photograph, not a flat field


def test_grayscale_photo_resized_stays_close_to_its_gray_values(photos):
    gray = Image.fromarray(photos["coffee"]).convert("L")  # 600x400: cropped and resampled
    pixels = load_image(encode(gray, "JPEG"), 32)
    assert_rgb_unit_range(pixels, 32)
    expected = as_tensor(center_square(gray, 32))[0]
    assert float((pixels[0] - expected).abs().mean()) < 0.01


def test_palette_image_becomes_its_palette_colours(cat):
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pixels = load_image(encode(palette), SIZE)
    assert_rgb_unit_range(pixels)
    torch.testing.assert_close(pixels, as_tensor(palette), rtol=0, atol=1e-6)
    assert float((pixels[0] - pixels[2]).abs().max()) > 0.1  # colour kept, not made gray
    assert float((pixels - as_tensor(cat)).abs().mean()) < 0.05  # and close to the photograph


def test_palette_transparency_is_composited_on_white(cat):
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    index = palette.getpixel((0, 0))
    palette.info["transparency"] = index
    data = encode(palette)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    pixels = load_image(data, SIZE)
    clear = torch.from_numpy(np.asarray(palette) == index)
    assert 0 < int(clear.sum()) < SIZE * SIZE
    assert bool((pixels[:, clear] == 1.0).all())
    torch.testing.assert_close(pixels[:, ~clear], as_tensor(palette)[:, ~clear], rtol=0, atol=1e-6)


def test_rgba_is_composited_on_white(cat):
    rgba = cat.convert("RGBA")
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, :20] = 0  # fully transparent: white
    alpha[:, 20:40] = 128  # half: halfway to white
    rgba.putalpha(Image.fromarray(alpha))
    pixels = load_image(encode(rgba), SIZE)
    assert_rgb_unit_range(pixels)
    original = as_tensor(cat)
    assert bool((pixels[:, :, :20] == 1.0).all())
    torch.testing.assert_close(pixels[:, :, 40:], original[:, :, 40:], rtol=0, atol=1e-6)
    half = original[:, :, 20:40] * 128 / 255 + 127 / 255
    torch.testing.assert_close(pixels[:, :, 20:40], half, rtol=0, atol=1.5 / 255)
    assert float(original[:, :, :20].mean()) < 0.8  # the white is the compositing, not the cat


def test_gray_with_alpha_is_composited_on_white(cat):
    gray = cat.convert("L")
    la = gray.convert("LA")
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[SIZE // 2 :] = 0  # bottom half transparent
    la.putalpha(Image.fromarray(alpha))
    data = encode(la)
    assert Image.open(io.BytesIO(data)).mode == "LA"
    pixels = load_image(data, SIZE)
    assert_rgb_unit_range(pixels)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    assert bool((pixels[:, SIZE // 2 :] == 1.0).all())
    expected = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
    torch.testing.assert_close(pixels[0, : SIZE // 2], expected[: SIZE // 2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("format", ["JPEG", "TIFF"])
def test_cmyk_matches_pils_own_conversion(cat, format):
    data = encode(cat.convert("CMYK"), format)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixels = load_image(data, SIZE)
    assert_rgb_unit_range(pixels)
    reference = as_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    torch.testing.assert_close(pixels, reference, rtol=0, atol=1e-6)
    # PIL's RGB -> CMYK -> RGB is lossless, so a TIFF gives the photograph back exactly
    tolerance = 1e-6 if format == "TIFF" else 0.05
    assert float((pixels - as_tensor(cat)).abs().mean()) <= tolerance


def test_sixteen_bit_grayscale_is_scaled_from_65535():
    array = np.zeros((SIZE, SIZE), np.uint16)
    array[:, : SIZE // 2] = 65535
    array[: SIZE // 2, SIZE // 2 :] = 32768
    array[SIZE // 2 :, SIZE // 2 :] = 255  # dark in 16 bits: must not read as white
    data = encode(Image.fromarray(array))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = load_image(data, SIZE)
    assert_rgb_unit_range(pixels)
    assert torch.equal(pixels[0], pixels[2])
    assert bool((pixels[:, :, : SIZE // 2] == 1.0).all())
    assert bool((pixels[:, : SIZE // 2, SIZE // 2 :] == 128 / 255).all())  # ~0.502
    assert bool((pixels[:, SIZE // 2 :, SIZE // 2 :] == 1 / 255).all())


def test_sixteen_bit_photo_keeps_its_content(cat):
    gray = np.asarray(cat.convert("L"), dtype=np.uint16)
    pixels = load_image(encode(Image.fromarray(gray * 257)), SIZE)  # 8 -> 16 bits: 255 * 257 = 65535
    torch.testing.assert_close(pixels[1], torch.from_numpy(gray.astype(np.float32) / 255), rtol=0, atol=1e-6)


def test_one_bit_image_is_black_and_white(cat):
    bw = cat.convert("L").convert("1", dither=Image.Dither.NONE)
    data = encode(bw)
    assert Image.open(io.BytesIO(data)).mode == "1"
    pixels = load_image(data, SIZE)
    assert_rgb_unit_range(pixels)
    assert set(pixels.unique().tolist()) == {0.0, 1.0}
    expected = torch.from_numpy(np.asarray(bw, dtype=np.float32))  # True where white
    assert torch.equal(pixels[0], expected) and torch.equal(pixels[2], expected)


# --- refusals ------------------------------------------------------------------------------------


def truncated(image: Image.Image, format: str) -> bytes:
    data = encode(image, format)
    return data[: len(data) // 2]


REFUSED = {
    "empty.png": (lambda cat: b"", "the file is empty"),
    "captions.png": (lambda cat: b"name,caption\nchelsea,a cat\n", "not an image format PIL can read"),
    "half.png": (lambda cat: truncated(cat, "PNG"), "cannot decode: OSError: image file is truncated"),
    "half.jpg": (lambda cat: truncated(cat, "JPEG"), "cannot decode: OSError: image file is truncated"),
    "depth.tiff": (
        lambda cat: encode(Image.fromarray(np.asarray(cat.convert("L"), np.float32) / 255), "TIFF"),
        "mode F cannot be converted to RGB: 32-bit float pixels have no defined range",
    ),
}


@pytest.mark.parametrize("file_name", list(REFUSED))
def test_unusable_file_is_refused_with_its_name_and_the_problem(cat, tmp_path, file_name):
    make, problem = REFUSED[file_name]
    path = tmp_path / file_name
    path.write_bytes(make(cat))
    if file_name == "depth.tiff":
        assert Image.open(path).mode == "F"  # refused for the right reason: PIL did write floats
    with pytest.raises(ImageError) as error:
        load_image(str(path), SIZE)
    message = str(error.value)
    assert message.startswith(f"image {str(path)!r}: ")
    assert problem in message


@pytest.mark.parametrize("file_name", list(REFUSED))
def test_decoding_bytes_names_the_image_given(cat, file_name):
    make, problem = REFUSED[file_name]
    with pytest.raises(ImageError, match=f"^image 'row 7 of manifest.csv': {problem}"):
        decode_rgb(make(cat), "row 7 of manifest.csv")


def test_missing_file_is_reported_as_not_found(tmp_path):
    path = tmp_path / "holiday" / "beach.jpg"
    with pytest.raises(ImageError) as error:
        load_image(str(path), SIZE)
    assert str(error.value) == f"image {str(path)!r}: not found"
    with pytest.raises(ImageError, match=r"^image 'beach\.jpg': not found$"):
        read_bytes(str(path), name="beach.jpg")
    assert isinstance(error.value, InputError)  # the CLI and the batch jobs report it as bad input


# --- sources -------------------------------------------------------------------------------------


def test_path_file_uri_and_bytes_read_identically(photos, tmp_path):
    path = tmp_path / "astronaut.png"
    Image.fromarray(photos["astronaut"]).save(path)
    raw = path.read_bytes()
    assert read_bytes(str(path)) == raw
    assert read_bytes(f"file://{path}") == raw
    assert read_bytes(raw) == raw and read_bytes(bytearray(raw)) == raw
    from_path = load_image(str(path), SIZE)
    from_uri = load_image(f"file://{path}", SIZE)
    from_bytes = load_image(raw, SIZE)
    assert torch.equal(from_path, from_uri) and torch.equal(from_path, from_bytes)
    expected = as_tensor(center_square(Image.fromarray(photos["astronaut"]), SIZE))
    torch.testing.assert_close(from_path, expected, rtol=0, atol=1e-6)


def test_a_missing_file_uri_is_not_found(tmp_path):
    uri = f"file://{tmp_path}/gone.png"
    with pytest.raises(ImageError, match=f"^image '{uri}': not found$"):
        load_image(uri, SIZE)


# --- geometry ------------------------------------------------------------------------------------


def test_center_square_of_a_wide_image_keeps_the_middle():
    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, :30] = (255, 0, 0)
    wide[:, 30:60] = (0, 0, 255)
    wide[:, 60:] = (255, 0, 0)
    pixels = load_image(encode(Image.fromarray(wide)), 16)
    assert pixels.shape == (3, 16, 16)
    blue = (pixels[2] > 0.9) & (pixels[0] < 0.1)
    assert float(blue.float().mean()) > 0.9
    assert bool(blue[:, 2:14].all())  # the centre columns are pure blue
    assert float(pixels[0].mean()) < 0.05


def test_center_square_of_a_tall_image_keeps_the_middle():
    tall = np.zeros((120, 40, 3), np.uint8)
    tall[:40] = (0, 255, 0)
    tall[40:80] = (0, 0, 255)
    tall[80:] = (0, 255, 0)
    square = center_square(Image.fromarray(tall), 20)
    assert square.size == (20, 20)
    array = np.asarray(square)
    assert (array[2:18, :, 2] >= 250).all() and (array[2:18, :, 1] <= 5).all()  # blue, not green
    assert array[..., 1].mean() < 0.1 * 255  # the green bands are cropped, not squeezed in


def test_center_square_of_a_photo_is_its_centre_crop(photos):
    coffee = Image.fromarray(photos["coffee"])  # 600 wide, 400 high: the middle 400 columns
    square = center_square(coffee, 400)
    assert square.size == (400, 400)
    assert np.array_equal(np.asarray(square), photos["coffee"][:, 100:500])


# --- contact sheets ------------------------------------------------------------------------------


def test_contact_sheet_fits_rows_of_different_lengths(pixels):
    a, b, c = pixels  # three 64x64 photographs
    rows = [[a], [a, b, c], [b, c]]  # the longest row is not the first
    sheet = contact_sheet(rows, pad=2)
    assert sheet.mode == "RGB"
    assert sheet.size == (3 * (64 + 2) + 2, 3 * (64 + 2) + 2)  # (200, 200)
    array = np.asarray(sheet)
    tile = lambda t: (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    cell = lambda r, c: array[2 + 66 * r : 2 + 66 * r + 64, 2 + 66 * c : 2 + 66 * c + 64]  # noqa: E731
    assert np.array_equal(cell(1, 2), tile(c))
    assert np.array_equal(cell(2, 0), tile(b))
    assert (array[:66, 68:] == 255).all()  # row 0 has one tile: the rest is white
    assert (array[:2] == 255).all() and (array[:, :2] == 255).all()  # the padding
    assert contact_sheet([[a, b, c], [a]], pad=2).size == (200, 2 * 66 + 2)


def test_contact_sheet_cells_take_the_largest_tile(pixels):
    small = torch.nn.functional.interpolate(pixels[:1], size=32, mode="area")[0]
    sheet = contact_sheet([[small, small, small, small], [pixels[0]]], pad=0)
    assert sheet.size == (4 * 64, 2 * 64)
    sheet = contact_sheet([[small]], pad=5)
    assert sheet.size == (32 + 10, 32 + 10)
