"""The stored form of stage 1: one row per image, readable by plain pyarrow (no Ray).

Tensors are canonical ``arrow.fixed_shape_tensor`` columns (row-major), so
``table["prompt_embeddings"].combine_chunks().to_numpy_ndarray()`` gives ``[N, T, 77, D]``.
``model_family`` says which kind of model wrote a row (``sd``: SD 1.x/2.x; ``sdxl``; ``sd3``: the
flow-matching SD3 family); tables written before the column existed are ``sd``. SDXL and SD3 rows
add the pooled stacks ``[T, P]`` (``POOLED``); SD3's token stacks are ``[T, 77 + 256, D]`` and its
``timesteps`` the flow's (``1000 * sigma``: floats).
"""

from __future__ import annotations

import pyarrow as pa

ID = "id"
SOURCE_PROMPT = "source_prompt"
METHOD = "method"
GUIDANCE = "guidance"
Z_T = "z_T"  # the inverted noise, [C, h, w] float32 (C: 4, SD3's 16)
PROMPT_EMBEDDINGS = "prompt_embeddings"  # conditional embedding per timestep, tau_T first: [T, L, D]
UNCOND_EMBEDDINGS = "uncond_embeddings"  # unconditional per timestep (nti, npi), else null
POOLED_PROMPT_EMBEDDINGS = "pooled_prompt_embeddings"  # SDXL, SD3: the pooled part of each, [T, P]
POOLED_UNCOND_EMBEDDINGS = "pooled_uncond_embeddings"  # SDXL, SD3 nti, npi: [T, P], else null
TIMESTEPS = "timesteps"  # tau_T, ..., tau_1: the row order of the embedding stacks
RECONSTRUCTION_PSNR = "reconstruction_psnr"
RECONSTRUCTION_SSIM = "reconstruction_ssim"
TUNING_LOSS = "tuning_loss"  # final reconstruction loss per timestep, tau_T first
MODEL = "model"
MODEL_FAMILY = "model_family"  # sd (SD 1.x/2.x), sdxl or sd3; absent from tables older than SDXL support
MODEL_FINGERPRINT = "model_fingerprint"
CONFIG_FINGERPRINT = "config_fingerprint"
CONFIG = "config"  # the run's PTIConfig as JSON
SECONDS = "seconds"  # this image's share of its batch's stage-1 time
# The input image as stage 1 saw it (centre-cropped and resized to the model's side), uint8
# [R, R, 3]: what edits are scored against. Written by the batch job; absent from older tables.
IMAGE = "image"

EMBEDDINGS_COLUMNS = (
    ID,
    SOURCE_PROMPT,
    METHOD,
    GUIDANCE,
    Z_T,
    PROMPT_EMBEDDINGS,
    UNCOND_EMBEDDINGS,
    POOLED_PROMPT_EMBEDDINGS,
    POOLED_UNCOND_EMBEDDINGS,
    TIMESTEPS,
    RECONSTRUCTION_PSNR,
    RECONSTRUCTION_SSIM,
    TUNING_LOSS,
    MODEL,
    MODEL_FAMILY,
    MODEL_FINGERPRINT,
    CONFIG_FINGERPRINT,
    CONFIG,
    SECONDS,
    IMAGE,
)
TENSOR_COLUMNS = (
    Z_T,
    PROMPT_EMBEDDINGS,
    UNCOND_EMBEDDINGS,
    POOLED_PROMPT_EMBEDDINGS,
    POOLED_UNCOND_EMBEDDINGS,
    IMAGE,
)
POOLED = (POOLED_PROMPT_EMBEDDINGS, POOLED_UNCOND_EMBEDDINGS)  # the families with a pooled embedding


def present(names) -> list[str]:
    """The embeddings columns a table of these column names holds, in schema order (SD 1.x
    tables have no pooled stacks; older tables no ``model_family``)."""
    return [c for c in EMBEDDINGS_COLUMNS if c in set(names)]


def image_type(side: int) -> pa.DataType:
    """The ``image`` column's type for ``side`` px images."""
    return pa.fixed_shape_tensor(pa.uint8(), [side, side, 3])


def family(table: pa.Table) -> str:
    """The model family that wrote a table (all its rows share one; ``sd`` for older tables)."""
    if MODEL_FAMILY not in table.column_names:
        return "sd"
    families = set(table.column(MODEL_FAMILY).drop_null().to_pylist()) or {"sd"}
    if len(families) != 1:
        raise ValueError(f"the table mixes model families {sorted(families)}")
    return families.pop()


ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def embeddings_schema(
    latent_shape: tuple[int, ...],
    embedding_shape: tuple[int, ...],
    embedding_dtype: str = "float16",
    pooled_dim: int | None = None,
    family: str = "sd",
) -> pa.Schema:
    """The embeddings table's schema for latents ``[C, h, w]`` and stacks ``[T, L, D]``; with
    ``pooled_dim`` (SDXL, SD3) also the pooled stacks ``[T, P]``. The flow family's timesteps
    are floats."""
    stack = pa.fixed_shape_tensor(ARROW_DTYPES[embedding_dtype], list(embedding_shape))
    pooled = []
    if pooled_dim is not None:
        pooled_stack = pa.fixed_shape_tensor(ARROW_DTYPES[embedding_dtype], [embedding_shape[0], pooled_dim])
        pooled = [
            pa.field(POOLED_PROMPT_EMBEDDINGS, pooled_stack, nullable=False),
            pa.field(POOLED_UNCOND_EMBEDDINGS, pooled_stack),
        ]
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(SOURCE_PROMPT, pa.string()),
            pa.field(METHOD, pa.string(), nullable=False),
            pa.field(GUIDANCE, pa.float32(), nullable=False),
            pa.field(Z_T, pa.fixed_shape_tensor(pa.float32(), list(latent_shape)), nullable=False),
            pa.field(PROMPT_EMBEDDINGS, stack, nullable=False),
            pa.field(UNCOND_EMBEDDINGS, stack),
            *pooled,
            pa.field(TIMESTEPS, pa.list_(pa.float32() if family == "sd3" else pa.int32()), nullable=False),
            pa.field(RECONSTRUCTION_PSNR, pa.float32()),
            pa.field(RECONSTRUCTION_SSIM, pa.float32()),
            pa.field(TUNING_LOSS, pa.list_(pa.float32())),
            pa.field(MODEL, pa.string(), nullable=False),
            pa.field(MODEL_FAMILY, pa.string(), nullable=False),
            pa.field(MODEL_FINGERPRINT, pa.string(), nullable=False),
            pa.field(CONFIG_FINGERPRINT, pa.string(), nullable=False),
            pa.field(CONFIG, pa.string(), nullable=False),
            pa.field(SECONDS, pa.float32()),
        ]
    )
