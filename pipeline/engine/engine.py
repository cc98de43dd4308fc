"""The PTI engine: models loaded once, then stage 1 and stage 2 batch after batch.

A thin layer between images and prompts and the pure math of ``pipeline.engine.algorithm``: it encodes
images and text, picks the method's embeddings, and decodes results. A Ray actor holds one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
from torch import Tensor

from pipeline.engine import algorithm, attention, plan
from pipeline.engine.checkpoints import control_problem
from pipeline.engine.config import PTIConfig, eta_problem
from pipeline.engine.metrics import psnr, ssim
from pipeline.engine.models import (
    NoisePredictor,
    StableDiffusion,
    computing_in_float32,
    load_stable_diffusion,
)
from pipeline.engine.plan import AttentionPlan
from pipeline.engine.text import encode_prompts, null_embedding
from pipeline.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Inversion:
    """Stage 1's result for B images: what stage 2 needs, and how well it reconstructs.

    ``cond[b, j]`` is the conditional embedding at ``tau_{T-j}`` (PTI: the tuned ones; the other
    methods: ``psi(source)`` at every step); ``uncond`` is the unconditional branch's per-step
    embedding (null-text inversion: tuned; negative-prompt inversion: ``psi(source)``), or None
    for ``psi("")``.
    """

    z_T: Tensor  # [B, 4, h, w]
    cond: Tensor  # [B, T, L, D]
    uncond: Tensor | None = None  # [B, T, L, D]
    # How well stage 1 went; absent when read back from storage.
    reconstruction: Tensor | None = None  # [B, 3, H, W] in [0, 1], decoded from tau_0
    reconstruction_latent: Tensor | None = None  # [B, 4, h, w]
    initial_loss: Tensor | None = None  # [B, T]
    final_loss: Tensor | None = None  # [B, T]
    inner_steps: Tensor | None = None  # [B, T]
    psnr: Tensor | None = None  # [B]
    ssim: Tensor | None = None  # [B]
    finite: Tensor | None = None  # [B] bool: no NaN or inf in its latents, losses or embeddings
    retried: Tensor | None = None  # [B] bool: run again in float32 after a non-finite half-precision run
    seconds: dict[str, float] = field(default_factory=dict)  # for the whole batch

    def __len__(self) -> int:
        return self.z_T.shape[0]

    def select(self, rows: Sequence[int] | Tensor) -> "Inversion":
        """The same result for a subset (or repetition) of images, in the given order."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        picked = {
            f.name: value[rows.to(value.device)]
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return Inversion(**picked)


