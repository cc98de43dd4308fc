"""Checkpoints are refused or fetched with clear errors, prompts encode right, edits and the CLI
refuse bad input by name, and a successful ``pti edit`` writes everything with the documented cost."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.errors import InputError, ModelError
from pipeline.io.images import load_image
from pipeline.world.tiny import TINY_WORDS
from pipeline.engine.checkpoints import default_cache_dir, fetch_checkpoint, model_resolution
from pipeline.engine.models import load_stable_diffusion, resolve_device, resolve_dtype
from pipeline.engine.text import encode_prompts, tokenize

HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


# --- checkpoints that are not ones ----------------------------------------------------------------


def test_an_empty_folder_is_refused_listing_everything_missing(tmp_path):
    with pytest.raises(ModelError) as error:
        load_stable_diffusion(str(tmp_path), device="cpu")
    assert str(error.value) == (
        f"{str(tmp_path)!r} is not a diffusers Stable Diffusion checkpoint: missing model_index.json, "
        "unet/config.json, vae/config.json, text_encoder/config.json, tokenizer/, scheduler/"
    )


def test_a_folder_with_only_model_index_is_refused_naming_the_components(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError) as error:
        load_stable_diffusion(str(tmp_path), device="cpu")
    message = str(error.value)
    missing = "missing unet/config.json, vae/config.json, text_encoder/config.json, tokenizer/, scheduler/"
    assert missing in message
    assert "model_index.json" not in message.split("missing")[1]


def test_pickled_unet_weights_are_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "pickled"))
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), copy / "unet" / "diffusion_pytorch_model.bin")  # a real pickle
    weights.unlink()
    with pytest.raises(ModelError) as error:
        load_stable_diffusion(str(copy), device="cpu")
    message = str(error.value)
    assert f"{str(copy)!r} has no safetensors weights for unet;" in message
    assert "pickled weights are never loaded" in message and "safe_serialization=True" in message


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_folder_of_configs_alone_loads_without_weights_and_is_refused_with(
    tiny_model_dir, tmp_path, device
):
    """``weights=False`` (what the cost benchmarks measure): the same architecture, seeded random
    weights made on the device, the same on every load; a real load still needs safetensors."""
    configs = Path(shutil.copytree(tiny_model_dir, tmp_path / "configs"))
    for weights in configs.glob("*/*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match="has no safetensors weights for unet, vae, text_encoder"):
        load_stable_diffusion(str(configs), device="cpu")
    built, again = (load_stable_diffusion(str(configs), device=device, weights=False) for _ in range(2))
    loaded = load_stable_diffusion(tiny_model_dir, device="cpu")
    for part in ("unet", "vae", "text_encoder"):
        shapes = {n: p.shape for n, p in getattr(loaded, part).named_parameters()}
        assert {n: p.shape for n, p in getattr(built, part).named_parameters()} == shapes, part
        assert all(p.device.type == device for p in getattr(built, part).parameters())
    assert built.resolution == loaded.resolution and built.family == loaded.family == "sd"
    if device == "cpu":
        first, second, trained = (dict(m.unet.named_parameters()) for m in (built, again, loaded))
        assert all(torch.equal(first[n], second[n]) for n in first)  # seeded
        assert not all(torch.equal(first[n], trained[n]) for n in first)  # not the checkpoint's


# --- where checkpoints come from ------------------------------------------------------------------


def test_an_unreachable_hub_model_says_so_and_suggests_a_local_copy(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # Set after huggingface_hub was imported (which reads it once): the loader must still see it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PTI_CACHE", str(tmp_path))
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert default_cache_dir() == tmp_path
    with pytest.raises(ModelError) as error:
        load_stable_diffusion(HUB_MODEL, device="cpu")
    message = str(error.value)
    assert message.startswith(f"cannot reach model {HUB_MODEL!r} on the hub (")
    assert "outgoing traffic has been disabled" in message  # refused offline, not after trying the network
    assert message.endswith("This machine may be offline: pass a local folder or an s3:// URI with --model")
    assert not list(tmp_path.glob("hub/**/*.safetensors"))


@pytest.mark.parametrize("ref", ["./no/such/dir", "/no/such/dir", "no/such/dir", "just-a-name"])
def test_a_ref_that_is_no_folder_uri_or_hub_id_is_refused(monkeypatch, tmp_path, ref):
    monkeypatch.setenv("PTI_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as error:
        load_stable_diffusion(ref, device="cpu")
    assert str(error.value) == f"model {ref!r} is neither an existing folder, a URI nor a hub id (owner/name)"
    assert not any(tmp_path.iterdir())  # nothing fetched


def test_a_file_uri_model_is_copied_into_the_cache_once(tiny_model_dir, tiny_sd, monkeypatch, tmp_path):
    source = Path(shutil.copytree(tiny_model_dir, tmp_path / "bucket" / "tiny"))
    needed = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file() and p.name != "README.md")
    # What a published checkpoint holds beside what a diffusers load needs: never copied.
    extras = [
        "v1-5-pruned.safetensors",
        "v1-5-pruned.ckpt",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "README.md",
    ]
    for extra in extras:
        (source / extra).parent.mkdir(exist_ok=True)
        (source / extra).write_bytes(b"not needed")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PTI_CACHE", str(cache))
    uri = f"file://{source}"
    sd = load_stable_diffusion(uri, device="cpu")
    assert sd.fingerprint == tiny_sd.fingerprint and sd.ref == uri  # the same model as the folder
    torch.testing.assert_close(sd.unet.conv_in.weight, tiny_sd.unet.conv_in.weight, rtol=0, atol=0)
    copies = list((cache / "models").iterdir())
    assert len(copies) == 1
    copy = copies[0]
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(copy) == needed  # exactly the files of the folder the loader needs
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copy.rglob("*")}

    source.rename(tmp_path / "bucket" / "moved")  # a second load must not need the source again
    assert fetch_checkpoint(uri) == copy
    again = load_stable_diffusion(uri, device="cpu")
    assert again.fingerprint == tiny_sd.fingerprint
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in copy.rglob("*")} == stamps  # untouched
    assert [p.name for p in (cache / "models").iterdir()] == [copy.name]  # no second or partial copy


def test_a_file_uri_with_pickled_weights_leaves_nothing_in_the_cache(tiny_model_dir, monkeypatch, tmp_path):
    source = Path(shutil.copytree(tiny_model_dir, tmp_path / "pickled"))
    vae = source / "vae"
    (vae / "diffusion_pytorch_model.safetensors").rename(vae / "diffusion_pytorch_model.bin")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PTI_CACHE", str(cache))
    with pytest.raises(ModelError, match="no safetensors weights for vae; pickled weights are never loaded"):
        load_stable_diffusion(f"file://{source}", device="cpu")
    assert list((cache / "models").iterdir()) == []  # the staging copy was removed


def test_a_file_uri_to_nothing_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PTI_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/no-model"
    with pytest.raises(ModelError, match=f"^model '{uri}' is empty or does not exist$"):
        load_stable_diffusion(uri, device="cpu")


# --- what the driver reads of a model: two config files, never weights ----------------------------


CONFIGS = ("model_index.json", "unet/config.json", "vae/config.json")  # what the driver reads of a model


def _configs_only(tiny_model_dir, folder: Path) -> Path:
    """A copy of the tiny model's index, UNet and VAE configs, without any weight, tokenizer or scheduler."""
    for name in CONFIGS:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tiny_model_dir) / name, folder / name)
    return folder


