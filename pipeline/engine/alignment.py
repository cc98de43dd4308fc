"""Token alignment for Prompt-to-Prompt (ALGORITHM.md, stage 2b): the counterpart of the reference's
``seq_aligner.py`` and the token and step helpers of its ``ptp_utils.py`` (google/prompt-to-prompt).

Which token of the target takes which source token's attention (``replacement_mapper``,
``refinement_mapper``), where each word's tokens lie (``word_token_indices``), and over which steps
(``step_bounds``, ``cross_replace_alphas``), all from the model's own tokenizer. Pure torch over a
tokenizer: no model, Ray, I/O or config here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from pipeline.errors import InputError

StepFraction = float | tuple[float, float]


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
