"""Devices and precision: a GPU actor never runs on the CPU unasked; half-precision weights keep
latents, embeddings and Adam's state in float32; an image whose numbers overflow is retried in
float32, alone, and fails alone (never "converged" on NaN); stage 1 draws no random numbers."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.batch import actors, stages
from pipeline.batch.actors import check_device, pixels_of
from pipeline.batch.manifests import prepare_rows
from pipeline.batch.stages import TuneStage
from pipeline.engine import algorithm
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.engine.models import NoisePredictor, computing_in_float32, load_stable_diffusion, vae_dtype
from pipeline.errors import DeviceError
from pipeline.io.storage import Location
from schemas.stages import PIXELS

SMALL = dict(steps=4, inner_steps=3, lr=0.1, progress=False)


# --- no silent CPU ------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_a_gpu_actor_whose_torch_sees_no_cuda_is_refused_saying_why(monkeypatch, device):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(DeviceError) as error:
        check_device(PTIConfig(device=device), gpu_ids=["1"])
    message = str(error.value)
    assert message.startswith(f"Ray gave this actor GPU 1 (gpus_per_actor > 0) and pti.device={device!r}, ")
    assert f"but torch {torch.__version__} (" in message and "sees no CUDA device" in message
    assert "CUDA_VISIBLE_DEVICES='1'" in message and "would run on the CPU" in message
    assert "Install a CUDA build of torch" in message and "gpus_per_actor=0" in message
    assert "pti.device=cpu" in message


def test_an_explicit_cpu_device_or_no_gpus_runs_and_cpu_with_gpus_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.batch.actors"):
        check_device(PTIConfig(device="cpu"), gpu_ids=["0"])
        check_device(PTIConfig(device="auto"), gpu_ids=[])
    assert [r.getMessage() for r in caplog.records] == [
        "Ray gave this actor GPU 0 (gpus_per_actor > 0), but runs on the CPU as pti.device='cpu' asks"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_stage_given_gpus_fails_at_start_before_loading_a_model(monkeypatch, tmp_path):
    monkeypatch.setattr(actors, "_ray_gpu_ids", lambda: [0])
    with pytest.raises(DeviceError, match="sees no CUDA device"):  # not "not a checkpoint": nothing loaded
        TuneStage(PTIConfig(model=str(tmp_path)), Location(str(tmp_path)))


# --- half precision -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_sd(tiny_model_dir):
    """The tiny model with its UNet and text encoder in bfloat16 (the CPU's half precision; the
    loader keeps the CPU in float32, so it is cast here) and its VAE in float32 (force_upcast)."""
    sd = load_stable_diffusion(tiny_model_dir, device="cpu")
    sd.unet.to(torch.bfloat16)
    sd.text_encoder.to(torch.bfloat16)
    return dataclasses.replace(sd, dtype=torch.bfloat16)


@pytest.fixture
def poison(monkeypatch):
    """``poison(image, dtypes)``: the noise predictor returns NaN for ``image`` (``[3, H, W]``)
    when it computes in one of ``dtypes``. The image is known by its encoded latent, which the
    first inversion step receives as is; its NaN then spreads along its own trajectory only.
    Returns the list of the dtypes of every UNet call."""
    marked, latents, calls = [], [], []
    encode, predict = Engine.encode_images, NoisePredictor.__call__

    def encode_images(self, pixels):
        z = encode(self, pixels)
        latents.extend(
            (z[b], dtypes) for b in range(len(z)) for image, dtypes in marked if torch.equal(pixels[b], image)
        )
        return z

    def call(self, z, t, emb):
        calls.append(self.dtype)
        out = predict(self, z, t, emb)
        for latent, dtypes in latents:
            if self.dtype in dtypes:
                hit = (z == latent).flatten(1).all(1).view(-1, 1, 1, 1)
                out = torch.where(hit, torch.full_like(out, float("nan")), out)
        return out

    monkeypatch.setattr(Engine, "encode_images", encode_images)
    monkeypatch.setattr(NoisePredictor, "__call__", call)

    def add(image, dtypes):
        marked.append((image, dtypes))
        return calls

    return add


HALF_ONLY, ALWAYS = (torch.bfloat16,), (torch.bfloat16, torch.float32)


def test_a_vae_that_asks_for_upcasting_runs_in_float32(tiny_model_dir, tmp_path):
    import json
    from pathlib import Path

    values = json.loads((Path(tiny_model_dir) / "vae" / "config.json").read_text())
    config = tmp_path / "vae" / "config.json"
    config.parent.mkdir()
    for setting, expected in ((True, torch.float32), (False, torch.float16), (None, torch.float32)):
        values.pop("force_upcast", None)
        if setting is not None:  # absent: diffusers' default, True (SD 1.x's configs)
            values["force_upcast"] = setting
        config.write_text(json.dumps(values))
        assert vae_dtype(tmp_path, torch.float16) == expected, setting


def test_half_weights_keep_latents_embeddings_and_adam_state_in_float32(half_sd, pixels, monkeypatch):
    states = []

    class Recording(torch.optim.Adam):
        def step(self, *args, **kwargs):
            result = super().step(*args, **kwargs)
            states.extend(v.dtype for s in self.state.values() for v in s.values() if torch.is_tensor(v))
            states.extend(p.dtype for g in self.param_groups for p in g["params"])
            return result

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    engine = Engine(half_sd, PTIConfig(**SMALL))
    inversion = engine.invert_and_tune(pixels[:2], [None, "a photo"])
    assert half_sd.vae.dtype == torch.float32 and half_sd.unet.dtype == torch.bfloat16
    assert len(states) > 0 and set(states) == {torch.float32}
    for name in ("z_T", "cond", "reconstruction_latent", "final_loss"):
        assert getattr(inversion, name).dtype == torch.float32, name
    assert inversion.finite.tolist() == [True, True] and inversion.retried.tolist() == [False, False]


def test_a_non_finite_image_is_retried_in_float32_and_fails_alone(half_sd, pixels, poison):
    poison(pixels[1], HALF_ONLY)  # overflows in half precision only: the retry saves it
    calls = poison(pixels[2], ALWAYS)  # NaN whatever the precision
    weights = {n: (p.clone(), p.data_ptr()) for n, p in half_sd.unet.named_parameters()}
    engine = Engine(half_sd, PTIConfig(**SMALL))
    inversion = engine.invert_and_tune(pixels, [None, None, None])

    assert inversion.retried.tolist() == [False, True, True]
    assert inversion.finite.tolist() == [True, True, False]
    T, K = engine.schedule.num_steps, engine.config.inner_steps
    half, full = calls.count(torch.bfloat16), calls.count(torch.float32)
    assert T + 2 * T <= half and T + 2 * T <= full <= T + T * (2 + K)  # the retry ran stage 1 again
    assert engine.eps.calls == half + full  # ... and is counted in the engine's cost
    # The retried rows are those of a float32 run of the two images; the weights are as before.
    with computing_in_float32(half_sd) as sd:
        exact = Engine(sd, engine.config)._invert_and_tune(pixels[1:], [None, None])
    for name in ("z_T", "cond", "final_loss", "psnr"):
        assert torch.equal(getattr(inversion, name)[1], getattr(exact, name)[0]), name
    for n, p in half_sd.unet.named_parameters():  # its own tensors again, as they were
        assert p.dtype == torch.bfloat16 and p.data_ptr() == weights[n][1] and torch.equal(p, weights[n][0])
    assert half_sd.text_encoder.dtype == torch.bfloat16 and half_sd.vae.dtype == torch.float32
    # Nothing converged on NaN: the images that stayed finite are whole, the other is flagged.
    assert bool(inversion.z_T[:2].isfinite().all()) and bool(inversion.cond[:2].isfinite().all())
    assert float(inversion.psnr[1]) > 10 and not bool(inversion.z_T[2].isfinite().all())


def prepared_rows(images: dict[str, np.ndarray]) -> pa.Table:
    """Manifest rows with the images inline as PNG, read and decoded as stage 1 gets them."""

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    table = pa.table(
        {
            "id": list(images),
            "image": [png(a) for a in images.values()],
            "target_prompts": [["a cat"]] * len(images),
        }
    )
    return prepare_rows(
        table,
        resolution=64,
        duplicates=set(),
        endpoint_url=None,
        allowed=(),
        max_bytes=2**24,
        max_pixels=10**7,
        etas=(0.8,),
    )


def test_the_tune_stage_turns_an_image_still_non_finite_into_its_own_error_row(
    half_sd, tiny_model_dir, photos, poison, monkeypatch
):
    names = ["astronaut", "chelsea", "coffee"]
    prepared = prepared_rows(dict(zip(names, (photos[n] for n in names))))
    images = pixels_of(prepared[PIXELS].to_pylist(), 64)
    poison(images[1], HALF_ONLY)
    poison(images[2], ALWAYS)
    engine = Engine(half_sd, PTIConfig(model=tiny_model_dir, **SMALL))
    monkeypatch.setattr(stages, "load_engine", lambda *args: engine)
    monkeypatch.setattr(stages, "worker_id", lambda: "actor-1")
    out = TuneStage(engine.config, Location(tiny_model_dir))(prepared).to_pylist()

    by_id = {r["id"]: r for r in out}
    assert [by_id[n]["kind"] for n in names] == [None, None, "non_finite"]
    assert by_id["coffee"]["stage"] == "tune"
    assert by_id["coffee"]["message"] == (
        "the model produced NaN or inf in stage 1 in bfloat16 and again when retried in float32"
    )
    for name in names[:2]:  # done: stored embeddings, all finite
        stack = np.asarray(by_id[name]["prompt_embeddings"], dtype=np.float32)
        assert stack.size == SMALL["steps"] * 77 * 32 and np.isfinite(stack).all()  # [T, 77, D]
        assert np.isfinite(by_id[name]["reconstruction_psnr"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("early_stop", [True, False])
def test_a_non_finite_loss_fails_its_image_not_converges_it(make_engine, pixels, value, early_stop):
    """Image 1's tuning loss is NaN (or inf) at every first inner step: it must not pass for
    converged (NaN < threshold is false, so an early stop on ``loss >= threshold`` stopped it as
    if it had), nor step on a non-finite gradient; image 0 tunes as if alone."""
    engine = make_engine(**SMALL)
    # In float64, so that image 0 alone and in the batch agree to rounding (see test_algorithm).
    unet = copy.deepcopy(engine.sd.unet).double()
    predict = NoisePredictor(dataclasses.replace(engine.sd, unet=unet, dtype=torch.float64))
    z0 = engine.encode_images(pixels[:2]).double()
    null = engine.null.double().expand(2, -1, -1)
    trajectory = algorithm.invert(predict, z0, null, null, engine.schedule)

    def eps(z, t, emb):  # the loss's UNet calls (with gradient) overflow for image 1 while it tunes
        out = predict(z, t, emb)
        return torch.cat([out[:1], torch.full_like(out[1:], value)]) if torch.is_grad_enabled() else out

    options = dataclasses.replace(engine.config.tuning_options(), early_stop=early_stop)
    both = algorithm.tune_prompt_embeddings(eps, trajectory, null, null, engine.schedule, options)
    alone = algorithm.tune_prompt_embeddings(
        predict, [z[:1] for z in trajectory], null[:1], null[:1], engine.schedule, options
    )
    assert both.finite.tolist() == [True, False]  # failed, not converged
    assert both.steps[1].tolist() == [0] * SMALL["steps"] and bool(both.steps[0].gt(0).any())
    assert torch.equal(both.embeddings[1], null[1:].expand(SMALL["steps"], -1, -1))  # never stepped
    torch.testing.assert_close(both.embeddings[0], alone.embeddings[0], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(both.reconstruction[0], alone.reconstruction[0], rtol=1e-7, atol=1e-8)


# --- randomness ---------------------------------------------------------------------------------


def test_stage_one_neither_uses_nor_moves_the_global_rng(make_engine, pixels):
    engine = make_engine(**SMALL)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = engine.invert_and_tune(pixels[:1], [None])
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    other_seed = make_engine(**SMALL, seed=7)
    second = other_seed.invert_and_tune(pixels[:1], [None])
    assert torch.equal(first.cond, second.cond) and torch.equal(first.z_T, second.z_T)
    assert other_seed.fingerprint == engine.fingerprint  # the seed shapes nothing, so it is not hashed


def test_stage_one_fingerprints_are_those_of_outputs_made_before_the_seed_left_them():
    model = "0123456789abcdef"
    assert PTIConfig().stage_one_fingerprint(model) == "dfa2f1207b9ba6bb"  # computed with seed hashed
    assert PTIConfig(steps=10, dtype="float16").stage_one_fingerprint(model) == "cb084317598df25d"
    assert PTIConfig(seed=7).stage_one_fingerprint(model) == "dfa2f1207b9ba6bb"
    assert PTIConfig(steps=10).stage_one_fingerprint(model) != "dfa2f1207b9ba6bb"


def test_one_poisoned_image_of_four_fails_alone_and_the_others_match_a_clean_run(
    half_sd, tiny_model_dir, photos, poison, monkeypatch
):
    """The issue's case: one image of a batch of four stays NaN whatever the precision; it becomes
    one ``non_finite`` row after its float32 retry, and the other three are stored exactly as a
    run without the poisoned image's NaN stores them."""

    names = ["astronaut", "chelsea", "coffee", "astronaut-flipped"]
    arrays = [photos["astronaut"], photos["chelsea"], photos["coffee"], photos["astronaut"][::-1].copy()]
    prepared = prepared_rows(dict(zip(names, arrays)))
    monkeypatch.setattr(stages, "worker_id", lambda: "actor-1")

    def tuned() -> dict:
        engine = Engine(half_sd, PTIConfig(model=tiny_model_dir, **SMALL))
        monkeypatch.setattr(stages, "load_engine", lambda *args: engine)
        return {r["id"]: r for r in TuneStage(engine.config, Location(tiny_model_dir))(prepared).to_pylist()}

    clean = tuned()
    poison(pixels_of(prepared[PIXELS].to_pylist(), 64)[2], ALWAYS)
    poisoned = tuned()
    assert [poisoned[n]["kind"] for n in names] == [None, None, "non_finite", None]
    assert all(clean[n]["kind"] is None for n in names)
    for name in ("astronaut", "chelsea", "astronaut-flipped"):
        for column in ("prompt_embeddings", "z_T", "reconstruction_psnr", "tuning_loss"):
            assert np.array_equal(
                np.asarray(poisoned[name][column], dtype=np.float64),
                np.asarray(clean[name][column], dtype=np.float64),
            ), (name, column)
