"""The stored form of stage 1: one row per image, readable by plain pyarrow (no Ray).

Tensors are canonical ``arrow.fixed_shape_tensor`` columns (row-major), so
``table["prompt_embeddings"].combine_chunks().to_numpy_ndarray()`` gives ``[N, T, 77, D]``.
"""

from __future__ import annotations

import pyarrow as pa

ID = "id"
SOURCE_PROMPT = "source_prompt"
METHOD = "method"
GUIDANCE = "guidance"
Z_T = "z_T"  # the inverted noise, [4, h, w] float32
PROMPT_EMBEDDINGS = "prompt_embeddings"  # conditional embedding per timestep, tau_T first: [T, L, D]
UNCOND_EMBEDDINGS = "uncond_embeddings"  # unconditional per timestep (nti, npi), else null
TIMESTEPS = "timesteps"  # tau_T, ..., tau_1: the row order of the embedding stacks
RECONSTRUCTION_PSNR = "reconstruction_psnr"
RECONSTRUCTION_SSIM = "reconstruction_ssim"
TUNING_LOSS = "tuning_loss"  # final reconstruction loss per timestep, tau_T first
MODEL = "model"
MODEL_FINGERPRINT = "model_fingerprint"
CONFIG_FINGERPRINT = "config_fingerprint"
CONFIG = "config"  # the run's PTIConfig as JSON
SECONDS = "seconds"  # this image's share of its batch's stage-1 time

EMBEDDINGS_COLUMNS = (
    ID,
    SOURCE_PROMPT,
    METHOD,
    GUIDANCE,
    Z_T,
    PROMPT_EMBEDDINGS,
    UNCOND_EMBEDDINGS,
    TIMESTEPS,
    RECONSTRUCTION_PSNR,
    RECONSTRUCTION_SSIM,
    TUNING_LOSS,
    MODEL,
    MODEL_FINGERPRINT,
    CONFIG_FINGERPRINT,
    CONFIG,
    SECONDS,
)

ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def embeddings_schema(
    latent_shape: tuple[int, ...], embedding_shape: tuple[int, ...], embedding_dtype: str = "float16"
) -> pa.Schema:
    """The embeddings table's schema for latents ``[4, h, w]`` and stacks ``[T, L, D]``."""
    stack = pa.fixed_shape_tensor(ARROW_DTYPES[embedding_dtype], list(embedding_shape))
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(SOURCE_PROMPT, pa.string()),
            pa.field(METHOD, pa.string(), nullable=False),
            pa.field(GUIDANCE, pa.float32(), nullable=False),
            pa.field(Z_T, pa.fixed_shape_tensor(pa.float32(), list(latent_shape)), nullable=False),
            pa.field(PROMPT_EMBEDDINGS, stack, nullable=False),
            pa.field(UNCOND_EMBEDDINGS, stack),
            pa.field(TIMESTEPS, pa.list_(pa.int32()), nullable=False),
            pa.field(RECONSTRUCTION_PSNR, pa.float32()),
            pa.field(RECONSTRUCTION_SSIM, pa.float32()),
            pa.field(TUNING_LOSS, pa.list_(pa.float32())),
            pa.field(MODEL, pa.string(), nullable=False),
            pa.field(MODEL_FINGERPRINT, pa.string(), nullable=False),
            pa.field(CONFIG_FINGERPRINT, pa.string(), nullable=False),
            pa.field(CONFIG, pa.string(), nullable=False),
            pa.field(SECONDS, pa.float32()),
        ]
    )
