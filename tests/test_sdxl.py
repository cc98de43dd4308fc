"""Stable Diffusion XL (ALGORITHM.md, "Stable Diffusion XL"), on a tiny SDXL of the real
architecture: two text encoders, the pooled embedding and ``text_time`` added conditioning.

The reference side of each check drives the SDXL UNet directly with what diffusers'
``StableDiffusionXLPipeline`` computes (its ``encode_prompt`` and ``_get_add_time_ids``), so the
engine's way of carrying the pair (``models.join_pooled``) is checked, not assumed.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from pipeline.engine import algorithm
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.engine.models import NoisePredictor, load_stable_diffusion, split_pooled
from pipeline.engine.stored import inversion_from_arrow, inversion_to_arrow
from pipeline.engine.text import encode_prompts
from pipeline.errors import InputError, ModelError
from pipeline.world.tiny import build_tiny_model

SOURCES = ["a photo of an astronaut", None, "a cup of coffee"]
CONFIG = dict(steps=6, inner_steps=8, lr=0.1, progress=False, device="cpu")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0, family="sdxl"))


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load_stable_diffusion(sdxl_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(sdxl_dir):
    """diffusers' own SDXL pipeline over the same files: what the engine must agree with."""
    return StableDiffusionXLPipeline.from_pretrained(sdxl_dir)


@pytest.fixture(scope="module")
def make_xl(sdxl, sdxl_dir):
    def make(**overrides) -> Engine:
        return Engine(sdxl, PTIConfig(model=sdxl_dir, **{**CONFIG, **overrides}))

    return make


@pytest.fixture(scope="module")
def tuned(make_xl, pixels):
    return make_xl().invert_and_tune(pixels, SOURCES)


def unet_eps(reference, prompts: list[str]):
    """``eps(z, t)`` of diffusers' SDXL conditioning for ``prompts`` (empty: the zeros SDXL base
    uses for an empty negative prompt), built by its pipeline, the UNet called directly."""
    embeds, negative, pooled, negative_pooled = reference.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=True
    )
    if prompts == [""]:
        embeds, pooled = negative, negative_pooled  # force_zeros_for_empty_prompt: zeros
    side = reference.unet.config.sample_size * reference.vae_scale_factor
    time_ids = reference._get_add_time_ids(
        (side, side), (0, 0), (side, side), embeds.dtype, reference.text_encoder_2.config.projection_dim
    )

    def eps(z, t):
        added = {"text_embeds": pooled.expand(len(z), -1), "time_ids": time_ids.expand(len(z), -1)}
        with torch.no_grad():
            return reference.unet(
                z, t, encoder_hidden_states=embeds.expand(len(z), -1, -1), added_cond_kwargs=added
            ).sample

    return eps


def test_the_loader_recognises_sdxl_and_encodes_prompts_as_its_pipeline_does(sdxl, reference):
    assert sdxl.family == "sdxl" and sdxl.force_zeros_for_empty_prompt and sdxl.resolution == 64
    prompts = ["a photo of an astronaut", "a cup of coffee"]
    embeds, negative, pooled, negative_pooled = reference.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=True
    )
    ours = encode_prompts(sdxl, prompts)
    tokens, ours_pooled = split_pooled(ours, sdxl.pooled_dim)
    assert torch.equal(tokens, embeds) and torch.equal(ours_pooled, pooled)
    assert not torch.equal(ours[0], ours[1])  # different prompts, different embeddings
    assert bool((ours[:, -1, sdxl.pooled_dim :] == 0).all())  # the padding of the pooled row
    engine = Engine(sdxl, PTIConfig(model="-", **CONFIG))
    assert bool((engine.null == 0).all()) and not bool((negative == 1).any())  # zeros, as the pipeline


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_inversion_matches_diffusers_ddim_inverse_scheduler_through_the_sdxl_unet(
    make_xl, reference, pixels, guidance
):
    engine = make_xl(inversion_guidance=guidance)
    z0 = engine.encode_images(pixels[:1])
    cond = encode_prompts(engine.sd, [SOURCES[0]])
    ours = algorithm.invert(engine.eps, z0, cond, engine.null, engine.schedule, guidance)

    inverse = DDIMInverseScheduler.from_config(engine.sd.scheduler.config, set_alpha_to_one=False)
    inverse.set_timesteps(engine.config.steps)
    eps = unet_eps(reference, [SOURCES[0]] if guidance == 1 else [""])
    z, theirs = z0, [z0]
    for t in inverse.timesteps:
        z = inverse.step(eps(z, int(t)), t, z).prev_sample
        theirs.append(z)
    for mine, other in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-5)
    assert float((ours[-1] - z0).pow(2).mean()) > 0.1  # it moved


