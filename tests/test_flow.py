"""The flow-matching step (docs/flow-matching.md): PTI's functions on a ``FlowSchedule``, checked
against diffusers' ``FlowMatchEulerDiscreteScheduler`` and against the ODE's own behaviour, on
velocity fields written here (no model: the schedule and the step are what is under test)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.engine.algorithm import (
    FlowSchedule,
    TuningOptions,
    flow_schedule,
    invert,
    latent_mse,
    sample,
    tune_prompt_embeddings,
)

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5's scheduler config


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)


def field(z: torch.Tensor, t: float, emb: torch.Tensor) -> torch.Tensor:
    """A smooth velocity field that depends on the latent, the time and the embedding."""
    t = torch.as_tensor(t, dtype=z.dtype) / 1000
    return torch.tanh(z) * (0.5 + t) - 0.3 * z + emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def latents(batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)


def embeddings(batch: int = 2, value: float = 0.1, dtype=torch.float64) -> torch.Tensor:
    return torch.full((batch, 3, 8), value, dtype=dtype)


def test_the_schedule_is_the_schedulers_in_ddim_order():
    schedule = flow_schedule(scheduler(), 10)
    reference = scheduler()
    reference.set_timesteps(10)
    assert isinstance(schedule, FlowSchedule) and schedule.num_steps == 10
    assert schedule.sigmas[0] == 0 and schedule.sigmas[-1] == pytest.approx(1.0)
    assert list(schedule.sigmas) == sorted(schedule.sigmas)  # sigma_0 (the image) first
    assert list(reversed(schedule.sigmas)) == pytest.approx(reference.sigmas.tolist())
    assert list(reversed(schedule.timesteps[1:])) == pytest.approx(reference.timesteps.tolist())
    # SD3's shift: sigma = 3 s / (1 + 2 s) on the linear grid s, so the middle sits above one half.
    assert schedule.sigmas[5] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.06)


def test_sampling_is_diffusers_euler_loop_step_for_step():
    """The engine's sampler on a flow schedule takes exactly the steps of diffusers' scheduler loop,
    giving the model the same timesteps (guidance 1: the conditional branch alone)."""
    z_T, cond = latents(dtype=torch.float32), embeddings(dtype=torch.float32)
    seen_ours, seen_theirs = [], []

    def ours(z, t, emb):
        seen_ours.append(float(t))
        return field(z, t, emb)

    schedule = flow_schedule(scheduler(), 12)
    stack = cond.unsqueeze(1).expand(-1, 12, -1, -1)
    mine = sample(ours, z_T, stack, torch.zeros_like(cond), schedule, 1.0)
    reference = scheduler()
    reference.set_timesteps(12)
    z = z_T
    for t in reference.timesteps:
        seen_theirs.append(float(t))
        z = reference.step(field(z, t, cond), t, z).prev_sample
    assert seen_ours == pytest.approx(seen_theirs)
    torch.testing.assert_close(mine, z)


def test_a_velocity_that_ignores_the_latent_inverts_and_reconstructs_exactly():
    """Inversion evaluates the velocity at the target level on the current latent, sampling at the
    current level: with a field that does not depend on the latent the two are the same numbers,
    so the Euler steps cancel and the image comes back to the last bit of float64."""
    z0, cond = latents(), embeddings()

    def constant(z, t, emb):
        return torch.ones_like(z) * (float(t) / 1000) + emb.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    schedule = flow_schedule(scheduler(), 8)
    trajectory = invert(constant, z0, cond, cond, schedule, guidance=1.0)
    stack = cond.unsqueeze(1).expand(-1, 8, -1, -1)
    back = sample(constant, trajectory[-1], stack, cond, schedule, 1.0)
    torch.testing.assert_close(back, z0, rtol=0, atol=1e-12)


def test_inversion_then_reconstruction_errs_by_the_first_order_discretisation_error():
    """Euler inversion is first order: doubling the steps about halves what the round trip misses
    (measured on this field: 0.019, 0.0076, 0.0034, 0.0016 at 8 to 64 steps, ratios 2.5, 2.2, 2.1
    tending to 2), a small part of how far the ODE moves the latent (0.39)."""
    z0, cond = latents(), embeddings()
    errors = []
    for steps in (8, 16, 32, 64):
        schedule = flow_schedule(scheduler(), steps)
        trajectory = invert(field, z0, cond, cond, schedule, guidance=1.0)
        stack = cond.unsqueeze(1).expand(-1, steps, -1, -1)
        back = sample(field, trajectory[-1], stack, cond, schedule, 1.0)
        errors.append(float(latent_mse(back, z0).sqrt().max()))
    moved = float(latent_mse(trajectory[-1], z0).sqrt().min())
    assert errors[0] < 0.1 * moved
    ratios = [coarse / fine for coarse, fine in zip(errors, errors[1:])]
    assert all(1.8 < r < 3.0 for r in ratios) and abs(ratios[-1] - 2) < 0.3


def test_prompt_tuning_on_a_flow_schedule_retraces_the_inversion_under_guidance_and_per_image():
    """PTI's stage 1b on the flow step: guided reconstruction (w = 3) from the inverted latent
    misses the image with the source embedding and lands closer with the tuned ones; a batch gives
    each image what it gets alone."""
    z0, source, null = latents(), embeddings(value=0.1), embeddings(value=0.0)
    schedule = flow_schedule(scheduler(), 6)
    trajectory = invert(field, z0, source, null, schedule, guidance=1.0)
    options = TuningOptions(guidance=3.0, inner_steps=20, lr=0.05, early_stop=False, stop_eps=0, stop_slack=0)
    untuned = tune_prompt_embeddings(
        field, trajectory, source, null, schedule, replace(options, inner_steps=0)
    )
    tuned = tune_prompt_embeddings(field, trajectory, source, null, schedule, options)
    assert bool(tuned.finite.all())
    assert bool((latent_mse(tuned.reconstruction, z0) < 0.1 * latent_mse(untuned.reconstruction, z0)).all())
    # Sampling with the tuned embeddings at w = 3 is the reconstruction the tuning reached.
    edited = sample(field, trajectory[-1], tuned.embeddings, null, schedule, 3.0)
    torch.testing.assert_close(edited, tuned.reconstruction, rtol=0, atol=1e-12)
    alone = tune_prompt_embeddings(
        field, [z[1:] for z in trajectory], source[1:], null[1:], schedule, options
    )
    torch.testing.assert_close(alone.embeddings[0], tuned.embeddings[1], rtol=0, atol=1e-10)
