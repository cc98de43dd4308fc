"""Stable Diffusion 3 (the flow-matching family; docs/flow-matching.md) on the tiny SD3 built in code:
loading, prompts as its pipeline encodes them, and PTI's stage 1 and 2 on the flow step, checked in
float64 where the claim is numerical."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.engine import algorithm
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.engine.models import NoisePredictor, load_stable_diffusion, split_pooled
from pipeline.engine.text import encode_prompts, null_embedding
from pipeline.errors import ModelError
from pipeline.world.tiny import build_tiny_model

SOURCES = ["a photo", "a photo of a cat", "a cup of coffee"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd3", seed=0, family="sd3"))


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return load_stable_diffusion(sd3_dir, device="cpu")


@pytest.fixture(scope="module")
def exact(sd3, pixels):
    """The transformer in float64, and the photographs' latents and source embeddings in float64."""
    sd64 = dataclasses.replace(sd3, unet=copy.deepcopy(sd3.unet).double(), dtype=torch.float64)
    engine = Engine(sd3, PTIConfig(model="tiny-sd3", steps=4, progress=False))
    z0 = engine.encode_images(pixels).double()
    source, null = encode_prompts(sd3, SOURCES).double(), null_embedding(sd3).double()
    return NoisePredictor(sd64), sd3.scheduler, z0, source, null


def test_the_tiny_sd3_loads_as_the_flow_family_with_its_three_encoders(sd3):
    assert sd3.family == "sd3" and type(sd3.unet).__name__ == "SD3Transformer2DModel"
    assert type(sd3.text_encoder_3).__name__ == "T5EncoderModel" and sd3.tokenizer_3 is not None
    assert sd3.resolution == 64 and sd3.vae.config.latent_channels == 16
    assert sd3.token_embedding_shape == (77 + 256, 32) and sd3.pooled_dim == 32
    assert (
        type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and sd3.scheduler.config.shift == 3
    )


def test_a_sd3_checkpoint_without_its_t5_is_refused_naming_it(sd3_dir, tmp_path):
    copy_dir = Path(shutil.copytree(sd3_dir, tmp_path / "no-t5"))
    shutil.rmtree(copy_dir / "text_encoder_3")
    with pytest.raises(ModelError, match="missing text_encoder_3/config.json"):
        load_stable_diffusion(str(copy_dir), device="cpu")