def test_eta_zero_is_the_reconstruction_and_eta_one_plain_target_sampling(make_xl, reference, tuned):
    pti = make_xl()
    zero = pti.edit(tuned, [0, 1, 2], ["a tiger", "a dog", "a red car"], [0.0] * 3)
    torch.testing.assert_close(zero, tuned.reconstruction, rtol=0, atol=1e-3)

    target = "a photo of a tiger"
    edit = pti.edit(tuned, [0], [target], [1.0])
    scheduler = DDIMScheduler.from_config(pti.sd.scheduler.config)
    scheduler.set_timesteps(pti.config.steps)
    cond, null = unet_eps(reference, [target]), unet_eps(reference, [""])
    z = tuned.z_T[:1]
    for t in scheduler.timesteps:
        e_cond, e_null = cond(z, int(t)), null(z, int(t))
        z = scheduler.step(e_null + pti.config.guidance * (e_cond - e_null), t, z).prev_sample
    torch.testing.assert_close(edit, pti.decode_latents(z), rtol=0, atol=1e-4)
    assert float((edit - tuned.reconstruction[:1]).pow(2).mean()) > 1e-3  # the edit changed the image


def test_pti_tunes_the_pooled_embedding_with_the_tokens(sdxl, tuned):
    source = encode_prompts(sdxl, [s or "" for s in SOURCES])
    tokens, pooled = split_pooled(tuned.cond, sdxl.pooled_dim)  # [B, T, ...]
    start_tokens, start_pooled = split_pooled(source, sdxl.pooled_dim)
    moved = (pooled - start_pooled.unsqueeze(1)).abs().amax(-1)  # [B, T]
    assert bool((moved[:, -1] > 1e-3).all()), moved  # every image's pooled embedding was tuned
    assert bool(((tokens - start_tokens.unsqueeze(1)).abs().amax((-1, -2))[:, -1] > 1e-3).all())
    assert bool((tuned.cond[..., -1, sdxl.pooled_dim :] == 0).all())  # the padding never moves
    assert bool((tuned.final_loss < tuned.initial_loss).all()) and bool(tuned.finite.all())


