"""Prompts to CLIP embeddings: ``psi(text)`` of ALGORITHM.md.

SD 1.x/2.x: the text encoder's last hidden state. SDXL (``StableDiffusionXLPipeline.encode_prompt``):
the penultimate hidden states of both encoders side by side, and the second encoder's projected
pooled embedding, joined as one tensor (``models.join_pooled``). SD3: its pipeline's own
``encode_prompt`` (the joint embedding of CLIP-L, CLIP-G and T5, and both CLIPs' pooled
projections), joined the same way.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from pipeline.engine.models import SD3_T5_TOKENS, StableDiffusion, join_pooled

log = logging.getLogger(__name__)


def tokenize(sd: StableDiffusion, prompts: Sequence[str], tokenizer=None) -> Tensor:
    """Token ids padded to the encoder's context (77 for CLIP); longer prompts are truncated with
    a warning that names them. ``tokenizer`` is the model's first unless given (SDXL's second)."""
    tokenizer = tokenizer or sd.tokenizer
    length = sd.text_encoder.config.max_position_embeddings
    full = tokenizer(list(prompts), truncation=False).input_ids
    for prompt, ids in zip(prompts, full):
        if len(ids) > length and tokenizer is sd.tokenizer:  # warned once, not per tokenizer
            log.warning(
                "prompt is %d tokens, longer than the text encoder's %d: truncated: %r",
                len(ids),
                length,
                prompt,
            )
    batch = tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return batch.input_ids


@torch.no_grad()
def encode_prompts(sd: StableDiffusion, prompts: Sequence[str]) -> Tensor:
    """``psi(p)`` for each prompt in float32: ``[N, 77, D]``; SDXL ``[N, 78, D]`` (the pooled row last)."""
    if sd.family == "sd3":
        return _encode_sd3(sd, prompts)
    ids = tokenize(sd, prompts).to(sd.device)
    if sd.family == "sd":
        return sd.text_encoder(ids)[0].float()
    first = sd.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    ids_2 = tokenize(sd, prompts, sd.tokenizer_2).to(sd.device)
    second = sd.text_encoder_2(ids_2, output_hidden_states=True)
    tokens = torch.cat([first, second.hidden_states[-2]], dim=-1)
    return join_pooled(tokens.float(), second.text_embeds.float())


def _encode_sd3(sd: StableDiffusion, prompts: Sequence[str]) -> Tensor:
    """``StableDiffusion3Pipeline.encode_prompt`` on the loaded parts (a pipeline object over them:
    no copy), each prompt for all three encoders, T5 at the pipeline's default length."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=sd.unet,
        scheduler=sd.scheduler,
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        text_encoder_2=sd.text_encoder_2,
        tokenizer_2=sd.tokenizer_2,
        text_encoder_3=sd.text_encoder_3,
        tokenizer_3=sd.tokenizer_3,
    )
    tokens, _, pooled, _ = pipe.encode_prompt(
        list(prompts),
        None,
        None,
        device=sd.device,
        do_classifier_free_guidance=False,
        max_sequence_length=SD3_T5_TOKENS,
    )
    return join_pooled(tokens.float(), pooled.float())


def null_embedding(sd: StableDiffusion) -> Tensor:
    """The unconditional embedding ``[1, L, D]``: ``psi("")``, or zeros where an SDXL model's
    ``force_zeros_for_empty_prompt`` says so (as its pipeline does for an empty negative prompt)."""
    empty = encode_prompts(sd, [""])
    return torch.zeros_like(empty) if sd.force_zeros_for_empty_prompt else empty