def test_prompts_are_sd3s_joint_embedding_and_pooled_projection_as_its_pipeline_makes_them(sd3, sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    tokens, _, pooled, _ = pipe.encode_prompt(SOURCES, None, None, do_classifier_free_guidance=False)
    ours = encode_prompts(sd3, SOURCES)
    assert ours.shape == (3, 333 + 1, 32)  # 77 CLIP + 256 T5 tokens, and the pooled row
    ours_tokens, ours_pooled = split_pooled(ours, sd3.pooled_dim)
    # The same numbers up to float32 rounding (the pipeline's own load picks its attention kernels).
    torch.testing.assert_close(ours_tokens, tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_pooled, pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(null_embedding(sd3), encode_prompts(sd3, [""]))  # SD3 encodes "" as is


def test_the_latents_are_normalised_with_the_vaes_shift_and_scale(sd3, pixels):
    engine = Engine(sd3, PTIConfig(model="tiny-sd3", steps=2, progress=False))
    vae = sd3.vae
    with torch.no_grad():
        mean = vae.encode(2 * pixels - 1).latent_dist.mean
    z0 = engine.encode_images(pixels)
    torch.testing.assert_close(z0, (mean - vae.config.shift_factor) * vae.config.scaling_factor)
    assert abs(float(z0.mean())) < 0.1 and 0.8 < float(z0.std()) < 1.2  # the shift and scale fit photos
    with torch.no_grad():
        expected = vae.decode(z0 / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(engine.decode_latents(z0), ((expected + 1) / 2).clamp(0, 1))


def test_inversion_then_reconstruction_without_guidance_returns_the_latent_to_first_order(exact):
    """Euler inversion of the flow ODE and Euler sampling back, both at w = 1 on the source prompt:
    the round trip misses by the discretisation error, halving as the steps double (measured in
    float64 on the tiny SD3: RMS 0.037-0.041 at T = 10, 0.018-0.019 at T = 20, 0.0090 at 40, 0.0045
    at 80, against latents of RMS 1.0 that the inversion moves by 0.54)."""
    eps, scheduler, z0, source, _ = exact
    errors = {}
    for steps in (10, 20):
        schedule = algorithm.flow_schedule(scheduler, steps)
        trajectory = algorithm.invert(eps, z0, source, source, schedule, guidance=1.0)
        stack = source.unsqueeze(1).expand(-1, steps, -1, -1)
        back = algorithm.sample(eps, trajectory[-1], stack, source, schedule, 1.0)
        errors[steps] = algorithm.latent_mse(back, z0).sqrt()
    assert bool((errors[20] < 0.021).all()) and bool((errors[10] < 0.045).all())
    ratios = errors[10] / errors[20]
    assert bool(((1.8 < ratios) & (ratios < 2.3)).all())


def test_prompt_tuning_lowers_the_guided_reconstruction_loss_and_batches_exactly(exact):
    """PTI at w = 3 on the flow step: the tuned embeddings retrace the inversion closer than the
    source prompt does, sampling with them at w = 3 is that reconstruction, and a batch of three
    gives each image what it gets alone."""
    eps, scheduler, z0, source, null = exact
    schedule = algorithm.flow_schedule(scheduler, 4)
    trajectory = algorithm.invert(eps, z0, source, null.expand(3, -1, -1), schedule, guidance=0.0)
    options = algorithm.TuningOptions(
        guidance=3.0, inner_steps=10, lr=0.05, early_stop=False, stop_eps=0.0, stop_slack=0.0
    )
    null3 = null.expand(3, -1, -1)
    untuned = algorithm.tune_prompt_embeddings(
        eps, trajectory, source, null3, schedule, dataclasses.replace(options, inner_steps=0)
    )
    tuned = algorithm.tune_prompt_embeddings(eps, trajectory, source, null3, schedule, options)
    before = algorithm.latent_mse(untuned.reconstruction, z0)
    after = algorithm.latent_mse(tuned.reconstruction, z0)
    # Measured: latent MSE 0.058-0.067 with the source prompt, 0.0059-0.0073 tuned (T = 4, K = 10).
    assert bool(tuned.finite.all()) and bool((after < 0.2 * before).all()), (before, after)
    edited = algorithm.sample(eps, trajectory[-1], tuned.embeddings, null3, schedule, 3.0)
    torch.testing.assert_close(edited, tuned.reconstruction, rtol=0, atol=1e-12)
    alone = algorithm.tune_prompt_embeddings(
        eps, [z[1:2] for z in trajectory], source[1:2], null, schedule, options
    )
    torch.testing.assert_close(alone.embeddings[0], tuned.embeddings[1], rtol=0, atol=1e-9)
    torch.testing.assert_close(alone.reconstruction[0], tuned.reconstruction[1], rtol=0, atol=1e-9)


def test_the_engine_runs_both_stages_on_sd3_at_the_documented_cost(sd3, pixels):
    """Stage 1 and stage 2 through the engine (the jobs' path), counted in transformer evaluations
    as ALGORITHM.md counts UNet evaluations (``PTIConfig.unet_evaluations``)."""
    config = PTIConfig(
        model="tiny-sd3", steps=4, inner_steps=2, early_stop=False, guidance=3.0, progress=False
    )
    engine = Engine(sd3, config)
    assert isinstance(engine.schedule, algorithm.FlowSchedule)
    inversion = engine.invert_and_tune(pixels, [None, SOURCES[1], SOURCES[2]])
    cost = config.unet_evaluations(edits=2)
    assert engine.eps.evaluations == 3 * cost["stage_one"] and bool(inversion.finite.all())
    assert inversion.cond.shape == (3, 4, 333 + 1, 32) and inversion.uncond is None
    engine.eps.evaluations = 0
    edits = engine.edit(
        inversion, [0, 0, 2, 2], ["a red cat", "a dog", "a cat", "a tiger"], [0.8, 1.0, 0.6, 0.8]
    )
    assert edits.shape == (4, 3, 64, 64) and bool(edits.isfinite().all())
    assert engine.eps.evaluations == 2 * cost["stage_two"]  # two images, two edits each
    reconstruction = engine.edit(inversion, [1], ["anything"], [0.0])  # eta 0: stage 1's reconstruction
    torch.testing.assert_close(reconstruction[0], inversion.reconstruction[1], rtol=0, atol=1e-5)  # float32


# --- the stored form and the batch jobs ----------------------------------------------------------


@pytest.mark.parametrize("method", ["pti", "nti"])
def test_stored_sd3_stage_one_reads_back_with_plain_pyarrow_and_edits_the_same(sd3, pixels, method):
    """The flow family's stacks, its pooled stacks and its float timesteps, written as the jobs
    write them and read back as stage 2 reads them."""
    import io

    import pyarrow.parquet as pq

    from pipeline.engine.stored import inversion_from_arrow, inversion_to_arrow

    config = PTIConfig(model="tiny-sd3", method=method, steps=3, inner_steps=2, guidance=3.0, progress=False)
    engine = Engine(sd3, config)
    inversion = engine.invert_and_tune(pixels[:2], SOURCES[1:])
    buffer = io.BytesIO()
    pq.write_table(inversion_to_arrow(engine, inversion, ["a", "b"], SOURCES[1:]), buffer)
    table = pq.read_table(io.BytesIO(buffer.getvalue()))
    assert table.column("model_family").to_pylist() == ["sd3", "sd3"]
    tokens = table.column("prompt_embeddings").combine_chunks().to_numpy_ndarray()
    pooled = table.column("pooled_prompt_embeddings").combine_chunks().to_numpy_ndarray()
    assert tokens.shape == (2, 3, 333, 32) and pooled.shape == (2, 3, 32)
    assert table.column("z_T").type.shape == [16, 8, 8]
    assert table.column("timesteps")[0].as_py() == pytest.approx(
        list(reversed(engine.schedule.timesteps[1:]))
    )
    assert (table.column("pooled_uncond_embeddings").null_count == 2) == (method == "pti")
    back = inversion_from_arrow(table)
    targets = ["a photo of a dog", "a cup of tea"]
    torch.testing.assert_close(  # float16 storage: close to the edits from memory
        engine.edit(back, [0, 1], targets, [0.7, 0.7]),
        engine.edit(inversion, [0, 1], targets, [0.7, 0.7]),
        atol=2e-2,
        rtol=0,
    )


def test_jobs_run_and_edit_with_sd3_and_refuse_a_model_of_another_family(
    ray_cluster, sd3_dir, tiny_model_dir, photos, tmp_path
):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.batch.config import RunConfig
    from pipeline.batch.jobs import run_all, run_edit
    from pipeline.errors import InputError

    def png(name: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(photos[name]).resize((80, 80)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [
        {
            "id": "chelsea",
            "image": png("chelsea"),
            "source_prompt": "a photo of a cat",
            "target_prompts": ["a dog"],
        },
        {
            "id": "coffee",
            "image": png("coffee"),
            "source_prompt": None,
            "target_prompts": ["a cup of tea", "a cat"],
        },
    ]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    pti = dict(steps=3, inner_steps=1, lr=0.1, etas=[0.6], progress=False, device="cpu")
    base = dict(gpus_per_actor=1, tune_batch_size=2, edit_batch_size=2, output=str(tmp_path / "out"))
    summary = run_all(RunConfig(manifest=str(manifest), pti=dict(model=sd3_dir, **pti), **base))
    assert summary["rows_done"] == 2 and summary["edits"] == 3
    stored = pq.read_table(tmp_path / "out" / "embeddings")
    assert set(stored.column("model_family").to_pylist()) == {"sd3"}
    results = pq.read_table(tmp_path / "out" / "results")
    assert all(Image.open(u).size == (64, 64) for u in results["image_uri"].to_pylist())
    targets = tmp_path / "targets.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"id": "chelsea", "target_prompts": ["a photo of a tiger"]}]), targets
    )
    assert run_edit(RunConfig(targets=str(targets), pti=dict(model=sd3_dir, **pti), **base))["edits"] == 1
    with pytest.raises(
        InputError, match=r"made by Stable Diffusion 3 \(sd3\), but model .* is Stable Diffusion 1"
    ):
        run_edit(RunConfig(targets=str(targets), pti=dict(model=tiny_model_dir, **pti), **base))


def test_attention_control_is_refused_on_sd3_by_the_engine_and_by_the_driver_before_any_work(
    sd3, sd3_dir, tmp_path
):
    """Prompt-to-Prompt control needs a UNet's cross-attention layers: on SD3's joint attention it
    is refused with the reason, by the engine and, for a job, on the driver (no Ray work starts)."""
    from pipeline.batch.config import RunConfig
    from pipeline.batch.resume import Committed
    from pipeline.errors import InputError

    with pytest.raises(InputError, match=r"attention control \(control=auto\) works on the UNet families"):
        Engine(sd3, PTIConfig(model=sd3_dir, control="auto"))
    config = RunConfig(manifest="m.parquet", output=str(tmp_path), pti=dict(model=sd3_dir, control="refine"))
    with pytest.raises(InputError, match=r"use control=none with this model"):
        Committed().check_model_family(config)
    Committed().check_model_family(
        RunConfig(manifest="m.parquet", output=str(tmp_path), pti=dict(model=sd3_dir))
    )


def test_sd3_loads_from_an_object_store_with_its_three_tokenizers_and_sharded_t5(
    sd3_dir, s3_server, tmp_path
):
    """What an object store (or the hub) holds of an SD3 checkpoint is fetched as the layout says:
    T5 ships in shards with an index (SD3.5's does), and the third tokenizer."""
    import s3fs
    from safetensors.torch import load_file, save_file

    sharded = Path(shutil.copytree(sd3_dir, tmp_path / "sharded"))
    weights = load_file(sharded / "text_encoder_3" / "model.safetensors")
    (sharded / "text_encoder_3" / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file(
            {k: weights[k] for k in keys}, sharded / "text_encoder_3" / shard, metadata={"format": "pt"}
        )
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (sharded / "text_encoder_3" / "model.safetensors.index.json").write_text(json.dumps(index))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, key="testing", secret="testing")
    fs.mkdir("models-sd3")
    fs.put(str(sharded), "models-sd3/tiny-sd3", recursive=True)
    options = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    sd = load_stable_diffusion(
        "s3://models-sd3/tiny-sd3", device="cpu", cache_dir=tmp_path / "c", storage_options=options
    )
    local = load_stable_diffusion(sd3_dir, device="cpu")
    assert sd.family == "sd3" and sd.tokenizer_3 is not None
    assert torch.equal(encode_prompts(sd, ["a red cat"]), encode_prompts(local, ["a red cat"]))


@pytest.mark.parametrize("method", ["pti", "nti", "npi", "ddim"])
def test_every_method_runs_on_sd3_and_eta_0_edits_back_to_its_reconstruction(sd3, pixels, method):
    """PTI and its baselines (null-text, negative-prompt and plain inversion) share the flow step:
    each inverts and reconstructs the tiny SD3's latents, the tuning methods tune the branch they
    name, and an edit at eta 0 is the method's own reconstruction."""
    config = PTIConfig(model="tiny-sd3", method=method, steps=4, inner_steps=3, guidance=3.0, progress=False)
    engine = Engine(sd3, config)
    inversion = engine.invert_and_tune(pixels[1:], SOURCES[1:])
    assert bool(inversion.finite.all()) and inversion.z_T.shape == (2, 16, 8, 8)
    assert (inversion.uncond is None) == (method in ("pti", "ddim"))  # nti, npi: a per-step uncond stack
    assert bool((inversion.inner_steps > 0).any()) == (method in ("pti", "nti"))
    back = engine.edit(inversion, [0, 1], ["a photo of a dog", "a cup of tea"], [0.0, 0.0])
    torch.testing.assert_close(back, inversion.reconstruction, rtol=0, atol=1e-5)


def test_pti_edit_on_sd3_writes_its_edits_and_counts_transformer_calls(sd3_dir, photos, tmp_path):
    """The one-image command on the flow family, as a user runs it; and with attention control
    asked for, a clear refusal (exit 2) before any work."""
    from PIL import Image
    from typer.testing import CliRunner

    from jobs.cli import app

    image = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(image)
    out = tmp_path / "out"
    args = ["edit", str(image), "--model", sd3_dir, "--steps", "3", "--inner-steps", "2", "--quiet"]
    args += ["--target", "a photo of a dog", "--eta", "0.8", "--eta", "1.0", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [e["file"] for e in summary["edits"]] == ["0-0.8.png", "0-1.png"]
    assert all(Image.open(out / e["file"]).size == (64, 64) for e in summary["edits"])
    cost = PTIConfig(steps=3, inner_steps=2).unet_evaluations(edits=2)
    # Stage 1 (early stop may end its inner loops sooner), then both edits in one call per step.
    assert 3 + 3 <= summary["unet_calls"] <= cost["stage_one"] + 3
    refused = CliRunner().invoke(app, [*args, "--control", "auto"])
    assert refused.exit_code == 2 and "works on the UNet families" in refused.output
