"""Prompt-to-Prompt attention control (ALGORITHM.md, stage 2b), for every inversion method.

Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control", ICLR 2023; the reference
is google/prompt-to-prompt (``seq_aligner.py``, ``ptp_utils.py``, ``prompt-to-prompt_stable.ipynb``
and ``null_text_w_ptp.ipynb``). Three parts, each named after the reference's step:

- token alignment from the model's own tokenizer (``replacement_mapper``, ``refinement_mapper``,
  ``word_token_indices``) and one edit's plan over tokens and steps (``plan_attention_edit``);
- diffusers attention processors (``ControlledAttnProcessor``, installed by ``attention_control``
  through ``set_attn_processor``) that record and replace the probabilities of the conditional half;
- ``sample_with_attention_control``: DDIM sampling of every image's source branch beside its edits,
  in one UNet call per step, with local blend after each step.

Pure torch over tensors and a tokenizer: no Ray, I/O or config here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.engine.algorithm import Schedule, ddim_move, guided_noise
from pipeline.errors import InputError

NoiseFn = Callable[[Tensor, int, Tensor], Tensor]
Guidance = float | Tensor
StepFraction = float | tuple[float, float]

# The paper controls self-attention and blends with the 16x16 maps of SD's 64x64 latents: 1/16 of them.
LATENT_POSITIONS_PER_CONTROLLED_POSITION = 16


# --- token alignment (seq_aligner.py) ----------------------------------------------------------------


def prompt_token_ids(tokenizer, prompt: str, max_len: int = 77) -> list[int]:
    """The prompt's token ids with start and end tokens, truncated as ``text.tokenize`` does."""
    return list(tokenizer(prompt, truncation=True, max_length=max_len).input_ids)


def word_token_indices(tokenizer, prompt: str, max_len: int = 77) -> list[list[int]]:
    """For each whitespace-separated word of ``prompt``, its token positions in the encoded prompt
    (position 0 is the start token); a word the tokenizer splits has several.

    The reference's ``get_word_inds`` (``seq_aligner.py``) counts decoded characters; here each
    word is tokenised alone and the pieces are checked to add up to the whole prompt's tokens.
    Positions cut off by truncation are left out.
    """
    ids = prompt_token_ids(tokenizer, prompt, max_len)
    pieces = [list(tokenizer(word, add_special_tokens=False).input_ids) for word in prompt.split()]
    joined = [i for piece in pieces for i in piece]
    if joined[: len(ids) - 2] != ids[1:-1]:
        raise InputError(
            f"the tokenizer does not tokenise {prompt!r} word by word, so its words cannot be aligned "
            "to tokens: write the prompt with spaces between its words"
        )
    out, position = [], 1
    for piece in pieces:
        out.append([p for p in range(position, position + len(piece)) if p < len(ids) - 1])
        position += len(piece)
    return out


