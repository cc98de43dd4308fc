"""Prompt-to-Prompt attention control during sampling (ALGORITHM.md, stage 2b), for every inversion
method.

Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control", ICLR 2023; the reference
is google/prompt-to-prompt (``ptp_utils.py``, ``prompt-to-prompt_stable.ipynb`` and
``null_text_w_ptp.ipynb``). Two parts, each named after the reference's step:

- ``AttentionControl``: the state the processors (``pipeline.engine.processor``) share in one
  run, the reference's ``AttentionControlEdit`` and ``AttentionStore``, which records and replaces
  the probabilities of the conditional half after each edit's plan (``pipeline.engine.plan``), and
  blends the latents (``LocalBlend``);
- ``sample_with_attention_control``: DDIM sampling of every image's source branch beside its edits,
  in one UNet call per step, with local blend after each step.

Pure torch over tensors: no Ray, I/O or config here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.engine.algorithm import AnySchedule, StepCallback, guided_noise
from pipeline.engine.plan import LATENT_POSITIONS_PER_CONTROLLED_POSITION, AttentionPlan, no_control
from pipeline.engine.processor import attention_control
from pipeline.errors import InputError

NoiseFn = Callable[[Tensor, int, Tensor], Tensor]
Guidance = float | Tensor


def control_cross_attention(
    probs: Tensor, base: Tensor, mapper: Tensor, mapped: Tensor, weights: Tensor, alpha: Tensor
) -> Tensor:
    """The edits' cross-attention probabilities (``AttentionControlEdit.forward`` of the reference).

    ``probs`` are the rows' own ``[R, H, Q, L]``, ``base`` their source's; ``mapper`` is
    ``[R, L, L]``, ``mapped``, ``weights`` and ``alpha`` (this step's) are ``[R, L]``.
    """

    def view(t: Tensor) -> Tensor:  # [R, L] over heads and queries
        return t[:, None, None, :]

    controlled = torch.einsum("rhqk,rkn->rhqn", base, mapper) * view(mapped) + probs * (1 - view(mapped))
    controlled = controlled * view(weights)
    return controlled * view(alpha) + probs * (1 - view(alpha))


def local_blend_mask(word_maps: Tensor, latent_size: tuple[int, int], threshold: Tensor) -> Tensor:
    """The reference's ``LocalBlend`` mask: ``word_maps`` ``[R, h', w']`` (the blend words'
    attention, summed), max-pooled (kernel 3), resized to the latent (nearest), normalised by its
    maximum and thresholded (``threshold`` ``[R]``). ``[R, 1, h, w]`` bool; all False where a map
    is zero."""
    maps = F.max_pool2d(word_maps[:, None], kernel_size=3, stride=1, padding=1)
    maps = F.interpolate(maps, size=latent_size)
    peak = maps.amax(dim=(2, 3), keepdim=True)
    maps = maps / torch.where(peak > 0, peak, torch.ones_like(peak))
    return maps > threshold.to(maps).view(-1, 1, 1, 1)


def blend_latents(z: Tensor, z_source: Tensor, mask: Tensor) -> Tensor:
    """``z_source + mask * (z - z_source)``, exact on both sides of the mask."""
    return torch.where(mask, z, z_source)


class AttentionControl:
    """The state the processors share during one controlled sampling run: which batch row is whose
    source, each row's plan, the step, and the blend words' attention summed so far (the
    reference's ``AttentionControlEdit`` and ``AttentionStore``).

    The UNet batch is ``[uncond rows, cond rows]``, ``R`` rows each; ``source_of[r]`` is the row of
    ``r``'s source branch (itself for a source row); ``plans[r]`` is None for a source row.
    """

    def __init__(
        self,
        source_of: Sequence[int],
        plans: Sequence[AttentionPlan | None],
        num_steps: int,
        latent_size: tuple[int, int],
        self_max_positions: int | None = None,
        blend_positions: int | None = None,
    ):
        rows = len(source_of)
        if len(plans) != rows:
            raise ValueError(f"{rows} rows but {len(plans)} plans")
        lengths = {p.mapper.shape[0] for p in plans if p is not None}
        if len(lengths) > 1:
            raise ValueError(f"plans over different token lengths {sorted(lengths)}")
        length = lengths.pop() if lengths else 77
        steps = {p.cross_alpha.shape[0] - 1 for p in plans if p is not None} | {num_steps}
        if len(steps) > 1:
            raise ValueError(f"plans made for {sorted(steps - {num_steps})} steps, sampling {num_steps}")
        default = latent_size[0] * latent_size[1] // LATENT_POSITIONS_PER_CONTROLLED_POSITION
        self.rows, self.num_steps, self.latent_size = rows, num_steps, tuple(latent_size)
        self.self_max_positions = default if self_max_positions is None else self_max_positions
        self.blend_positions = default if blend_positions is None else blend_positions
        self.source_of = torch.as_tensor(source_of, dtype=torch.long)
        none = no_control(num_steps, length)
        filled = [none if p is None else p for p in plans]

        def stack(name: str) -> Tensor:
            return torch.stack([getattr(p, name) for p in filled])

        self.mapper, self.mapped, self.weights = stack("mapper"), stack("mapped"), stack("weights")
        self.cross_alpha = stack("cross_alpha").transpose(0, 1)  # [T + 1, R, L]
        self.self_steps = stack("self_steps").transpose(0, 1)  # [T, R]
        self.blend_source, self.blend_target = stack("blend_source"), stack("blend_target")
        self.blend_threshold = torch.tensor([p.blend_threshold for p in filled])
        starts = [num_steps if p.blend_start is None else p.blend_start for p in filled]
        self.blend_start = torch.tensor(starts)
        self.blending = bool((self.blend_start < num_steps).any())
        self.step = 0
        self.blend_maps: Tensor | None = None  # [R, blend_positions, L], summed over layers and steps
        self.blend_mask: Tensor | None = None  # [R, 1, h, w] at the last blended step
        self.explicit_calls = 0  # attention calls that computed explicit probabilities
        self.cross_positions: set[int] = set()
        self._moved: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def _token_tensors(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``mapper``, ``mapped`` and ``weights`` on ``like``'s device and dtype, moved there once."""
        key = (like.device, like.dtype)
        if key not in self._moved:
            self._moved[key] = tuple(t.to(like) for t in (self.mapper, self.mapped, self.weights))
        return self._moved[key]

    def records(self, positions: int, place: str) -> bool:
        """Whether a cross-attention layer's maps make the local-blend mask: the down and up
        blocks' layers with ``blend_positions`` queries, never the mid block's. The reference
        sums the 16x16 down and up layers of SD 1.x (``LocalBlend``: ``down_cross[2:4]``,
        ``up_cross[:3]``), where the mid block (8x8) is never at the blend resolution; SDXL's
        mid block and a small UNet's are, and this rule leaves them out as the reference's
        choice of layers would."""
        return self.blending and positions == self.blend_positions and place != "mid"

    def controls(self, is_cross: bool, positions: int, place: str = "down") -> bool:
        """Whether an attention call with ``positions`` queries in a ``place`` of the UNet
        (``down``, ``mid`` or ``up``) needs explicit probabilities now."""
        if is_cross:
            self.cross_positions.add(positions)
            return self.records(positions, place) or bool(self.cross_alpha[self.step].any())
        return positions <= self.self_max_positions and bool(self.self_steps[self.step].any())

    def edit_attention(self, probs: Tensor, is_cross: bool, place: str = "down") -> Tensor:
        """The conditional half's probabilities ``[R, H, Q, K]`` after control, recorded for local
        blend after control (``records``)."""
        self.explicit_calls += 1
        source_of = self.source_of.to(probs.device)
        base = probs[source_of]
        if not is_cross:
            rows = self.self_steps[self.step].to(probs.device)
            return torch.where(rows[:, None, None, None], base, probs)
        alpha = self.cross_alpha[self.step].to(probs)
        edited = alpha.ne(0).any(1)
        if bool(edited.any()):
            controlled = control_cross_attention(probs, base, *self._token_tensors(probs), alpha)
            probs = torch.where(edited.to(probs.device)[:, None, None, None], controlled, probs)
        if self.records(probs.shape[2], place):
            # After control, as the reference's LocalBlend reads them: its AttentionStore keeps a
            # view of the conditional half, which AttentionControlEdit then overwrites in place
            # (attn[1:] = ...). So during the cross-replace steps a replace edit's target word is
            # masked by the source word's attention mapped onto it.
            maps = probs.mean(1).to(torch.promote_types(probs.dtype, torch.float32))
            self.blend_maps = maps if self.blend_maps is None else self.blend_maps + maps
        return probs

    def blend(self, z: Tensor) -> Tensor:
        """Local blend after the current step (the reference's ``LocalBlend.__call__``): each
        blending edit keeps its source's latent outside the union of both masks."""
        rows = (self.blend_start <= self.step).to(z.device)
        if not bool(rows.any()):
            return z
        if self.blend_maps is None:
            raise InputError(
                f"local blend found no cross-attention layer with {self.blend_positions} positions (the "
                f"UNet's have {sorted(self.cross_positions)}): pass one of them as blend_positions"
            )
        h, w = self.latent_size
        side = round((h * w / self.blend_positions) ** 0.5)
        if (h // side) * (w // side) != self.blend_positions:
            raise InputError(f"blend maps of {self.blend_positions} positions do not tile a {h}x{w} latent")
        maps = self.blend_maps.to(z.device)
        source_of = self.source_of.to(z.device)

        def words(m: Tensor, weights: Tensor) -> Tensor:  # the blend words' maps, summed
            return (m * weights.to(m)[:, None, :]).sum(-1).view(-1, h // side, w // side)

        threshold = self.blend_threshold.to(z.device)
        mask = local_blend_mask(words(maps[source_of], self.blend_source), (h, w), threshold)
        mask = mask | local_blend_mask(words(maps, self.blend_target), (h, w), threshold)
        mask = mask | ~rows[:, None, None, None]  # rows not blending (sources too) keep their own latent
        self.blend_mask = mask
        return blend_latents(z, z[source_of], mask)


# --- controlled sampling ---------------------------------------------------------------------------


class ControlledLatents(NamedTuple):
    """What controlled sampling reaches at ``tau_0``: the edits in their given order and each
    image's source branch (its reconstruction); the local-blend mask of each edit at its last
    step (True where the edit keeps its own latent; all True for an edit without blend; None when
    no edit blends), and how many attention calls computed explicit probabilities."""

    edits: Tensor  # [N, C, h, w]
    sources: Tensor  # [B, C, h, w]
    blend_masks: Tensor | None  # [N, 1, h, w] bool
    explicit_calls: int


def _at_step(embeddings: Tensor, j: int) -> Tensor:
    """Row ``j`` of a per-step stack ``[N, T, L, D]``, or the one embedding ``[N, L, D]``."""
    return embeddings[:, j] if embeddings.dim() == 4 else embeddings


def _row_weights(guidance: Guidance, count: int, what: str, device) -> Tensor:
    """One guidance weight per row, from one weight or one per row."""
    if isinstance(guidance, Tensor) and guidance.numel() != 1:
        if guidance.numel() != count:
            raise InputError(f"{what} has {guidance.numel()} weights for {count} rows")
        return guidance.flatten().to(device, torch.float64)
    return torch.full((count,), float(guidance), device=device, dtype=torch.float64)


def sample_with_attention_control(
    eps: NoiseFn,
    unet,
    z_T: Tensor,
    source_cond: Tensor,
    uncond: Tensor,
    edit_cond: Tensor,
    images: Sequence[int],
    plans: Sequence[AttentionPlan | None],
    schedule: AnySchedule,
    guidance: Guidance = 7.5,
    source_guidance: Guidance | None = None,
    self_max_positions: int | None = None,
    blend_positions: int | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> ControlledLatents:
    """Guided DDIM sampling with Prompt-to-Prompt control (ALGORITHM.md, stage 2b; Hertz et al.
    2023; the reference's ``text2image_ldm_stable`` with an ``AttentionControlEdit``).

    For B images and N edits: ``z_T``, ``source_cond`` and ``uncond`` have one row per image,
    ``edit_cond`` one per edit, and edit ``n`` edits image ``images[n]`` under ``plans[n]`` (None:
    uncontrolled, a plain edit in a controlled batch). The
    source branch is the method's reconstruction (PTI: ``c_t``; NTI, NPI, DDIM: ``psi(source)``);
    every edit shares its image's unconditional branch. Embeddings are per step (``[., T, L, D]``,
    row ``j`` at ``tau_{T-j}``) or one for all steps (``[., L, D]``). Each step is one UNet call
    on rows ``[source_b, edits of b ...]`` for every image, both guidance branches: n edits of an
    image cost ``2T (n + 1)`` evaluations, and images never interact.

    ``guidance`` weighs the edits (one, or one per edit); ``source_guidance`` the sources (one, or
    one per image; the stage-1 tuning weight, so the source retraces the image), by default
    ``guidance``. ``self_max_positions`` and ``blend_positions`` are the query positions of the
    layers whose self-attention is injected (at most) and whose cross-attention makes the blend
    mask (exactly); by default 1/16 of the latent's, the paper's 16x16 at SD's 64x64.

    ``callback`` sees each step's ``ControlledLatents`` as its ``z`` (the edits), ``sources`` and
    ``blend_masks`` (``algorithm.StepCallback``).
    """
    batch, edits = len(z_T), len(images)
    if len(plans) != edits or len(edit_cond) != edits:
        raise InputError(f"{edits} edits but {len(plans)} plans and {len(edit_cond)} edit embeddings")
    if len(source_cond) != batch or len(uncond) != batch:
        raise InputError(f"{batch} images but {len(source_cond)} source and {len(uncond)} uncond embeddings")
    outside = [(n, b) for n, b in enumerate(images) if not 0 <= b < batch]
    problems = [f"edit {n} asks for image {b}, not one of the {batch}" for n, b in outside]
    problems += [f"image {b} has no edit: leave it out of the batch" for b in range(batch) if b not in images]
    if problems:
        raise InputError("; ".join(problems))
    if source_guidance is None:
        if isinstance(guidance, Tensor) and guidance.numel() > 1:
            raise InputError(
                "guidance per edit needs source_guidance: the weight stage 1 tuned each image with"
            )
        source_guidance = guidance
    device = z_T.device
    w_source = _row_weights(source_guidance, batch, "source_guidance", device)
    w_edit = _row_weights(guidance, edits, "guidance", device)

    # Rows [source_b, its edits ...] per image: what each row is, and where its source is.
    image_of, source_of, row_plans, picks = [], [], [], []  # picks index cat([sources, edits])
    source_rows, edit_rows = [], [0] * edits
    for b in range(batch):
        source_rows.append(len(image_of))
        image_of.append(b)
        source_of.append(source_rows[-1])
        row_plans.append(None)
        picks.append(b)
        for n in (n for n, image in enumerate(images) if image == b):
            edit_rows[n] = len(image_of)
            image_of.append(b)
            source_of.append(source_rows[-1])
            row_plans.append(plans[n])
            picks.append(batch + n)
    image_of, picks = torch.tensor(image_of, device=device), torch.tensor(picks, device=device)
    weights = torch.cat([w_source, w_edit])[picks]
    w: Guidance = float(weights[0]) if bool((weights == weights[0]).all()) else weights.to(z_T.dtype)
    z = z_T[image_of]

    control = AttentionControl(
        source_of, row_plans, schedule.num_steps, tuple(z_T.shape[-2:]), self_max_positions, blend_positions
    )
    edit_rows_t, source_rows_t = (
        torch.tensor(edit_rows, device=device),
        torch.tensor(source_rows, device=device),
    )

    def reached(z: Tensor) -> ControlledLatents:
        mask = None if control.blend_mask is None else control.blend_mask[edit_rows_t]
        return ControlledLatents(z[edit_rows_t], z[source_rows_t], mask, control.explicit_calls)

    taus, T = schedule.timesteps, schedule.num_steps
    with torch.no_grad(), attention_control(unet, control):
        steps = tqdm(range(T, 0, -1), desc="edit with attention control", disable=not progress, leave=False)
        for j, i in enumerate(steps):
            control.step = j
            cond = torch.cat([_at_step(source_cond, j), _at_step(edit_cond, j).to(source_cond)])[picks]
            u = _at_step(uncond, j)[image_of]
            e_uncond, e_cond = eps(torch.cat([z, z]), taus[i], torch.cat([u, cond.to(u)])).chunk(2)
            z = schedule.move(z, guided_noise(e_uncond, e_cond, w), i, i - 1)
            z = control.blend(z)
            if callback is not None:
                now = reached(z)
                callback({"step": j, "timestep": taus[i], "z": now.edits, **now._asdict()})
    return reached(z)
