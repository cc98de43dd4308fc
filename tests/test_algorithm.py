"""The algorithm of ALGORITHM.md, checked against independent implementations and its own claims."""

from __future__ import annotations

import copy
import dataclasses

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from pipeline.engine import algorithm
from pipeline.engine.config import METHODS, Method, PTIConfig
from pipeline.engine.models import NoisePredictor
from pipeline.engine.stored import config_of, inversion_from_arrow, inversion_to_arrow
from pipeline.engine.text import encode_prompts

SOURCES = ["a photo of an astronaut", None, "a cup of coffee"]


@pytest.fixture(scope="module")
def pti(make_engine):
    return make_engine()


@pytest.fixture(scope="module")
def tuned(pti, pixels):
    """Stage 1 of the three photographs as one batch."""
    return pti.invert_and_tune(pixels, SOURCES)


def latent_mse(a, b) -> float:
    return float((a - b).pow(2).mean())


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_inversion_matches_diffusers_ddim_inverse_scheduler(make_engine, pixels, guidance):
    engine = make_engine(inversion_guidance=guidance)
    z0 = engine.encode_images(pixels[:1])
    cond = encode_prompts(engine.sd, ["a photo of an astronaut"])
    ours = algorithm.invert(engine.eps, z0, cond, engine.null, engine.schedule, guidance)

    inverse = DDIMInverseScheduler.from_config(engine.sd.scheduler.config, set_alpha_to_one=False)
    inverse.set_timesteps(engine.config.steps)
    z, theirs = z0, [z0]
    with torch.no_grad():
        for t in inverse.timesteps:
            emb = cond if guidance == 1 else engine.null
            z = inverse.step(engine.eps(z, int(t), emb), t, z).prev_sample
            theirs.append(z)
    assert [int(t) for t in inverse.timesteps] == list(engine.schedule.timesteps[1:])
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
    assert latent_mse(ours[-1], z0) > 0.1  # it really moved: the test compares trajectories, not copies


def test_pti_reconstructs_at_least_10x_closer_than_ddim_and_its_loss_falls(make_engine, pixels, tuned):
    ddim = make_engine(method="ddim").invert_and_tune(pixels, SOURCES)
    z0 = make_engine().encode_images(pixels)
    for b in range(len(pixels)):
        pti_error = latent_mse(tuned.reconstruction_latent[b], z0[b])
        ddim_error = latent_mse(ddim.reconstruction_latent[b], z0[b])
        assert ddim_error >= 10 * pti_error, (b, ddim_error, pti_error)
    assert bool((tuned.final_loss < tuned.initial_loss).all())  # at every timestep of every image
    assert float(tuned.final_loss.mean()) < 0.9 * float(tuned.initial_loss.mean())
    assert int(ddim.inner_steps.sum()) == 0 and int(tuned.inner_steps.sum()) > 0
    assert tuned.psnr.shape == (3,) and torch.all(tuned.ssim <= 1)


def test_eta_zero_reproduces_the_reconstruction(pti, tuned):
    edits = pti.edit(tuned, [0, 1, 2], ["a tiger", "a dog", "a red car"], [0.0, 0.0, 0.0])
    # Tuning calls the two branches apart, editing in one batch: equal up to float noise
    # (1e-3 is a quarter of an 8-bit level).
    torch.testing.assert_close(edits, tuned.reconstruction, rtol=0, atol=1e-3)


def test_eta_one_is_plain_target_sampling_with_diffusers_ddim(pti, tuned):
    target = "a photo of a tiger"
    edit = pti.edit(tuned, [0], [target], [1.0])

    scheduler = DDIMScheduler.from_config(pti.sd.scheduler.config)
    scheduler.set_timesteps(pti.config.steps)
    cond = encode_prompts(pti.sd, [target])
    z = tuned.z_T[:1]
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_null, e_cond = pti.eps(torch.cat([z, z]), int(t), torch.cat([pti.null, cond])).chunk(2)
            z = scheduler.step(e_null + pti.config.guidance * (e_cond - e_null), t, z).prev_sample
    torch.testing.assert_close(edit, pti.decode_latents(z), rtol=0, atol=1e-4)
    assert latent_mse(edit, tuned.reconstruction[:1]) > 1e-3  # the edit changed the image