def test_a_folders_resolution_is_read_from_its_configs(tiny_model_dir, tmp_path):
    folder = _configs_only(tiny_model_dir, tmp_path / "model")
    assert model_resolution(str(folder)) == 64 and model_resolution(f"file://{folder}") == 64
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(ModelError, match=r"^cannot read vae/config.json of model .*: FileNotFoundError"):
        model_resolution(str(folder))


def test_an_object_store_models_resolution_needs_only_its_configs(tiny_model_dir, s3_server, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="config-only-models")
    folder = _configs_only(tiny_model_dir, tmp_path / "model")
    for name in CONFIGS:  # no weights in the bucket at all
        client.upload_file(str(folder / name), "config-only-models", f"tiny/{name}")
    options = {"client_kwargs": {"endpoint_url": s3_server}}
    assert model_resolution("s3://config-only-models/tiny", storage_options=options) == 64
    with pytest.raises(
        ModelError, match=r"^cannot read model_index.json of model 's3://config-only-models/none'"
    ):
        model_resolution("s3://config-only-models/none", storage_options=options)


def test_a_hub_models_resolution_downloads_its_configs_only(tiny_model_dir, monkeypatch, tmp_path):
    import huggingface_hub

    asked = []

    def download(repo_id, filename, **options):
        asked.append((repo_id, filename, options))
        return str(Path(tiny_model_dir) / filename)

    def snapshot(*args, **options):
        raise AssertionError("the whole checkpoint was asked for")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setenv("PTI_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_resolution("owner/tiny") == 64
    options = {"cache_dir": tmp_path / "hub", "local_files_only": True}  # the loader's cache, offline
    assert asked == [("owner/tiny", name, options) for name in CONFIGS]


def test_an_unreachable_hub_models_resolution_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PTI_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as error:
        model_resolution(HUB_MODEL)
    message = str(error.value)
    assert message.startswith(f"cannot read model_index.json of model {HUB_MODEL!r} from the hub (")
    assert message.endswith("This machine may be offline: pass a local folder or an s3:// URI with --model")


# --- devices and dtypes ---------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_is_refused_without_a_gpu():
    with pytest.raises(ModelError, match=r"^device 'cuda' was asked for, but torch sees no CUDA device$"):
        resolve_device("cuda")
    with pytest.raises(ModelError, match="no CUDA device"):
        load_stable_diffusion("/nowhere", device="cuda:1")  # before any checkpoint is looked for
    assert resolve_device("auto") == torch.device("cpu")


def test_half_precision_is_refused_on_the_cpu():
    cpu = torch.device("cpu")
    with pytest.raises(ModelError, match=r"^dtype float16 needs a CUDA device; the CPU runs float32$"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ModelError, match="dtype bfloat16 needs a CUDA device"):
        resolve_dtype("bfloat16", cpu)
    with pytest.raises(ModelError, match=r"dtype 'float64' is not one of auto, float32, float16, bfloat16"):
        resolve_dtype("float64", cpu)
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


# --- prompts --------------------------------------------------------------------------------------


def test_the_tokenizer_is_a_real_one(tiny_sd):
    tokenizer = tiny_sd.tokenizer
    # transformers 5 can build a CLIPTokenizer with only its 2 special tokens from a bad vocab
    assert len(tokenizer) > 500
    assert len(tokenizer) == tiny_sd.text_encoder.config.vocab_size
    ids = tokenizer("a photo of a cat").input_ids
    assert len(ids) == 7  # <start> a photo of a cat <end>: one token per word
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    zebra = tokenizer("a zebra").input_ids  # not one of its words: spelled out in byte tokens
    assert len(zebra) > 4 and tokenizer.decode(zebra, skip_special_tokens=True) == "a zebra"
    for word in TINY_WORDS:  # merges learned for one word never split another
        assert len(tokenizer(word).input_ids) == 3, word


def test_different_prompts_give_different_ids_and_embeddings(tiny_sd):
    prompts = ["a photo of a cat", "a photo of a dog", "an oil painting of a red house", ""]
    ids = tokenize(tiny_sd, prompts)
    assert ids.shape == (4, 77)
    assert len({tuple(row.tolist()) for row in ids}) == 4
    assert ids[0, :6].tolist() != ids[1, :6].tolist() and ids[0, :5].tolist() == ids[1, :5].tolist()
    embeddings = encode_prompts(tiny_sd, prompts)
    assert embeddings.shape == (4, 77, tiny_sd.text_encoder.config.hidden_size)
    assert embeddings.dtype == torch.float32 and bool(torch.isfinite(embeddings).all())
    for a in range(4):
        for b in range(a + 1, 4):
            assert float((embeddings[a] - embeddings[b]).abs().max()) > 1e-3, (prompts[a], prompts[b])


def test_the_same_prompt_gives_identical_embeddings(tiny_sd):
    once = encode_prompts(tiny_sd, ["a watercolor of a tiger"])
    twice = encode_prompts(tiny_sd, ["a watercolor of a tiger"])
    assert torch.equal(once, twice)
    batched = encode_prompts(tiny_sd, ["a cat", "a watercolor of a tiger"])
    torch.testing.assert_close(batched[1:], once, rtol=0, atol=1e-6)  # a batch-mate changes nothing
    assert once.shape == (1, 77, tiny_sd.text_encoder.config.hidden_size)


def test_a_prompt_longer_than_77_tokens_is_truncated_with_a_warning(tiny_sd, caplog):
    long = " ".join(["cat"] * 100)  # 102 tokens with start and end
    fits = " ".join(["dog"] * 75)  # 77 tokens exactly
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.text"):
        ids = tokenize(tiny_sd, [long, fits])
        embeddings = encode_prompts(tiny_sd, [long])
    warnings = [r for r in caplog.records if r.name == "pipeline.engine.text"]
    # the long prompt, once per call; the one that fits is not warned about
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    expected = "prompt is 102 tokens, longer than the text encoder's 77: truncated: 'cat cat"
    assert warnings[0].getMessage().startswith(expected)
    assert ids.shape == (2, 77)
    cat = tiny_sd.tokenizer("cat").input_ids[1]
    assert ids[0, 0] == tiny_sd.tokenizer.bos_token_id and bool((ids[0, 1:76] == cat).all())
    assert ids[0, 76] == tiny_sd.tokenizer.eos_token_id  # truncation keeps the end token
    assert embeddings.shape == (1, 77, tiny_sd.text_encoder.config.hidden_size)
    assert torch.equal(embeddings, encode_prompts(tiny_sd, [" ".join(["cat"] * 75)]))  # = the first 75 words


# --- edit-time input errors -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def inverted(make_engine, pixels):
    engine = make_engine(steps=4, inner_steps=2)  # the checks come before any work: keep it quick
    return engine, engine.invert_and_tune(pixels[:1], [None])


@pytest.mark.parametrize(
    "targets, etas, problem",
    [
        ([], [], r"^no edits asked for: give at least one target prompt$"),
        (["a cat"], [1.5], r"^eta must be in \[0, 1\], got 1\.5$"),
        (["a cat"], [-0.1], r"^eta must be in \[0, 1\], got -0\.1$"),
        (["a cat"], [float("nan")], r"^eta must be in \[0, 1\], got nan$"),
        ([""], [0.5], r"^target prompt 0 is empty$"),
        (["a cat", "   "], [0.5, 0.5], r"^target prompt 1 is empty$"),
        (["a cat", ""], [0.5, 2.0], r"^eta must be in \[0, 1\], got 2\.0; target prompt 1 is empty$"),
        (["a cat"], [0.5, 0.6], r"^rows, targets and etas differ in length: 2, 1, 2$"),
    ],
)
def test_bad_edits_are_refused_before_any_unet_call(inverted, targets, etas, problem):
    engine, inversion = inverted
    rows = [0] * len(etas)
    calls = engine.eps.calls
    with pytest.raises(InputError, match=problem):
        engine.edit(inversion, rows, targets, etas)
    assert engine.eps.calls == calls


@pytest.mark.parametrize("rows", [[1], [-1], [0, 3]])
def test_edits_of_images_not_in_the_inversion_are_refused(inverted, rows):
    engine, inversion = inverted
    calls = engine.eps.calls
    bad = [n for n, r in enumerate(rows) if r != 0][0]
    with pytest.raises(
        InputError, match=rf"^edit {bad} asks for image {rows[bad]}, not one of the 1 inverted$"
    ):
        engine.edit(inversion, rows, ["a cat"] * len(rows), [0.5] * len(rows))
    assert engine.eps.calls == calls


def test_the_same_edit_with_good_parameters_runs(inverted):
    engine, inversion = inverted
    calls = engine.eps.calls
    edited = engine.edit(inversion, [0, 0], ["a cat", "a dog"], [0.0, 1.0])
    assert edited.shape == (2, 3, 64, 64) and 0 <= float(edited.min()) and float(edited.max()) <= 1
    assert engine.eps.calls - calls == engine.config.steps  # one batched UNet call per step
    with pytest.raises(InputError, match="^no target prompts: give at least one$"):
        engine.edit_grid(inversion, [], [0.5])


@pytest.mark.parametrize(
    "fields, problem",
    [
        (dict(etas=(1.2,)), r"^invalid config: eta must be in \[0, 1\], got 1\.2$"),
        (dict(method="foo"), r"^invalid config: method 'foo' is not one of pti, ddim, nti, npi$"),
        (dict(etas=(0.5, float("nan"))), r"^invalid config: eta must be in \[0, 1\], got nan$"),
    ],
)
def test_bad_config_values_are_refused(fields, problem):
    with pytest.raises(InputError, match=problem):
        PTIConfig(**fields)


# --- the command line -----------------------------------------------------------------------------

QUICK = ["--steps", "2", "--inner-steps", "1", "--quiet"]


def test_pti_edit_on_a_file_that_is_not_an_image_names_it_and_exits_2(tiny_model_dir, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("shopping: coffee, milk\n")
    out = tmp_path / "out"
    missing_model = str(tmp_path / "no-model")  # the image is read first: no model is loaded for it
    result = CliRunner().invoke(
        app, ["edit", str(notes), "--model", missing_model, "--target", "a cat", "--out", str(out), *QUICK]
    )
    assert result.exit_code == 2, result.output
    assert f"error: image {str(notes)!r}: not an image format PIL can read" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert not out.exists()


def test_pti_edit_with_eta_2_names_eta_and_exits_2(tiny_model_dir, photos, tmp_path):
    image = tmp_path / "coffee.png"
    Image.fromarray(photos["coffee"]).save(image)
    out = tmp_path / "out"
    args = ["edit", str(image), "--model", tiny_model_dir, "--target", "a cat", "--eta", "2", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, *QUICK])
    assert result.exit_code == 2, result.output
    assert "error: invalid config: eta must be in [0, 1], got 2.0" in result.stderr
    assert not out.exists()


def test_pti_edit_writes_every_output_and_counts_unet_calls(tiny_model_dir, tiny_sd, photos, tmp_path):
    image = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(image)
    out = tmp_path / "out"
    T, K = 3, 2
    args = [
        "edit",
        str(image),
        "--model",
        tiny_model_dir,
        "--steps",
        str(T),
        "--inner-steps",
        str(K),
        "--target",
        "a cat",
        "--target",
        "a dog",
        "--eta",
        "0.5",
        "--eta",
        "1.0",
        "--out",
        str(out),
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"contact sheet: {out / 'contact_sheet.png'}" in result.stdout and "4 edits" in result.stdout

    names = [
        "input.png",
        "reconstruction.png",
        "0-0.5.png",
        "0-1.png",
        "1-0.5.png",
        "1-1.png",
        "contact_sheet.png",
        "summary.json",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names[:-2]:
        assert Image.open(out / name).size == (64, 64)
    # one row per target: input, reconstruction and its two edits, 64 px shown at 256 px over a
    # 52 px band of captions, padded by 2
    assert Image.open(out / "contact_sheet.png").size == (4 * 258 + 2, 2 * (256 + 52 + 2) + 2)
    expected_input = np.asarray(load_image(str(image), 64).permute(1, 2, 0).numpy() * 255).round()
    assert np.array_equal(np.asarray(Image.open(out / "input.png")), expected_input.astype(np.uint8))

    summary = json.loads((out / "summary.json").read_text())
    assert [(e["file"], e["target"], e["eta"]) for e in summary["edits"]] == [
        ("0-0.5.png", "a cat", 0.5),
        ("0-1.png", "a cat", 1.0),
        ("1-0.5.png", "a dog", 0.5),
        ("1-1.png", "a dog", 1.0),
    ]
    assert summary["config"]["steps"] == T and summary["config"]["inner_steps"] == K
    assert summary["model_fingerprint"] == tiny_sd.fingerprint

    # ALGORITHM.md's cost: inversion T, tuning (1 + inner steps run + 1) per timestep, editing T
    # (all four edits in one batched call per step). Bounded, then exact by redoing it here.
    calls = summary["unet_calls"]
    assert T + T * 2 + T <= calls <= T + T * (2 + K) + T
    config = PTIConfig.from_dict(summary["config"]).replace(progress=False)
    engine = Engine(tiny_sd, config)
    inversion = engine.invert_and_tune(load_image(str(image), 64).unsqueeze(0), [None])
    taken = inversion.inner_steps[0].tolist()
    run = [k + (k < K) for k in taken]  # an early stop evaluates the UNet once more, then breaks
    assert engine.eps.calls == T + sum(2 + r for r in run)
    engine.edit_grid(inversion, ["a cat", "a dog"], [0.5, 1.0])
    assert calls == engine.eps.calls == T + sum(2 + r for r in run) + T
    assert summary["reconstruction"]["psnr"] == pytest.approx(float(inversion.psnr[0]), abs=1e-4)
