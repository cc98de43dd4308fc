"""Prompts to CLIP embeddings: ``psi(text)`` of ALGORITHM.md, the encoder's last hidden state."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from pipeline.engine.models import StableDiffusion

log = logging.getLogger(__name__)


def tokenize(sd: StableDiffusion, prompts: Sequence[str]) -> Tensor:
    """Token ids padded to the encoder's context (77 for CLIP); longer prompts are truncated with
    a warning that names them."""
    length = sd.text_encoder.config.max_position_embeddings
    full = sd.tokenizer(list(prompts), truncation=False).input_ids
    for prompt, ids in zip(prompts, full):
        if len(ids) > length:
            log.warning(
                "prompt is %d tokens, longer than the text encoder's %d: truncated: %r",
                len(ids),
                length,
                prompt,
            )
    batch = sd.tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return batch.input_ids


@torch.no_grad()
def encode_prompts(sd: StableDiffusion, prompts: Sequence[str]) -> Tensor:
    """``psi(p)`` for each prompt, ``[N, 77, D]`` in float32."""
    ids = tokenize(sd, prompts).to(sd.device)
    return sd.text_encoder(ids)[0].float()