def token_indices(tokenizer, prompt: str, word: str, max_len: int = 77) -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt`` (the reference's
    ``get_word_inds`` with a word); an error when the prompt does not contain it."""
    words = prompt.split()
    per_word = word_token_indices(tokenizer, prompt, max_len)
    found = [p for w, ps in zip(words, per_word) if w.casefold() == word.casefold() for p in ps]
    if not found:
        raise InputError(f"word {word!r} is not in prompt {prompt!r}: name one of its words {words}")
    return found


def replacement_mapper(tokenizer, source: str, target: str, max_len: int = 77) -> Tensor:
    """The word-swap mapper ``M`` (``[max_len, max_len]``): the edit's cross-attention becomes
    ``P_source @ M`` (Hertz et al. 2023, sec. 3.2, "word swap"; ``seq_aligner.get_replacement_mapper``).

    Source and target have the same number of words. Unchanged words map token to token; a swapped
    word with as many tokens as its replacement maps token to token too, else every source token of
    it spreads evenly over all the target's tokens (so a source word of one token maps to each of the
    target word's tokens with ``1 / n``). After the last word, the rest (end and padding tokens)
    map position to position from where each sequence stands: the reference writes ``M[j, j]``
    there, which shifts them when the swapped words differ in token count. Where the source is
    longer, the last target padding columns stay zero; every source row sums to 1.
    """
    words_x, words_y = source.split(), target.split()
    if len(words_x) != len(words_y):
        raise InputError(
            f"replace needs source and target with the same number of words, but {source!r} has "
            f"{len(words_x)} and {target!r} has {len(words_y)}: use refine for added or removed words"
        )
    tokens_x = word_token_indices(tokenizer, source, max_len)
    tokens_y = word_token_indices(tokenizer, target, max_len)
    mapper = torch.zeros(max_len, max_len)
    mapper[0, 0] = 1  # the start token
    i = j = 1
    for ix, iy in zip(tokens_x, tokens_y):
        if ix and iy:
            if len(ix) == len(iy):
                mapper[ix, iy] = 1
            else:
                mapper[torch.tensor(ix)[:, None], torch.tensor(iy)[None, :]] = 1 / len(iy)
        i, j = i + len(ix), j + len(iy)
    while i < max_len and j < max_len:
        mapper[i, j] = 1
        i, j = i + 1, j + 1
    return mapper


def global_alignment(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Needleman-Wunsch alignment of token sequences, as ``seq_aligner.global_align`` (gap 0,
    match 1, mismatch -1, ties to a gap in ``x``, then in ``y``, then the diagonal): for each
    position of ``y`` the aligned position of ``x``, or -1 where ``y`` has a token ``x`` lacks."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        trace[0][j] = 1
    for i in range(1, n + 1):
        trace[i][0] = 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(left, up, diag)
            trace[i][j] = 1 if score[i][j] == left else 2 if score[i][j] == up else 3
    y_to_x = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if trace[i][j] == 3:
            i, j = i - 1, j - 1
            y_to_x[j] = i
        elif trace[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return y_to_x


def refinement_mapper(tokenizer, source: str, target: str, max_len: int = 77) -> tuple[Tensor, Tensor]:
    """The refinement mapper and alphas (Hertz et al. 2023, sec. 3.2, "adding a new phrase";
    ``seq_aligner.get_refinement_mapper``): ``mapper[n]`` is the source token whose attention the
    target token ``n`` takes, ``alphas[n]`` is 0 where it has none (``mapper[n] = -1``: the edit
    keeps its own attention there).

    The tokens are globally aligned; padding after the target's end token maps position to position,
    as the reference does, except that it never lands on a source word: where the source is longer
    it maps to the source's end token.
    """
    x, y = prompt_token_ids(tokenizer, source, max_len), prompt_token_ids(tokenizer, target, max_len)
    mapper = torch.tensor(global_alignment(x, y) + list(range(len(y), max_len)), dtype=torch.long)
    mapper[len(y) :] = mapper[len(y) :].clamp(min=len(x) - 1)
    alphas = mapper.ne(-1).float()
    return mapper, alphas


def step_bounds(fraction: StepFraction, length: int) -> tuple[int, int]:
    """``(start, end)`` step indices of a fraction ``f`` (``(0, f)``) or a pair, as the reference
    rounds them (``int(f * length)``)."""
    start, end = (0.0, fraction) if isinstance(fraction, (int, float)) else fraction
    if not 0 <= start <= end <= 1:
        raise InputError(f"step fractions must satisfy 0 <= start <= end <= 1, got {fraction!r}")
    return int(start * length), int(end * length)


def cross_replace_alphas(
    tokenizer,
    target: str,
    num_steps: int,
    cross_replace_steps: StepFraction,
    word_replace_steps: Mapping[str, StepFraction],
    max_len: int = 77,
) -> Tensor:
    """``[T + 1, max_len]``: 1 where the edit's cross-attention to a target token is controlled
    at a step (``ptp_utils.get_time_words_attention_alpha``), per word where given."""
    alphas = torch.zeros(num_steps + 1, max_len)
    start, end = step_bounds(cross_replace_steps, num_steps + 1)
    alphas[start:end] = 1
    for word, fraction in word_replace_steps.items():
        inds = token_indices(tokenizer, target, word, max_len)
        start, end = step_bounds(fraction, num_steps + 1)
        alphas[:, inds] = 0
        alphas[start:end, inds] = 1
    return alphas


def word_weights(tokenizer, prompt: str, weights: Mapping[str, float], max_len: int = 77) -> Tensor:
    """``[max_len]`` factors on the attention to each token (the notebook's ``get_equalizer``)."""
    equalizer = torch.ones(max_len)
    for word, weight in weights.items():
        equalizer[token_indices(tokenizer, prompt, word, max_len)] = float(weight)
    return equalizer


# --- one edit's plan -------------------------------------------------------------------------------


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


# --- the controlled attention ----------------------------------------------------------------------


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
        none = AttentionPlan(
            mapper=torch.zeros(length, length),
            mapped=torch.zeros(length),
            weights=torch.ones(length),
            cross_alpha=torch.zeros(num_steps + 1, length),
            self_steps=torch.zeros(num_steps, dtype=torch.bool),
            blend_source=torch.zeros(length),
            blend_target=torch.zeros(length),
        )
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


class ControlledAttnProcessor:
    """A diffusers attention processor for Prompt-to-Prompt (Hertz et al. 2023; the reference
    patches ``CrossAttention.forward`` in ``ptp_utils.register_attention_control``).

    It computes what ``AttnProcessor2_0`` does, with the fused ``scaled_dot_product_attention``,
    except where ``control`` controls or records the layer at this step: there the conditional half
    gets explicit probabilities (``Attention.get_attention_scores``, as ``AttnProcessor``), which
    ``control`` records and replaces; the unconditional half stays fused and untouched.
    """

    def __init__(self, control: AttentionControl, place: str = "down"):
        self.control = control
        self.place = place  # down, mid or up: the UNet part of the layers it serves

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if batch != 2 * self.control.rows:
            raise RuntimeError(
                f"attention control expects the UNet batch [uncond, cond] of 2 x {self.control.rows} rows, "
                f"got {batch}"
            )
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.control.controls(is_cross, query.shape[2], self.place):
            half = batch // 2
            masks = (None, None) if attention_mask is None else (attention_mask[:half], attention_mask[half:])
            uncond = F.scaled_dot_product_attention(
                query[:half], key[:half], value[:half], attn_mask=masks[0], scale=attn.scale
            )
            probs = self.attention_probabilities(attn, query[half:], key[half:], masks[1])
            probs = self.control.edit_attention(probs, is_cross, self.place)
            out = torch.cat([uncond, probs.to(value.dtype) @ value[half:]])
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def attention_probabilities(attn, query: Tensor, key: Tensor, mask: Tensor | None) -> Tensor:
        """``softmax(Q K^T * scale + mask)`` as ``[B, H, Q, K]``, by diffusers' own
        ``get_attention_scores`` (its upcasting included)."""
        b, h, q, d = query.shape
        flat_mask = None if mask is None else mask.reshape(b * h, -1, mask.shape[-1])
        probs = attn.get_attention_scores(query.reshape(b * h, q, d), key.reshape(b * h, -1, d), flat_mask)
        return probs.view(b, h, q, -1)


def unet_place(processor_name: str) -> str:
    """``down``, ``mid`` or ``up``: where a diffusers attention processor's layer lies
    (``down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor`` is ``down``), as the
    reference's ``register_attention_control`` names them."""
    head = processor_name.split(".", 1)[0]
    places = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    if head not in places:
        raise ValueError(f"attention layer {processor_name!r} is in no down, mid or up block")
    return places[head]


@contextmanager
def attention_control(unet, control: AttentionControl) -> Iterator[AttentionControl]:
    """Install ``ControlledAttnProcessor`` in every attention layer of ``unet`` through diffusers'
    ``set_attn_processor``, each knowing its part of the UNet (``unet_place``), and restore the
    original processors afterwards, even on error."""
    original = dict(unet.attn_processors)
    processors = {place: ControlledAttnProcessor(control, place) for place in ("down", "mid", "up")}
    unet.set_attn_processor({name: processors[unet_place(name)] for name in original})
    try:
        yield control
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given


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
    plans: Sequence[AttentionPlan],
    schedule: Schedule,
    guidance: Guidance = 7.5,
    source_guidance: Guidance | None = None,
    self_max_positions: int | None = None,
    blend_positions: int | None = None,
    progress: bool = False,
) -> ControlledLatents:
    """Guided DDIM sampling with Prompt-to-Prompt control (ALGORITHM.md, stage 2b; Hertz et al.
    2023; the reference's ``text2image_ldm_stable`` with an ``AttentionControlEdit``).

    For B images and N edits: ``z_T``, ``source_cond`` and ``uncond`` have one row per image,
    ``edit_cond`` one per edit, and edit ``n`` edits image ``images[n]`` under ``plans[n]``. The
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
    taus, a = schedule.timesteps, schedule.alphas
    T = schedule.num_steps
    with torch.no_grad(), attention_control(unet, control):
        steps = tqdm(range(T, 0, -1), desc="edit with attention control", disable=not progress, leave=False)
        for j, i in enumerate(steps):
            control.step = j
            cond = torch.cat([_at_step(source_cond, j), _at_step(edit_cond, j).to(source_cond)])[picks]
            u = _at_step(uncond, j)[image_of]
            e_uncond, e_cond = eps(torch.cat([z, z]), taus[i], torch.cat([u, cond.to(u)])).chunk(2)
            z = ddim_move(z, guided_noise(e_uncond, e_cond, w), a[i], a[i - 1])
            z = control.blend(z)
    edit_rows_t = torch.tensor(edit_rows, device=device)
    return ControlledLatents(
        edits=z[edit_rows_t],
        sources=z[torch.tensor(source_rows, device=device)],
        blend_masks=None if control.blend_mask is None else control.blend_mask[edit_rows_t],
        explicit_calls=control.explicit_calls,
    )