def test_batched_tuning_equals_one_at_a_time(sdxl, make_xl, pixels):
    sd = dataclasses.replace(sdxl, unet=copy.deepcopy(sdxl.unet).double(), dtype=torch.float64)
    eps, engine = NoisePredictor(sd), make_xl()
    z0 = engine.encode_images(pixels).double()
    cond = encode_prompts(sdxl, [s or "" for s in SOURCES]).double()
    null = engine.null.double().expand(len(SOURCES), -1, -1)
    trajectory = algorithm.invert(eps, z0, cond, null, engine.schedule)
    options = PTIConfig(lr=0.1, inner_steps=6, early_stop=False).tuning_options()

    def tune(rows):
        return algorithm.tune_prompt_embeddings(
            eps, [z[rows] for z in trajectory], cond[rows], null[rows], engine.schedule, options
        )

    batch = tune([0, 1, 2])
    for b in range(3):
        alone = tune([b])
        torch.testing.assert_close(alone.embeddings[0], batch.embeddings[b], rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(alone.reconstruction[0], batch.reconstruction[b], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("method", ["pti", "nti", "npi", "ddim"])
def test_every_method_with_attention_control_edits_toward_the_source_to_its_reconstruction(
    make_xl, pixels, method
):
    full = dict(control="replace", cross_replace_steps=1.0, self_replace_steps=1.0)
    engine = make_xl(method=method, steps=4, inner_steps=2, **full)
    source = SOURCES[0]
    inversion = engine.invert_and_tune(pixels[:1], [source])
    eta = 0.0 if method == "pti" else 0.8  # the others' edit embedding is psi(source) at any eta
    plan = engine.attention_plan(source, source)
    controlled = engine.edit(inversion, [0], [source], [eta], plans=[plan])
    plain = engine.edit(inversion, [0], [source], [0.0])
    torch.testing.assert_close(controlled, plain, atol=1e-4, rtol=0)
    edited = engine.edit(
        inversion,
        [0],
        ["a photo of a horse"],
        [0.8],
        plans=[engine.attention_plan(source, "a photo of a horse")],
    )
    assert float((edited - plain).abs().max()) > 1e-3


def test_sdxl_blends_with_its_down_and_up_layers_and_never_its_mid_block(make_xl, pixels, monkeypatch):
    """The tiny SDXL's mid block has cross-attention at the blend resolution (4x4), as SDXL's at 32x32
    does: it is injected but never makes the blend mask (issue 28's rule)."""
    from pipeline.engine import attention

    engine = make_xl(steps=4, inner_steps=2, control="auto", local_blend=True)
    assert engine._controlled_positions() == (16, 16)
    seen = set()
    records = attention.AttentionControl.records

    def spy(self, positions, place):
        recorded = records(self, positions, place)
        seen.add((positions, place, recorded))
        return recorded

    monkeypatch.setattr(attention.AttentionControl, "records", spy)
    source, target = "a photo of a cat", "a photo of a dog"
    inversion = engine.invert_and_tune(pixels[:1], [source])
    edited = engine.edit(inversion, [0], [target], [0.8], plans=[engine.attention_plan(source, target)])
    assert {(p, place) for p, place, recorded in seen if recorded} == {(16, "down"), (16, "up")}
    assert (16, "mid", False) in seen
    assert bool(edited.isfinite().all())


@pytest.mark.parametrize("method", ["pti", "nti"])
def test_stored_sdxl_stage_one_reads_back_with_plain_pyarrow_and_edits_the_same(
    make_xl, pixels, method, sdxl
):
    engine = make_xl(method=method, steps=4, inner_steps=2)
    inversion = engine.invert_and_tune(pixels[:2], SOURCES[:2])
    buffer = io.BytesIO()
    pq.write_table(inversion_to_arrow(engine, inversion, ["a", "b"], SOURCES[:2]), buffer)
    table = pq.read_table(io.BytesIO(buffer.getvalue()))
    assert table.column("model_family").to_pylist() == ["sdxl", "sdxl"]
    pooled = table.column("pooled_prompt_embeddings").combine_chunks().to_numpy_ndarray()
    tokens = table.column("prompt_embeddings").combine_chunks().to_numpy_ndarray()
    assert pooled.shape == (2, 4, sdxl.pooled_dim) and tokens.shape == (2, 4, 77, 2 * sdxl.pooled_dim)
    assert (table.column("pooled_uncond_embeddings").null_count == 2) == (method == "pti")
    back = inversion_from_arrow(table)
    # float16 storage: the edits from the stored stacks agree with the in-memory ones closely
    targets = ["a photo of a dog", "a cup of tea"]
    torch.testing.assert_close(
        engine.edit(back, [0, 1], targets, [0.7, 0.7]),
        engine.edit(inversion, [0, 1], targets, [0.7, 0.7]),
        atol=2e-2,
        rtol=0,
    )


def test_a_checkpoint_missing_its_second_encoder_is_refused_by_name(sdxl_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelError, match=r"missing text_encoder_2/config.json, tokenizer_2/"):
        load_stable_diffusion(str(broken), device="cpu")


def test_sdxl_loads_from_an_object_store_with_both_tokenizers(sdxl_dir, s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, key="testing", secret="testing")
    fs.mkdir("models-xl")
    fs.put(sdxl_dir, "models-xl/tiny-sdxl", recursive=True)
    options = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    sd = load_stable_diffusion(
        "s3://models-xl/tiny-sdxl", device="cpu", cache_dir=tmp_path, storage_options=options
    )
    assert sd.family == "sdxl" and sd.tokenizer_2 is not None
    local = load_stable_diffusion(sdxl_dir, device="cpu")
    assert sd.fingerprint == local.fingerprint
    assert torch.equal(encode_prompts(sd, ["a cat"]), encode_prompts(local, ["a cat"]))


# --- the batch jobs ------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).resize((80, 80)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_jobs_run_and_edit_with_sdxl_and_refuse_a_table_of_the_other_family(
    ray_cluster, sdxl_dir, tiny_model_dir, photos, tmp_path
):
    from pipeline.batch.config import RunConfig
    from pipeline.batch.jobs import run_all, run_edit

    pti = dict(steps=3, inner_steps=2, lr=0.1, etas=[0.6], progress=False, device="cpu")
    rows = [
        {
            "id": "astronaut",
            "image": _png(photos["astronaut"]),
            "source_prompt": "a photo of an astronaut",
            "target_prompts": ["a photo of a robot"],
        },
        {
            "id": "coffee",
            "image": _png(photos["coffee"]),
            "source_prompt": None,
            "target_prompts": ["a cup of tea", "a photo of a cat"],
        },
    ]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    base = dict(gpus_per_actor=1, tune_batch_size=2, edit_batch_size=2)
    summary = run_all(
        RunConfig(
            manifest=str(manifest), output=str(tmp_path / "xl"), pti=dict(model=sdxl_dir, **pti), **base
        )
    )
    assert summary["rows_done"] == 2 and summary["edits"] == 3
    stored = pq.read_table(tmp_path / "xl" / "embeddings")
    assert set(stored.column("model_family").to_pylist()) == {"sdxl"}
    assert stored.schema.field("pooled_prompt_embeddings").type.shape == [3, 32]
    results = pq.read_table(tmp_path / "xl" / "results")
    assert len(results) == 3 and all(Image.open(u).size == (64, 64) for u in results["image_uri"].to_pylist())

    targets = tmp_path / "targets.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"id": "astronaut", "target_prompts": ["a photo of a horse"]}]), targets
    )
    edited = run_edit(
        RunConfig(targets=str(targets), output=str(tmp_path / "xl"), pti=dict(model=sdxl_dir, **pti), **base)
    )
    assert edited["edits"] == 1

    # The other family's model on these stacks, and SDXL on SD 1.x's, are refused before any work.
    sd_run = RunConfig(
        targets=str(targets), output=str(tmp_path / "xl"), pti=dict(model=tiny_model_dir, **pti), **base
    )
    with pytest.raises(
        InputError, match=r"made by Stable Diffusion XL \(sdxl\), but model .* is Stable Diffusion 1.x/2.x"
    ):
        run_edit(sd_run)
    made_by_sd = tmp_path / "sd" / "embeddings"
    made_by_sd.mkdir(parents=True)
    old = stored.select([c for c in stored.column_names if "pooled" not in c]).drop_columns(["model_family"])
    old = old.set_column(
        old.schema.get_field_index("prompt_embeddings"),
        "prompt_embeddings",
        pa.ExtensionArray.from_storage(
            pa.fixed_shape_tensor(pa.float16(), [3, 77, 32]),
            pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * 3 * 77 * 32, np.float16)), 3 * 77 * 32),
        ),
    )
    pq.write_table(old, made_by_sd / "part-old.parquet")  # as written before model_family existed
    with pytest.raises(
        InputError, match=r"made by Stable Diffusion 1.x/2.x \(sd\), but model .* is Stable Diffusion XL"
    ):
        run_edit(
            RunConfig(
                targets=str(targets), output=str(tmp_path / "sd"), pti=dict(model=sdxl_dir, **pti), **base
            )
        )
    assert not (tmp_path / "sd" / "results").exists()
    assert json.loads((tmp_path / "xl" / "summary-edit.json").read_text())["edits"] == 1