class Engine:
    """Inversion, tuning and editing with one loaded Stable Diffusion."""

    def __init__(self, sd: StableDiffusion, config: PTIConfig):
        if problem := control_problem(sd.family, config.control):
            raise InputError(f"model {config.model!r}: {problem}")
        self.sd, self.config = sd, config
        self.eps = NoisePredictor(sd)
        # The family's step: DDIM's, or Euler's on SD3's flow (docs/flow-matching.md).
        make_schedule = algorithm.flow_schedule if sd.family == "sd3" else algorithm.ddim_schedule
        self.schedule = make_schedule(sd.scheduler, config.steps)
        self.resolution = config.resolution or sd.resolution
        self.null = null_embedding(sd)  # [1, L, D]
        self.fingerprint = config.stage_one_fingerprint(sd.fingerprint)

    @classmethod
    def load(cls, config: PTIConfig, storage_options: dict | None = None) -> "Engine":
        """Load the config's model (``storage_options`` reach an object store, e.g. its endpoint)."""
        sd = load_stable_diffusion(config.model, config.device, config.dtype, storage_options=storage_options)
        return cls(sd, config)

    # --- the VAE -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """``z*_0 = E(x).mean * scaling_factor`` for pixels in ``[0, 1]`` (SD3's VAE: ``(E(x).mean -
        shift_factor) * scaling_factor``, as its pipeline normalises latents)."""
        vae = self.sd.vae
        x = (2 * pixels - 1).to(self.sd.device, vae.dtype)
        mean = vae.encode(x).latent_dist.mean.float()
        shift = vae.config.get("shift_factor")
        return (mean if shift is None else mean - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        """Pixels in ``[0, 1]``, float32 on the CPU."""
        vae = self.sd.vae
        shift = vae.config.get("shift_factor")
        z = z / vae.config.scaling_factor
        x = vae.decode((z if shift is None else z + shift).to(vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1).cpu()

    # --- stage 1 -------------------------------------------------------------------------------

    def invert_and_tune(self, pixels: Tensor, source_prompts: Sequence[str | None]) -> Inversion:
        """Stage 1 for a batch: DDIM inversion, then the method's tuning (ALGORITHM.md, 1a, 1b).

        ``pixels`` is ``[B, 3, H, W]`` in ``[0, 1]`` at the engine's resolution; a missing source
        prompt means ``psi("")``. Stage 1 draws no random numbers (the VAE's mean, modules in eval
        mode, deterministic DDIM and Adam), so it neither needs nor touches torch's global RNG.

        Half precision can overflow. An image with a NaN or inf in its latents, losses or
        embeddings is never taken as converged (``algorithm.Tuning.finite``); with half-precision
        weights, the batch's non-finite images are run once more, together, computing in float32
        with the same weights (``models.computing_in_float32``: no second copy of the model is
        kept). ``Inversion.retried`` says which were, ``Inversion.finite`` which are finite in the
        end: the caller turns the others into errors (the batch stages: ``non_finite`` rows).
        """
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (self.resolution,) * 2:
            raise InputError(
                f"stage 1 takes [B, 3, {self.resolution}, {self.resolution}] pixels, got {list(pixels.shape)}"
            )
        if len(source_prompts) != len(pixels):
            raise InputError(f"{len(pixels)} images but {len(source_prompts)} source prompts")
        inversion = self._invert_and_tune(pixels, source_prompts)
        inversion.retried = torch.zeros(len(pixels), dtype=torch.bool)
        bad = (~inversion.finite).nonzero().squeeze(1)
        if not len(bad) or self.sd.dtype == torch.float32:
            return inversion
        log.warning(
            "stage 1 gave NaN or inf in %s for %d of %d images: running them again in float32",
            str(self.sd.dtype).removeprefix("torch."),
            len(bad),
            len(pixels),
        )
        started = time.perf_counter()
        with computing_in_float32(self.sd) as sd:
            exact = Engine(sd, self.config)
            again = exact._invert_and_tune(pixels[bad], [source_prompts[b] for b in bad])
        self.eps.calls += exact.eps.calls
        self.eps.evaluations += exact.eps.evaluations
        for f in fields(Inversion):  # the retried images' rows replace theirs
            value = getattr(inversion, f.name)
            if isinstance(value, Tensor) and f.name != "retried":
                value[bad.to(value.device)] = getattr(again, f.name).to(value)
        inversion.retried[bad] = True
        inversion.seconds["float32_retry"] = time.perf_counter() - started
        return inversion

    def _invert_and_tune(self, pixels: Tensor, source_prompts: Sequence[str | None]) -> Inversion:
        """Stage 1 for a batch, in the model's precision, with each image's ``finite`` flag."""
        cfg = self.config
        started = time.perf_counter()
        z0 = self.encode_images(pixels)
        batch = len(z0)
        src = encode_prompts(self.sd, [p or "" for p in source_prompts])
        null = self.null.expand(batch, -1, -1)
        method = cfg.method_spec
        inversion_guidance = 1.0 if method.inverts_on_source else cfg.inversion_guidance
        trajectory = algorithm.invert(
            self.eps, z0, src, null, self.schedule, inversion_guidance, cfg.progress
        )
        inverted = time.perf_counter()
        start = src if method.start == "source" else null  # where the per-step embedding starts
        options = cfg.tuning_options()  # no Adam steps for the methods that do not tune
        per_step_cond = method.branch == "cond"
        with torch.enable_grad():
            if per_step_cond:  # c_t learned (pti) or fixed (ddim); the uncond branch is psi("")
                tuned = algorithm.tune_prompt_embeddings(
                    self.eps, trajectory, start, null, self.schedule, options, cfg.progress
                )
            else:  # the uncond branch learned (nti) or fixed (npi) per step; cond is psi(source)
                tuned = algorithm.tune_null_embeddings(
                    self.eps, trajectory, src, start, self.schedule, options, cfg.progress
                )
        src_stack = src.unsqueeze(1).expand(-1, self.schedule.num_steps, -1, -1)
        tuned_at = time.perf_counter()
        reconstruction = self.decode_latents(tuned.reconstruction)
        return Inversion(
            z_T=trajectory[-1],
            cond=tuned.embeddings if per_step_cond else src_stack.clone(),
            uncond=None if per_step_cond else tuned.embeddings,
            reconstruction=reconstruction,
            reconstruction_latent=tuned.reconstruction,
            initial_loss=tuned.initial_loss,
            final_loss=tuned.final_loss,
            inner_steps=tuned.steps,
            psnr=psnr(reconstruction, pixels),
            ssim=ssim(reconstruction, pixels),
            finite=tuned.finite & algorithm.finite_rows(src, reconstruction),
            seconds={
                "invert": inverted - started,
                "tune": tuned_at - inverted,
                "decode": time.perf_counter() - tuned_at,
            },
        )

    # --- stage 2 -------------------------------------------------------------------------------

    def edit(
        self,
        inversion: Inversion,
        rows: Sequence[int],
        targets: Sequence[str],
        etas: Sequence[float],
        guidance: Sequence[float] | float | None = None,
        plans: Sequence[AttentionPlan | None] | None = None,
        callback: algorithm.StepCallback | None = None,
    ) -> Tensor:
        """Stage 2 for a batch of N edits: edit ``n`` samples image ``rows[n]`` of ``inversion``
        toward ``targets[n]`` with weight ``etas[n]``, all N in one UNet batch per step.

        With ``plans`` (``attention_plan``'s, one per edit; None for a plain edit) the edits run
        under attention control beside each image's source branch (ALGORITHM.md, stage 2b).
        ``callback`` observes each step (``algorithm.StepCallback``; under control it also sees the
        sources and blend masks: ``attention.sample_with_attention_control``). Returns pixels
        ``[N, 3, H, W]`` in ``[0, 1]``.
        """
        if not (len(rows) == len(targets) == len(etas)):
            raise InputError(
                f"rows, targets and etas differ in length: {len(rows)}, {len(targets)}, {len(etas)}"
            )
        if not targets:
            raise InputError("no edits asked for: give at least one target prompt")
        problems = [p for p in (eta_problem(e) for e in etas) if p]
        problems += [f"target prompt {n} is empty" for n, t in enumerate(targets) if not (t or "").strip()]
        problems += [
            f"edit {n} asks for image {r}, not one of the {len(inversion)} inverted"
            for n, r in enumerate(rows)
            if not 0 <= r < len(inversion)
        ]
        if problems:
            raise InputError("; ".join(problems))
        picked = inversion.select(rows)
        device = self.sd.device
        target = encode_prompts(self.sd, targets)
        eta = torch.tensor(etas, dtype=torch.float32, device=device)
        cond = algorithm.interpolate_embeddings(picked.cond.to(device, torch.float32), target, eta)
        w = self.config.guidance if guidance is None else guidance
        if not isinstance(w, (int, float)):
            w = torch.tensor(list(w), dtype=torch.float32, device=device)
        if plans is not None and any(p is not None for p in plans):
            return self.decode_latents(self._sample_controlled(inversion, rows, cond, w, plans, callback))
        uncond = self._unconditional(picked)
        z = algorithm.sample(
            self.eps, picked.z_T.to(device), cond, uncond, self.schedule, w, self.config.progress, callback
        )
        return self.decode_latents(z)

    def _unconditional(self, inversion: Inversion) -> Tensor:
        """The unconditional branch of stage 2: the stored per-step stack (nti, npi), else psi("")."""
        if inversion.uncond is None:
            return self.null.expand(len(inversion), -1, -1)
        return inversion.uncond.to(self.sd.device, torch.float32)

    def attention_plan(
        self,
        source: str | None,
        target: str,
        blend_words: Sequence[str] | None = None,
        reweight: dict[str, float] | None = None,
        name: str = "edit",
    ) -> AttentionPlan | None:
        """The config's attention control of one edit (ALGORITHM.md, stage 2b; ``plan.attention_edit``
        says what the config asks), or None for the paper's plain interpolation; a row's
        ``blend_words`` and ``reweight`` factors override the config's. An edit that needs word
        alignment but has no source prompt is an InputError that starts with ``name``."""
        edit = plan.attention_edit(self.config, source, target, blend_words, reweight)
        if edit is None:
            return None
        length = self.sd.text_encoder.config.max_position_embeddings
        steps = self.schedule.num_steps
        return plan.plan_attention_edit(self.sd.tokenizer, source, target, edit, steps, length, name)

    def _sample_controlled(
        self,
        inversion: Inversion,
        rows: Sequence[int],
        cond: Tensor,
        w,
        plans: Sequence[AttentionPlan | None],
        callback: algorithm.StepCallback | None = None,
    ) -> Tensor:
        """The edits' latents under attention control: each image's source branch (its stored
        reconstruction embeddings) in the same UNet call as its edits."""
        device = self.sd.device
        images = list(dict.fromkeys(int(r) for r in rows))  # each image once, in order of first use
        source = inversion.select(images)
        position = {b: k for k, b in enumerate(images)}
        first_edit = [[int(r) for r in rows].index(b) for b in images]
        source_w = w[first_edit] if isinstance(w, Tensor) else w  # the weight stage 1 tuned with
        self_positions, blend_positions = self._controlled_positions()
        latents = attention.sample_with_attention_control(
            self.eps,
            self.sd.unet,
            source.z_T.to(device),
            source.cond.to(device, torch.float32),
            self._unconditional(source),
            cond,
            [position[int(r)] for r in rows],
            plans,
            self.schedule,
            guidance=w,
            source_guidance=source_w,
            self_max_positions=self_positions,
            blend_positions=blend_positions,
            progress=self.config.progress,
            callback=callback,
        )
        return latents.edits

    def _controlled_positions(self) -> tuple[int, int]:
        """``plan.controlled_positions`` of this UNet at the engine's resolution."""
        side = self.resolution // self.sd.vae_scale_factor
        return plan.controlled_positions(self.sd.unet.config.down_block_types, side)

    def edit_grid(
        self,
        inversion: Inversion,
        targets: Sequence[str],
        etas: Sequence[float],
        plans: Sequence[AttentionPlan | None] | None = None,
    ) -> Tensor:
        """Every (image, target, eta) of a batch, in that order: ``[B * len(targets) * len(etas), ...]``;
        ``plans`` holds each target's attention control (``attention_plan``), if any."""
        if not targets:
            raise InputError("no target prompts: give at least one")
        plans = plans or [None] * len(targets)
        grid = [(b, t, e, p) for b in range(len(inversion)) for t, p in zip(targets, plans) for e in etas]
        rows, ts, es, ps = zip(*grid)
        return self.edit(inversion, rows, ts, es, plans=ps)