@pytest.fixture(scope="module")
def float64(tiny_sd, pixels, make_engine):
    """The tiny model in float64, so batch-versus-alone differences are the algorithm's, not float
    noise (at float32, Adam turns rounding differences into visible drift over many steps)."""
    sd = dataclasses.replace(tiny_sd, unet=copy.deepcopy(tiny_sd.unet).double(), dtype=torch.float64)
    engine = make_engine()
    eps = NoisePredictor(sd)
    z0 = engine.encode_images(pixels).double()
    cond = encode_prompts(tiny_sd, [s or "" for s in SOURCES]).double()
    null = engine.null.double().expand(len(SOURCES), -1, -1)
    trajectory = algorithm.invert(eps, z0, cond, null, engine.schedule)
    return eps, engine.schedule, trajectory, cond, null


def tune_rows(float64, rows, **settings):
    eps, schedule, trajectory, cond, null = float64
    options = PTIConfig(lr=0.1, **settings).tuning_options()
    return algorithm.tune_prompt_embeddings(
        eps, [z[rows] for z in trajectory], cond[rows], null[rows], schedule, options
    )


@pytest.fixture(scope="module")
def tuned_float64(float64):
    """The three images tuned together, 10 inner steps each, no early stop."""
    return tune_rows(float64, [0, 1, 2], inner_steps=10, early_stop=False)


