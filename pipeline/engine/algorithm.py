"""Prompt Tuning Inversion (Dong et al., ICCV 2023) and its baselines, as pure tensor functions.

Each function is one step of ``ALGORITHM.md`` (the project's specification) and takes the noise
predictor as a plain callable ``eps(z, t, emb) -> noise``: no models, I/O, Ray or config here.
Latents and embeddings are batched along the first axis; images in a batch never interact, so a
batch gives each image what it would get alone.

The schedule carries the model family's step (``Schedule.move``): DDIM's for the noise-predicting
UNets (SD 1.x/2.x, SDXL), Euler's on the flow ODE for the velocity-predicting transformers of the
SD3 family (``FlowSchedule``; docs/flow-matching.md). Every function below is the same for both:
the predictor's output is noise for one and velocity for the other, and guidance, inversion,
tuning and sampling only ever combine predictions linearly and hand them to ``move``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

NoiseFn = Callable[[Tensor, float, Tensor], Tensor]  # eps(z, t, emb): noise (DDIM) or velocity (flow)
Guidance = float | Tensor  # one weight, or one per batch row
# Called after each sampling step with what it reached (k-diffusion's ``callback``, diffusers'
# ``callback_on_step_end``): ``step`` (0 to T - 1), ``timestep`` and the latents ``z``, plus what a
# sampler adds. For observing (benchmarks, previews); it must not change the tensors.
StepCallback = Callable[[dict], None]


@dataclass(frozen=True)
class Schedule:
    """DDIM timesteps ``tau_0 < tau_1 < ... < tau_T`` and ``a(tau_i)`` (``alphas_cumprod``).

    Index ``i`` is the paper's ``tau_i``; ``tau_0 = tau_1 - 1000 // T`` may be negative, where
    ``a`` is the scheduler's ``final_alpha_cumprod``.
    """

    timesteps: tuple[int, ...]
    alphas: tuple[float, ...]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def move(self, z: Tensor, noise: Tensor, i: int, j: int) -> Tensor:
        """``z`` at ``tau_i`` moved to ``tau_j`` with the predicted noise (``ddim_move``)."""
        return ddim_move(z, noise, self.alphas[i], self.alphas[j])


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified-flow levels ``0 = sigma_0 < sigma_1 < ... < sigma_T``, where ``z_sigma = (1 - sigma)
    x + sigma * noise`` and the model predicts the velocity ``noise - x``; ``timesteps[i]`` is what
    the model is given at ``sigma_i`` (SD3: ``1000 * sigma_i``). Index ``i`` plays the role of
    DDIM's ``tau_i`` everywhere (docs/flow-matching.md)."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def move(self, z: Tensor, velocity: Tensor, i: int, j: int) -> Tensor:
        """``z`` at ``sigma_i`` moved to ``sigma_j`` with the predicted velocity (``flow_move``)."""
        return flow_move(z, velocity, self.sigmas[i], self.sigmas[j])


def ddim_schedule(scheduler, num_steps: int) -> Schedule:
    """The schedule of ``DDIMScheduler.set_timesteps(num_steps)`` for a diffusers scheduler config."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)  # a copy: set_timesteps mutates
    ddim.set_timesteps(num_steps)
    descending = [int(t) for t in ddim.timesteps]
    taus = [descending[-1] - ddim.config.num_train_timesteps // num_steps, *reversed(descending)]
    alphas = [float(ddim.alphas_cumprod[t]) if t >= 0 else float(ddim.final_alpha_cumprod) for t in taus]
    return Schedule(tuple(taus), tuple(alphas))


AnySchedule = Schedule | FlowSchedule


def flow_schedule(scheduler, num_steps: int) -> FlowSchedule:
    """The levels of ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)`` for a diffusers
    scheduler config (its shift included), in DDIM's order: ``sigma_0 = 0`` (the image) first."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # a copy: set_timesteps mutates
    flow.set_timesteps(num_steps)
    sigmas = [float(s) for s in flow.sigmas]  # descending, ending at 0
    timesteps = [float(t) for t in flow.timesteps]  # descending, one per step
    return FlowSchedule((0.0, *reversed(timesteps)), tuple(reversed(sigmas)))


def flow_move(z: Tensor, velocity: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
    """An Euler step of the flow ODE ``dz/dsigma = v`` from ``sigma_from`` to ``sigma_to``: what
    ``FlowMatchEulerDiscreteScheduler.step`` computes. It samples (``sigma_to < sigma_from``) and
    inverts (``sigma_to > sigma_from``) alike, as ``ddim_move`` does."""
    return z + (sigma_to - sigma_from) * velocity


def ddim_move(z: Tensor, noise: Tensor, a_from: float, a_to: float) -> Tensor:
    """Deterministic DDIM move of ``z`` from level ``a_from`` to ``a_to`` (Song et al. 2021, eq. 12).

    The same formula samples (``a_to > a_from``) and inverts (``a_to < a_from``).
    """
    x0 = (z - (1 - a_from) ** 0.5 * noise) / a_from**0.5
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * noise


def guided_noise(e_uncond: Tensor, e_cond: Tensor, guidance: Guidance) -> Tensor:
    """Classifier-free guidance: ``e_uncond + w * (e_cond - e_uncond)``."""
    if isinstance(guidance, Tensor):
        guidance = guidance.to(e_cond).view(-1, *([1] * (e_cond.dim() - 1)))
    return e_uncond + guidance * (e_cond - e_uncond)


def predict_guided_noise(
    eps: NoiseFn, z: Tensor, t: int, uncond: Tensor, cond: Tensor, guidance: Guidance
) -> Tensor:
    """``eps_w(z, t, cond)`` with ``uncond`` as the unconditional branch, in one UNet call.

    A scalar guidance of exactly 0 or 1 needs one branch only, so it calls the UNet on it alone.
    """
    if not isinstance(guidance, Tensor) and guidance in (0, 1):
        return eps(z, t, cond if guidance == 1 else uncond)
    e_uncond, e_cond = eps(torch.cat([z, z]), t, torch.cat([uncond, cond])).chunk(2)
    return guided_noise(e_uncond, e_cond, guidance)


def invert(
    eps: NoiseFn,
    z0: Tensor,
    cond: Tensor,
    null: Tensor,
    schedule: AnySchedule,
    guidance: Guidance = 0.0,
    progress: bool = False,
) -> list[Tensor]:
    """DDIM inversion (ALGORITHM.md, stage 1a): the trajectory ``[z*_tau_0, ..., z*_tau_T]``.

    The noise is evaluated at the *target* timestep on the current latent, as in null-text
    inversion's ``next_step`` and diffusers' ``DDIMInverseScheduler``; on a ``FlowSchedule`` the
    velocity, likewise (Euler inversion of the flow ODE).
    """
    taus = schedule.timesteps
    trajectory = [z0]
    with torch.no_grad():
        for i in tqdm(range(1, len(taus)), desc="invert", disable=not progress, leave=False):
            noise = predict_guided_noise(eps, trajectory[-1], taus[i], null, cond, guidance)
            trajectory.append(schedule.move(trajectory[-1], noise, i - 1, i))
    return trajectory


@dataclass
class Tuning:
    """What tuning along an inverted trajectory yields for a batch of B images.

    ``embeddings[b, j]`` is the tuned embedding at ``tau_{T-j}`` (first row: ``tau_T``);
    ``reconstruction`` is the latent the tuned embeddings reach at ``tau_0``; losses are the
    reconstruction losses per timestep before and after tuning, ``steps`` the inner steps taken;
    ``finite[b]`` is false when any loss, latent or embedding of image ``b`` was NaN or inf (in
    half precision, an overflow): such an image stopped tuning, failed, not converged.
    """

    embeddings: Tensor  # [B, T, L, D]
    reconstruction: Tensor  # [B, C, h, w]
    initial_loss: Tensor  # [B, T]
    final_loss: Tensor  # [B, T]
    steps: Tensor  # [B, T] int
    finite: Tensor  # [B] bool


def latent_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per batch row."""
    return (a - b).pow(2).flatten(1).mean(1)


def finite_rows(*tensors: Tensor) -> Tensor:
    """Per batch row, on the CPU: every value of every tensor (on any device) is finite."""
    return torch.stack([t.detach().isfinite().flatten(1).all(1).cpu() for t in tensors]).all(0)


@dataclass(frozen=True)
class TuningOptions:
    """The settings of stage 1b's loop (ALGORITHM.md); ``PTIConfig.tuning_options`` holds the defaults.

    ``guidance``: ``w`` of the reconstruction; ``inner_steps``: ``K``, Adam steps per timestep at
    most (0: no tuning, plain guided DDIM reconstruction); ``lr``: Adam's learning rate at the first
    tuned timestep, decayed to ``lr / 2`` over the ``T`` timesteps; ``early_stop``: an image stops
    its inner loop once its loss is under ``stop_eps + j * stop_slack`` at the ``j``-th timestep.
    """

    guidance: Guidance
    inner_steps: int
    lr: float
    early_stop: bool
    stop_eps: float
    stop_slack: float


def _adam_steps_with_early_stop(
    loss_of: Callable[[Tensor, Tensor | None], Tensor],
    tuned: Tensor,
    lr: float,
    threshold: float,
    options: TuningOptions,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Null-text inversion's inner loop at one timestep, per image: at most ``inner_steps`` Adam
    steps on ``tuned`` (one embedding per image), an image stopping for good once its loss is under
    ``threshold`` (with ``early_stop``), or once its loss is NaN or inf: that image failed, it has
    not converged (a NaN compares false with any threshold, so it is tested on its own).

    ``loss_of(emb, rows)`` is the loss per image of the images ``rows`` (None: all of them).
    Returns the embeddings, the losses before any step (None without steps), the steps each
    image took and which images failed.
    """
    tuned = tuned.detach().clone().requires_grad_(options.inner_steps > 0)  # a new leaf: Adam steps in place
    optimiser = torch.optim.Adam([tuned], lr=lr) if options.inner_steps else None
    active = torch.ones(len(tuned), dtype=torch.bool, device=tuned.device)
    failed = torch.zeros(len(tuned), dtype=torch.bool)
    first = None  # the loss before any step; every image is active at the first inner step
    taken = torch.zeros(len(tuned), dtype=torch.long)
    for k in range(options.inner_steps):
        rows = active.nonzero().squeeze(1)
        loss = loss_of(tuned, None if active.all() else rows)  # no gather while no image has stopped
        if k == 0:
            first = loss.detach()
        finite = loss.detach().isfinite()
        failed[rows[~finite].cpu()] = True
        stepping = finite & (loss.detach() >= threshold) if options.early_stop else finite
        active[rows[~stepping]] = False  # converged (or failed) before this step: keep its embedding
        if not stepping.any():
            break
        before = tuned.detach().clone()
        optimiser.zero_grad(set_to_none=True)
        loss[stepping].sum().backward()  # summed: each image gets its own gradient
        optimiser.step()
        with torch.no_grad():
            tuned[~active] = before[~active]  # Adam's momentum must not move stopped images
        taken[active.cpu()] += 1
    return tuned.detach(), first, taken, failed


def _tune_along_trajectory(
    eps: NoiseFn,
    trajectory: list[Tensor],
    init: Tensor,
    fixed: Tensor,
    guide: Callable[[Tensor, Tensor], Tensor],
    schedule: AnySchedule,
    options: TuningOptions,
    progress: bool,
    desc: str,
) -> Tuning:
    """The per-timestep loop shared by PTI and null-text inversion (Mokady et al. 2023, Algorithm 1).

    One embedding is tuned per timestep, starting from ``init`` and then from the previous
    timestep's optimum; the other branch's embedding is ``fixed``. ``guide(e_fixed, e_tuned)`` is
    the guided noise; ``e_fixed`` is predicted once per timestep without gradient, and only the
    tuned embedding receives gradients (the UNet is frozen).
    """
    taus, T = schedule.timesteps, schedule.num_steps
    z = trajectory[T]
    tuned = init.detach().clone().to(z.dtype)
    embeddings, initial_loss, final_loss, steps = [], [], [], []
    finite = finite_rows(*trajectory)  # a latent of the inversion that is not finite fails the image
    for j, i in enumerate(tqdm(range(T, 0, -1), desc=desc, disable=not progress, leave=False)):
        t, target = taus[i], trajectory[i - 1]
        with torch.no_grad():
            e_fixed = eps(z, t, fixed)  # it does not depend on the tuned embedding

        def loss_of(emb: Tensor, rows: Tensor | None) -> Tensor:
            """How far a step with ``emb`` lands from ``z*_s``, for the images ``rows``."""
            if rows is None:
                z_r, e_r, emb_r, target_r = z, e_fixed, emb, target
            else:  # only the images still tuning
                z_r, e_r, emb_r, target_r = z[rows], e_fixed[rows], emb[rows], target[rows]
            return latent_mse(schedule.move(z_r, guide(e_r, eps(z_r, t, emb_r)), i, i - 1), target_r)

        lr = options.lr * (1 - j / (2 * T))  # null-text inversion's decay, to lr / 2 at the last step
        threshold = options.stop_eps + j * options.stop_slack  # ... and its looser stop at later steps
        tuned, first, taken, failed = _adam_steps_with_early_stop(loss_of, tuned, lr, threshold, options)
        with torch.no_grad():
            z = schedule.move(z, guide(e_fixed, eps(z, t, tuned)), i, i - 1)
            last = latent_mse(z, target)
        finite &= ~failed & finite_rows(tuned, z, last.unsqueeze(1))
        embeddings.append(tuned)
        initial_loss.append(last if first is None else first)
        final_loss.append(last)
        steps.append(taken)
    return Tuning(
        embeddings=torch.stack(embeddings, 1),
        reconstruction=z,
        initial_loss=torch.stack(initial_loss, 1),
        final_loss=torch.stack(final_loss, 1),
        steps=torch.stack(steps, 1),
        finite=finite,
    )


def tune_prompt_embeddings(
    eps: NoiseFn,
    trajectory: list[Tensor],
    cond: Tensor,
    null: Tensor,
    schedule: AnySchedule,
    options: TuningOptions,
    progress: bool = False,
) -> Tuning:
    """Prompt tuning (ALGORITHM.md, stage 1b; Dong et al. 2023, sec. 3.2).

    Learns one conditional embedding per timestep so that guided DDIM sampling at
    ``options.guidance`` retraces ``trajectory``; each timestep starts from the previous one's
    optimum, the first from ``cond``. With ``options.inner_steps=0`` it is plain DDIM
    reconstruction with ``cond``.
    """

    def guide(e_null: Tensor, e_cond: Tensor) -> Tensor:
        return guided_noise(e_null, e_cond, options.guidance)

    return _tune_along_trajectory(
        eps, trajectory, cond, null, guide, schedule, options, progress, desc="tune prompt"
    )


def tune_null_embeddings(
    eps: NoiseFn,
    trajectory: list[Tensor],
    cond: Tensor,
    null: Tensor,
    schedule: AnySchedule,
    options: TuningOptions,
    progress: bool = False,
) -> Tuning:
    """Null-text inversion (Mokady et al., CVPR 2023, Algorithm 1): tune the unconditional
    embedding per timestep, starting from ``null``, with ``cond`` fixed."""

    def guide(e_cond: Tensor, e_null: Tensor) -> Tensor:
        return guided_noise(e_null, e_cond, options.guidance)

    return _tune_along_trajectory(
        eps, trajectory, null, cond, guide, schedule, options, progress, desc="tune null-text"
    )


def interpolate_embeddings(stack: Tensor, target: Tensor, eta: Tensor) -> Tensor:
    """Editing embeddings (ALGORITHM.md, stage 2): ``eta * psi(p) + (1 - eta) * c_t`` at every t.

    ``stack`` is ``[N, T, L, D]``, ``target`` is ``psi(p)`` as ``[N, L, D]``, ``eta`` is ``[N]``.
    """
    eta = eta.to(stack).view(-1, 1, 1, 1)
    return eta * target.to(stack).unsqueeze(1) + (1 - eta) * stack


def sample(
    eps: NoiseFn,
    z_T: Tensor,
    cond: Tensor,
    uncond: Tensor,
    schedule: AnySchedule,
    guidance: Guidance,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Deterministic guided DDIM sampling from ``z_T`` to ``tau_0`` with per-timestep embeddings.

    ``cond`` is ``[N, T, L, D]`` (row ``j`` at ``tau_{T-j}``); ``uncond`` is the same, or
    ``[N, L, D]`` for one embedding at every timestep. Both branches go in one UNet call.
    ``callback`` sees each step's ``z``.
    """
    taus, T = schedule.timesteps, schedule.num_steps
    z = z_T
    with torch.no_grad():
        for j, i in enumerate(tqdm(range(T, 0, -1), desc="edit", disable=not progress, leave=False)):
            u = uncond[:, j] if uncond.dim() == 4 else uncond
            noise = predict_guided_noise(eps, z, taus[i], u, cond[:, j], guidance)
            z = schedule.move(z, noise, i, i - 1)
            if callback is not None:
                callback({"step": j, "timestep": taus[i], "z": z})
    return z
