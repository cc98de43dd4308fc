"""Bad input gets a clear error that names the problem; convertible images are converted right."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import PTIConfig
from pipeline.errors import ImageError, InputError, ModelError
from pipeline.images import load_image
from pipeline.models import fetch_checkpoint, load_stable_diffusion
from pipeline.text import encode_prompts, tokenize


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo(photos) -> Image.Image:
    return Image.fromarray(photos["coffee"])


# --- images ------------------------------------------------------------------------------------


def test_grayscale_becomes_three_equal_channels(photo):
    gray = photo.convert("L")
    pixels = load_image(png_bytes(gray), 32)
    assert pixels.shape == (3, 32, 32)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    expected = np.asarray(ImageOps.fit(gray, (32, 32), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    assert float((pixels[0] - torch.from_numpy(expected)).abs().mean()) < 0.02


def test_transparency_is_composited_on_white(photo):
    rgba = photo.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, : rgba.width // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    pixels = load_image(png_bytes(rgba), 32)
    assert float(pixels[:, :, :8].min()) > 0.99  # white where transparent
    assert float(pixels[:, :, 24:].mean()) < 0.9  # the photograph where opaque


def test_cmyk_matches_pils_conversion(photo):
    cmyk = photo.convert("CMYK")
    pixels = load_image(png_bytes(cmyk, "JPEG"), 32)
    reference = load_image(png_bytes(Image.open(io.BytesIO(png_bytes(cmyk, "JPEG"))).convert("RGB")), 32)
    torch.testing.assert_close(pixels, reference, rtol=0, atol=1 / 255)


def test_sixteen_bit_is_scaled_to_eight_bit():
    array = np.zeros((16, 16), np.uint16)
    array[:, 8:] = 65535
    array[:8, :8] = 32768
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    pixels = load_image(png_bytes(image), 16)
    assert float(pixels[0, :, 12].min()) == 1.0
    assert abs(float(pixels[0, 2, 2]) - 0.5) < 0.01
    assert float(pixels[0, 12, 2]) == 0.0


def test_palette_and_one_bit_images_are_converted(photo):
    for mode in ("P", "1"):
        pixels = load_image(png_bytes(photo.convert(mode)), 16)
        assert pixels.shape == (3, 16, 16) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty"),
        (b"name,caption\nx,y\n", "not an image"),
        ("truncated", "cannot decode"),
        ("float", "mode F cannot be converted"),
    ],
)
def test_unusable_files_are_refused_with_a_message_naming_them(tmp_path, photo, content, problem):
    if content == "truncated":
        data = png_bytes(photo)
        content = data[: len(data) // 2]
    elif content == "float":
        content = png_bytes(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF")
    path = tmp_path / "bad-file.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=problem) as error:
        load_image(str(path), 16)
    assert "bad-file.png" in str(error.value)


def test_missing_file_is_reported_as_not_found(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(str(tmp_path / "nowhere.png"), 16)


def test_path_uri_and_bytes_read_the_same(tmp_path, photo):
    path = tmp_path / "photo.png"
    photo.save(path)
    from_path = load_image(str(path), 16)
    assert torch.equal(from_path, load_image(f"file://{path}", 16))
    assert torch.equal(from_path, load_image(path.read_bytes(), 16))


# --- prompts -----------------------------------------------------------------------------------


def test_different_prompts_give_different_ids_and_embeddings(tiny_sd):
    prompts = ["a photo of a cat", "a photo of a dog", "a watercolor painting of a red house"]
    ids = tokenize(tiny_sd, prompts)
    assert len(tiny_sd.tokenizer) > 500  # not the 2-token tokenizer of a misbuilt CLIPTokenizer
    assert ids.shape == (3, 77) and len({tuple(r.tolist()) for r in ids}) == 3
    embeddings = encode_prompts(tiny_sd, prompts)
    assert embeddings.shape == (3, 77, tiny_sd.text_encoder.config.hidden_size)
    assert float((embeddings[0] - embeddings[1]).abs().max()) > 1e-3
    assert torch.equal(embeddings[0], encode_prompts(tiny_sd, prompts[:1])[0])


def test_a_prompt_longer_than_the_encoder_takes_is_truncated_with_a_warning(tiny_sd, caplog):
    long = " ".join(["a red cat"] * 40)
    with caplog.at_level(logging.WARNING, logger="pipeline.text"):
        embeddings = encode_prompts(tiny_sd, [long, "a cat"])
    assert embeddings.shape[1] == 77
    assert "truncated" in caplog.text and "a red cat" in caplog.text
    assert caplog.text.count("truncated") == 1  # only the long prompt


# --- edit parameters -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inverted(make_engine, pixels):
    engine = make_engine(steps=2, inner_steps=1)
    return engine, engine.invert_and_tune(pixels[:1], [None])


@pytest.mark.parametrize(
    "targets, etas, problem",
    [
        ([], [], "at least one target"),
        (["a cat"], [1.5], r"eta must be in \[0, 1\], got 1.5"),
        (["a cat"], [-0.1], r"eta must be in \[0, 1\], got -0.1"),
        (["a cat"], [float("nan")], "eta must be in"),
        (["  "], [0.5], "target prompt 0 is empty"),
    ],
)
def test_bad_edit_parameters_are_refused(inverted, targets, etas, problem):
    engine, inversion = inverted
    with pytest.raises(InputError, match=problem):
        engine.edit(inversion, [0] * len(targets), targets, etas)


def test_bad_config_values_are_refused_together():
    with pytest.raises(InputError) as error:
        PTIConfig(method="foo", etas=(1.2,), steps=0)
    message = str(error.value)
    assert "method 'foo'" in message and "eta must be in [0, 1], got 1.2" in message and "steps" in message


# --- models --------------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_diffusers_checkpoint_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a diffusers Stable Diffusion checkpoint: missing model_index.json"):
        load_stable_diffusion(str(tmp_path))


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "pickled")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").rename(copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="no safetensors weights for unet"):
        load_stable_diffusion(str(copy))


def test_an_unreachable_hub_model_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot reach model 'stable-diffusion-v1-5/stable-diffusion-v1-5'") as error:
        load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5", cache_dir=tmp_path)
    assert "local folder or an s3:// URI" in str(error.value)
    with pytest.raises(ModelError, match="neither an existing folder"):
        load_stable_diffusion("./no/such/model", cache_dir=tmp_path)


def test_a_model_uri_is_copied_to_the_cache_once(tiny_model_dir, tiny_sd, tmp_path):
    uri = f"file://{tiny_model_dir}"
    first = fetch_checkpoint(uri, tmp_path)
    assert first.is_relative_to(tmp_path) and (first / "model_index.json").is_file()
    stamp = (first / "unet" / "config.json").stat().st_mtime_ns
    assert fetch_checkpoint(uri, tmp_path) == first
    assert (first / "unet" / "config.json").stat().st_mtime_ns == stamp  # not copied again
    assert load_stable_diffusion(uri, device="cpu", cache_dir=tmp_path).fingerprint == tiny_sd.fingerprint
    assert not list(tmp_path.glob("models/.partial-*"))


def test_cuda_and_half_precision_are_refused_without_a_gpu():
    from pipeline.models import resolve_device, resolve_dtype

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ModelError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ModelError, match="needs a CUDA device"):
        resolve_dtype("float16", torch.device("cpu"))


# --- the command line ----------------------------------------------------------------------------


def test_pti_edit_writes_every_output_and_counts_unet_calls(tiny_model_dir, photo, tmp_path):
    photo.save(tmp_path / "in.png")
    out = tmp_path / "out"
    args = ["edit", str(tmp_path / "in.png"), "--model", tiny_model_dir, "--steps", "3", "--inner-steps", "2",
            "--target", "a cat", "--target", "a dog", "--eta", "0.5", "--eta", "1.0", "--out", str(out), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    names = {"input.png", "reconstruction.png", "0-0.5.png", "0-1.png", "1-0.5.png", "1-1.png", "contact_sheet.png", "summary.json"}
    assert names <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["edits"]) == 4 and summary["config"]["steps"] == 3
    assert 0 <= summary["reconstruction"]["ssim"] <= 1
    T, K = 3, 2
    assert T + T * 2 + T <= summary["unet_calls"] <= T + T * (2 + K) + T
    assert Image.open(out / "contact_sheet.png").size[0] > 4 * 64


@pytest.mark.parametrize("extra, problem", [(["--eta", "2"], "eta"), ([], "not an image")])
def test_pti_edit_fails_with_a_named_problem(tiny_model_dir, tmp_path, extra, problem):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    image = str(bad) if not extra else str(tmp_path / "unused.png")
    args = ["edit", image, "--model", tiny_model_dir, "--steps", "2", "--inner-steps", "1",
            "--target", "a cat", "--out", str(tmp_path / "out"), "--quiet", *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert problem in result.output
