"""One edit's Prompt-to-Prompt plan (ALGORITHM.md, stage 2b): what the config's ``control`` asks of an
edit (``attention_edit``: what ``control=auto`` means), the edit's tensors over tokens and steps
(``plan_attention_edit``), and which layers are controlled (``controlled_positions``).

Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control", ICLR 2023; the reference
is google/prompt-to-prompt. Pure torch over a tokenizer and the config: no model, Ray or I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from pipeline.engine.alignment import (
    StepFraction,
    cross_replace_alphas,
    refinement_mapper,
    replacement_mapper,
    step_bounds,
    token_indices,
    word_weights,
)
from pipeline.engine.config import PTIConfig
from pipeline.errors import InputError

# The paper controls self-attention and blends with the 16x16 maps of SD's 64x64 latents: 1/16 of them.
LATENT_POSITIONS_PER_CONTROLLED_POSITION = 16


@dataclass(frozen=True)
class AttentionEdit:
    """What one edit asks of attention control (ALGORITHM.md, stage 2b).

    ``mode`` is ``replace`` (word swap: equal word counts), ``refine`` (words added or removed) or
    None (only reweighting and self-attention injection). ``blend_words`` is (source words, target
    words) for local blend, or None for none.
    """

    mode: Literal["replace", "refine"] | None = None
    cross_replace_steps: StepFraction = 0.8
    self_replace_steps: StepFraction = 0.4
    word_replace_steps: Mapping[str, StepFraction] = field(default_factory=dict)
    reweight: Mapping[str, float] = field(default_factory=dict)
    blend_words: tuple[Sequence[str], Sequence[str]] | None = None
    blend_threshold: float = 0.3
    start_blend: float = 0.2


@dataclass
class AttentionPlan:
    """One edit's attention control over tokens and steps, for ``T`` steps and ``L`` tokens.

    The edit's controlled cross-attention at step ``j`` is, from the source's ``P_s`` and its own
    ``P_e`` (``AttentionControlEdit.forward`` with ``AttentionReplace``/``Refine``/``Reweight``):
    ``C = ((P_s @ mapper) * mapped + P_e * (1 - mapped)) * weights`` and then
    ``cross_alpha[j] * C + (1 - cross_alpha[j]) * P_e``.

    Reweighting alone (``mode`` None, the config's ``control=reweight``) has ``mapped`` 0, so it
    scales the edit's own attention ``P_e``. The reference's ``AttentionReweight`` scales the
    source's, mapped onto the target (its examples reweight a prompt against itself): that is what
    reweighting does here under ``replace`` or ``refine`` (``control=auto`` with ``reweight``).
    """

    mapper: Tensor  # [L, L] source token -> target token
    mapped: Tensor  # [L] 1 where a target token takes the source's attention
    weights: Tensor  # [L] reweighting factors
    cross_alpha: Tensor  # [T + 1, L]
    self_steps: Tensor  # [T] bool: steps whose low-resolution self-attention is the source's
    blend_source: Tensor  # [L] 1 at the source's blend-word tokens
    blend_target: Tensor  # [L] 1 at the target's blend-word tokens
    blend_threshold: float = 0.3
    blend_start: int | None = None  # the first step after which the latent is blended; None: never


def plan_attention_edit(
    tokenizer,
    source: str | None,
    target: str,
    edit: AttentionEdit,
    num_steps: int,
    max_len: int = 77,
    name: str = "edit",
) -> AttentionPlan:
    """The token and step tensors of one edit (ALGORITHM.md, stage 2b; Hertz et al. 2023).

    ``source`` is None for a PTI row whose ``c_t`` started from ``null``: it has no source tokens to
    align, so only reweighting target words and self-attention injection are allowed; ``name``
    (the row) is in every error.
    """

    def refuse(problem: str) -> InputError:
        return InputError(f"{name}: {problem}")

    if edit.mode not in (None, "replace", "refine"):
        raise refuse(f"attention mode {edit.mode!r} is not one of replace, refine or None")
    if source is None and (edit.mode is not None or edit.blend_words is not None):
        raise refuse(
            f"{edit.mode or 'local blend'} needs the source prompt's tokens, and this row has no source "
            "prompt: give one, or use only reweighting and self-attention control"
        )
    if not 0 <= edit.start_blend <= 1:
        raise refuse(f"start_blend must be in [0, 1], got {edit.start_blend}")
    try:
        if edit.mode == "replace":
            mapper = replacement_mapper(tokenizer, source, target, max_len)
            mapped = torch.ones(max_len)
        elif edit.mode == "refine":
            index, mapped = refinement_mapper(tokenizer, source, target, max_len)
            mapper = torch.zeros(max_len, max_len)
            columns = mapped.nonzero().squeeze(1)
            mapper[index[columns], columns] = 1
        else:
            mapper, mapped = torch.zeros(max_len, max_len), torch.zeros(max_len)
        weights = word_weights(tokenizer, target, edit.reweight, max_len)
        if edit.mode is None and not edit.reweight:
            cross_alpha = torch.zeros(num_steps + 1, max_len)  # nothing to do to cross-attention
        else:
            cross_alpha = cross_replace_alphas(
                tokenizer, target, num_steps, edit.cross_replace_steps, edit.word_replace_steps, max_len
            )
        start, end = step_bounds(edit.self_replace_steps, num_steps)
        self_steps = torch.zeros(num_steps, dtype=torch.bool)
        self_steps[start:end] = True
        blend_source, blend_target = torch.zeros(max_len), torch.zeros(max_len)
        if edit.blend_words is not None:
            source_words, target_words = edit.blend_words
            if isinstance(source_words, str) or isinstance(target_words, str):
                raise InputError("blend_words is (source words, target words): two lists of words")
            if not source_words and not target_words:
                raise InputError("local blend needs at least one blend word")
            for word in source_words:
                blend_source[token_indices(tokenizer, source, word, max_len)] = 1
            for word in target_words:
                blend_target[token_indices(tokenizer, target, word, max_len)] = 1
    except InputError as exc:
        raise refuse(str(exc)) from None
    return AttentionPlan(
        mapper=mapper,
        mapped=mapped,
        weights=weights,
        cross_alpha=cross_alpha,
        self_steps=self_steps,
        blend_source=blend_source,
        blend_target=blend_target,
        blend_threshold=edit.blend_threshold,
        blend_start=None if edit.blend_words is None else int(edit.start_blend * num_steps),
    )


def no_control(num_steps: int, max_len: int = 77) -> AttentionPlan:
    """The plan of a row that is not controlled (a source branch, a plain edit in a controlled
    batch): its own attention at every step, never blended."""
    return AttentionPlan(
        mapper=torch.zeros(max_len, max_len),
        mapped=torch.zeros(max_len),
        weights=torch.ones(max_len),
        cross_alpha=torch.zeros(num_steps + 1, max_len),
        self_steps=torch.zeros(num_steps, dtype=torch.bool),
        blend_source=torch.zeros(max_len),
        blend_target=torch.zeros(max_len),
    )


# --- the config's control ----------------------------------------------------------------------------


def attention_edit(
    config: PTIConfig,
    source: str | None,
    target: str,
    blend_words: Sequence[str] | None = None,
    reweight: dict[str, float] | None = None,
) -> AttentionEdit | None:
    """What ``config.control`` asks of one edit: None for ``none``; ``auto`` is ``replace`` when
    the prompts have as many words, else ``refine``. Local blend (``config.local_blend``, or a
    row's ``blend_words``) uses the given words, or else the words the two prompts do not share;
    reweighting applies to the words of ``reweight`` (the row's, then the config's) in the target."""
    if config.control == "none":
        return None
    same_length = source is not None and len(source.split()) == len(target.split())
    auto = "replace" if same_length else "refine"
    mode = {"replace": "replace", "refine": "refine", "reweight": None, "auto": auto}[config.control]
    factors = {**(config.reweight or {}), **(reweight or {})}
    blend = None
    if blend_words or config.local_blend:
        source_words, target_words = (source or "").split(), target.split()
        words = list(blend_words or ())
        if not words:  # the words that change: the edit's own region
            words = [w for w in source_words if w not in target_words]
            words += [w for w in target_words if w not in source_words]
        if words or source is None:  # nothing changes: nothing to blend
            blend = ([w for w in words if w in source_words], [w for w in words if w in target_words])
    return AttentionEdit(
        mode=mode,
        cross_replace_steps=config.cross_replace_steps,
        self_replace_steps=config.self_replace_steps,
        reweight={w: f for w, f in factors.items() if w in target.split()},  # each target its own words
        blend_words=blend,
        blend_threshold=config.blend_threshold,
    )


def controlled_positions(down_block_types: Sequence[str], latent_side: int) -> tuple[int, int]:
    """Query positions of the attention layers whose self-attention is injected (at most), and
    of the down and up blocks' cross-attention layers that make the local-blend mask (the mid
    block's never do: ``AttentionControl.records``), for a UNet with ``down_block_types`` on a
    ``latent_side`` square latent. Each is the paper's 16x16 at SD's 64x64 latents (1/16 of the
    latent), or the finest level coarser than that in a smaller UNet: for self-attention among the
    levels with attention, the mid block's included (the reference injects it too); for the blend
    among the down and up blocks' levels with cross-attention. SD 1.x and 2.x: 256 and 256; SDXL
    at 1024 px: 1024 and 1024 (its mid block, at 1024 too, is injected but not blended);
    models/shapes-sd: 16 and 16."""
    cross = [n for n, kind in enumerate(down_block_types) if "CrossAttn" in kind]
    rule = latent_side * latent_side // LATENT_POSITIONS_PER_CONTROLLED_POSITION

    def finest_at_least_rule(levels: list[int]) -> int:
        layers = {(latent_side >> level) ** 2 for level in levels}
        return min((p for p in layers if p >= rule), default=max(layers))

    return finest_at_least_rule([*cross, len(down_block_types) - 1]), finest_at_least_rule(cross)