def stored_table(
    steps: int, length: int, width: int, pooled: int | None, side: int
) -> tuple[float, pa.Table]:
    """Two images' stage-1 rows at a family's real shapes, written by the pipeline's own writer
    (``inversion_to_arrow``, then pyarrow's defaults), from normal values: as incompressible as
    tuned float16 embeddings. The writer reads only these fields of the engine. Returns the bytes
    per image and the table as plain pyarrow reads it back."""
    from types import SimpleNamespace

    from pipeline.engine.engine import Inversion

    g = torch.Generator().manual_seed(0)
    engine = SimpleNamespace(
        config=PTIConfig(steps=steps),
        sd=SimpleNamespace(family="sdxl" if pooled else "sd", pooled_dim=pooled, fingerprint="0" * 16),
        schedule=SimpleNamespace(timesteps=list(range(steps + 1))),
        fingerprint="0" * 16,
    )
    inversion = Inversion(
        z_T=torch.randn(2, 4, side, side, generator=g),
        cond=torch.randn(2, steps, length + bool(pooled), width, generator=g),  # pooled: the last row
        psnr=torch.full((2,), 30.0),
        ssim=torch.full((2,), 0.9),
        final_loss=torch.full((2, steps), 1e-4),
        seconds={"tune": 2.0},
    )
    table = inversion_to_arrow(engine, inversion, ["a", "b"], ["a photo"] * 2)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return len(buffer.getvalue()) / 2, pq.read_table(io.BytesIO(buffer.getvalue()))