def test_batched_tuning_equals_one_at_a_time(float64, tuned_float64):
    batch = tuned_float64
    for b in range(3):
        alone = tune_rows(float64, [b], inner_steps=10, early_stop=False)
        torch.testing.assert_close(alone.embeddings[0], batch.embeddings[b], rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(alone.reconstruction[0], batch.reconstruction[b], rtol=1e-7, atol=1e-8)


def test_per_image_early_stop_matches_one_at_a_time(float64, tuned_float64):
    # A threshold inside the spread of the losses, so images stop at different inner steps.
    stop_eps = float(tuned_float64.final_loss.median())
    batch = tune_rows(float64, [0, 1, 2], inner_steps=10, stop_eps=stop_eps, stop_slack=0.0)
    assert batch.steps.min() < 10 and batch.steps.max() == 10
    assert len(set(batch.steps.sum(1).tolist())) > 1, "images should stop at different points"
    for b in range(3):
        alone = tune_rows(float64, [b], inner_steps=10, stop_eps=stop_eps, stop_slack=0.0)
        assert torch.equal(alone.steps[0], batch.steps[b])
        torch.testing.assert_close(alone.embeddings[0], batch.embeddings[b], rtol=1e-7, atol=1e-8)


def test_batched_editing_equals_one_at_a_time(float64):
    eps, schedule, trajectory, cond, null = float64
    stacks = tune_rows(float64, [0, 1, 2], inner_steps=2).embeddings
    target = torch.randn_like(cond, generator=torch.Generator().manual_seed(0))
    eta = torch.tensor([0.0, 0.6, 1.0], dtype=torch.float64)

    def edit(rows):
        cond = algorithm.interpolate_embeddings(stacks[rows], target[rows], eta[rows])
        return algorithm.sample(eps, trajectory[-1][rows], cond, null[rows], schedule, 7.5)

    batch = edit([0, 1, 2])
    for b in range(3):
        torch.testing.assert_close(edit([b])[0], batch[b], rtol=1e-7, atol=1e-8)
    assert float((batch[1] - batch[2]).abs().max()) > 1e-3  # the weights matter


def test_engine_batches_agree_at_float32(pti, pixels, tuned):
    """At float32 the same holds within the noise the optimisation amplifies."""
    rows, targets, etas = [0, 0, 1, 2], ["a tiger", "a dog", "a dog", "a red car"], [0.6, 0.8, 1.0, 0.3]
    batch = pti.edit(tuned, rows, targets, etas)
    for n in range(len(rows)):
        alone = pti.edit(tuned, [rows[n]], [targets[n]], [etas[n]])
        torch.testing.assert_close(alone[0], batch[n], rtol=0, atol=1e-3)
    alone = pti.invert_and_tune(pixels[1:2], SOURCES[1:2])
    torch.testing.assert_close(
        alone.reconstruction_latent[0], tuned.reconstruction_latent[1], rtol=0, atol=2e-2
    )


def test_unet_calls_match_the_costs_in_algorithm_md(make_engine, pixels):
    engine = make_engine(early_stop=False)
    T, K = engine.config.steps, engine.config.inner_steps
    engine.eps.calls = engine.eps.evaluations = 0
    inversion = engine.invert_and_tune(pixels[:2], [None, None])
    cost = engine.config.unet_evaluations(edits=2)  # the library's formula, checked against the count
    assert engine.eps.calls == T + T * (1 + K + 1) == cost["stage_one"]  # one call serves the whole batch
    assert engine.eps.evaluations == 2 * engine.eps.calls  # ... and evaluates each image once
    engine.eps.calls = engine.eps.evaluations = 0
    engine.edit(inversion, [0, 1, 1], ["a", "b", "c"], [0.5, 0.5, 1.0])
    assert engine.eps.calls == T  # both guidance branches of all edits in one call per step
    assert engine.eps.evaluations == 2 * T * 3  # 2T evaluations per edit
    assert cost["stage_two"] + engine.config.unet_evaluations(edits=1)["stage_two"] == 2 * T * 3


def test_tuning_gives_gradients_only_to_the_embeddings(pti, tuned):
    assert all(p.grad is None for p in pti.sd.unet.parameters())
    assert not any(p.requires_grad for p in pti.sd.unet.parameters())
    assert not tuned.cond.requires_grad
    # Each timestep's embedding was tuned away from the one before it.
    assert float((tuned.cond[:, 1:] - tuned.cond[:, :-1]).abs().amax()) > 0


def test_stage_one_is_deterministic(pti, pixels, tuned):
    again = pti.invert_and_tune(pixels, SOURCES)
    assert torch.equal(again.cond, tuned.cond) and torch.equal(again.z_T, tuned.z_T)


@pytest.mark.parametrize("method", ["nti", "npi", "ddim"])
def test_every_method_edits_at_eta_zero_to_its_own_reconstruction(make_engine, pixels, method):
    engine = make_engine(method=method)
    inversion = engine.invert_and_tune(pixels[:2], SOURCES[:2])
    edits = engine.edit(inversion, [0, 1], ["a tiger", "a dog"], [0.0, 0.0])
    torch.testing.assert_close(edits, inversion.reconstruction, rtol=0, atol=1e-3)
    assert (inversion.uncond is None) == (method == "ddim")


# What each method must do, written out apart from METHODS: the branch that gets a per-step
# embedding, where that embedding starts, whether Adam tunes it, and the inversion's guidance.
METHOD_BEHAVIOUR = {
    "pti": ("cond", "source", True, 0.0),
    "ddim": ("cond", "source", False, 0.0),
    "nti": ("uncond", "null", True, 1.0),
    "npi": ("uncond", "source", False, 1.0),
}


@pytest.mark.parametrize("method", list(METHOD_BEHAVIOUR))
def test_the_method_table_decides_which_embedding_stage_one_learns(make_engine, pixels, method):
    branch, start, tuned, inversion_guidance = METHOD_BEHAVIOUR[method]
    assert METHODS[method] == Method(method, branch, tuned, start, inverts_on_source=inversion_guidance == 1)
    engine = make_engine(method=method)  # inversion_guidance 0 in the config: nti and npi override it
    T, K = engine.config.steps, engine.config.inner_steps
    assert engine.config.tuning_options().inner_steps == (K if tuned else 0)
    inversion = engine.invert_and_tune(pixels[:2], SOURCES[:2])

    src = encode_prompts(engine.sd, [s or "" for s in SOURCES[:2]])
    null = engine.null.expand(2, -1, -1)
    z0 = engine.encode_images(pixels[:2])
    inverted = algorithm.invert(engine.eps, z0, src, null, engine.schedule, inversion_guidance)
    assert torch.equal(inversion.z_T, inverted[-1])
    if branch == "cond":
        per_step = inversion.cond
        assert inversion.uncond is None  # psi("") in the unconditional branch
    else:
        per_step = inversion.uncond
        assert torch.equal(inversion.cond, src.unsqueeze(1).expand(-1, T, -1, -1))
    begin = (src if start == "source" else null).unsqueeze(1).expand(-1, T, -1, -1)
    moved = (per_step - begin).abs().flatten(2).amax(2)  # [B, T]: how far from where it started
    if tuned:  # the losses (about 0.1) never reach the early stop: K steps at every timestep
        assert inversion.inner_steps.tolist() == [[K] * T] * 2
        assert float(moved.min()) > 0.5
        assert float(inversion.final_loss.mean()) < 0.9 * float(inversion.initial_loss.mean())
    else:
        assert int(inversion.inner_steps.abs().sum()) == 0
        assert torch.equal(per_step, begin)
        assert torch.equal(inversion.final_loss, inversion.initial_loss)


def test_null_text_inversion_reconstructs_closer_than_negative_prompt_inversion(make_engine, pixels):
    z0 = make_engine().encode_images(pixels)
    nti = make_engine(method="nti").invert_and_tune(pixels, SOURCES)
    npi = make_engine(method="npi").invert_and_tune(pixels, SOURCES)
    assert latent_mse(nti.reconstruction_latent, z0) < latent_mse(npi.reconstruction_latent, z0)
    # NPI uses the source embedding for both branches: its stored uncond is psi(source).
    torch.testing.assert_close(npi.uncond, npi.cond)


@pytest.mark.parametrize("embedding_dtype", ["float32", "float16"])
def test_stored_stage_one_read_back_by_plain_pyarrow_gives_the_same_edits(
    make_engine, pixels, tuned, tmp_path, embedding_dtype
):
    engine = make_engine(embedding_dtype=embedding_dtype)
    path = tmp_path / "embeddings.parquet"
    pq.write_table(inversion_to_arrow(engine, tuned, ["a", "b", "c"], SOURCES), path)

    table = pq.read_table(path)  # plain pyarrow: no Ray, no project code
    stack = table["prompt_embeddings"].combine_chunks()
    assert stack.type.extension_name == "arrow.fixed_shape_tensor"
    array = stack.to_numpy_ndarray()
    T, L, D = engine.config.steps, 77, engine.sd.text_encoder.config.hidden_size
    assert array.shape == (3, T, L, D) and array.dtype.name == embedding_dtype
    assert table["z_T"].combine_chunks().to_numpy_ndarray().shape == (3, 4, 8, 8)
    assert table["id"].to_pylist() == ["a", "b", "c"] and table["source_prompt"].to_pylist() == SOURCES
    assert table["uncond_embeddings"].null_count == 3

    stored = inversion_from_arrow(table)
    assert config_of(table) == engine.config
    assert torch.equal(stored.z_T, tuned.z_T)
    assert torch.equal(stored.cond, tuned.cond.to(getattr(torch, embedding_dtype)).float())
    rows, targets, etas = [0, 1, 2], ["a tiger", "a dog", "a red car"], [0.6, 0.8, 0.0]
    from_storage = engine.edit(stored, rows, targets, etas)
    # Equal up to float noise (buffers that numpy allocated can take other SIMD paths).
    atol = 1e-2 if embedding_dtype == "float16" else 1e-3
    torch.testing.assert_close(from_storage, engine.edit(tuned, rows, targets, etas), rtol=0, atol=atol)


def test_stored_null_text_embeddings_round_trip(make_engine, pixels, tmp_path):
    engine = make_engine(method="nti", embedding_dtype="float32")
    inversion = engine.invert_and_tune(pixels[:2], SOURCES[:2])
    pq.write_table(inversion_to_arrow(engine, inversion, ["a", "b"], SOURCES[:2]), tmp_path / "e.parquet")
    stored = inversion_from_arrow(pq.read_table(tmp_path / "e.parquet"))
    torch.testing.assert_close(stored.uncond, inversion.uncond, rtol=0, atol=0)
    torch.testing.assert_close(
        engine.edit(stored, [0, 1], ["x", "y"], [0.0, 0.0]), inversion.reconstruction, rtol=0, atol=1e-3
    )


def test_v_prediction_checkpoints_are_turned_into_epsilon(tiny_sd, pixels, make_engine):
    from diffusers import DDIMScheduler

    v_scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config, prediction_type="v_prediction")
    v_eps = NoisePredictor(dataclasses.replace(tiny_sd, scheduler=v_scheduler))
    engine = make_engine()
    z, t = engine.encode_images(pixels[:1]), 501
    with torch.no_grad():
        v = tiny_sd.unet(z, t, encoder_hidden_states=engine.null).sample
        a = float(tiny_sd.scheduler.alphas_cumprod[t])
        torch.testing.assert_close(v_eps(z, t, engine.null), a**0.5 * v + (1 - a) ** 0.5 * z)