def test_sdxl_stores_about_2_7_times_sd15s_bytes_per_image_readable_by_plain_pyarrow():
    sd15, _ = stored_table(10, 77, 768, None, 64)
    sdxl, back = stored_table(10, 77, 2048, 1280, 128)
    assert 2.5 < sdxl / sd15 < 3.0  # (77 x 2048 + 1280) / (77 x 768), plus z_T
    pooled = back.column("pooled_prompt_embeddings").combine_chunks().to_numpy_ndarray()
    assert pooled.shape == (2, 10, 1280)  # the pooled stack in its own column


def test_a_table_written_before_sdxl_support_reads_and_edits_as_sd(make_engine, pixels):
    """Old SD 1.x tables have neither model_family nor pooled columns: they stay readable, and
    stage 2's reader gives them the family they were written by."""
    from pipeline.batch.stages import attach_targets
    from schemas import embeddings as emb

    engine = make_engine(steps=3, inner_steps=2)
    inversion = engine.invert_and_tune(pixels[:1], [SOURCES[0]])
    new = inversion_to_arrow(engine, inversion, ["a"], SOURCES[:1])
    assert (
        new.column("model_family").to_pylist() == ["sd"]
        and "pooled_prompt_embeddings" not in new.column_names
    )
    old = new.drop_columns(["model_family"])
    buffer = io.BytesIO()
    pq.write_table(old, buffer)
    old = pq.read_table(io.BytesIO(buffer.getvalue()))
    assert emb.family(old) == "sd"
    targets = {
        "a": {"target_prompts": ["a photo of a robot"], "eta": [0.7], "blend_words": None, "reweight": None}
    }
    attached = attach_targets(old, targets=targets)
    assert attached.column(emb.MODEL_FAMILY).to_pylist() == ["sd"]
    back = inversion_from_arrow(attached)
    torch.testing.assert_close(
        engine.edit(back, [0], ["a photo of a robot"], [0.7]),
        engine.edit(inversion, [0], ["a photo of a robot"], [0.7]),
        atol=2e-2,
        rtol=0,
    )
