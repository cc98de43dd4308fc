"""Stage-1 results to Arrow and back, so stage 2 can run later, elsewhere, from storage only."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine, Inversion
from pipeline.engine.models import join_pooled, split_pooled
from schemas import embeddings as col


def _tensor_column(array: np.ndarray, type_: pa.FixedShapeTensorType) -> pa.ExtensionArray:
    flat = pa.array(array.reshape(len(array), -1).ravel(), type=type_.value_type)
    size = int(np.prod(type_.shape))
    return pa.ExtensionArray.from_storage(type_, pa.FixedSizeListArray.from_arrays(flat, size))


def inversion_to_arrow(
    engine: Engine, inversion: Inversion, ids: Sequence[str], source_prompts: Sequence[str | None]
) -> pa.Table:
    """One row per image of a stage-1 batch, with the config and model that made it."""
    cfg: PTIConfig = engine.config
    n = len(inversion)
    family, pooled_dim = engine.sd.family, engine.sd.pooled_dim
    cond, uncond, pooled = inversion.cond, inversion.uncond, {}
    if pooled_dim is not None:  # SDXL, SD3: the pooled rows in their own columns (models.join_pooled)
        cond, pooled_cond = split_pooled(cond, pooled_dim)
        pooled[col.POOLED_PROMPT_EMBEDDINGS] = pooled_cond
        if uncond is not None:
            uncond, pooled[col.POOLED_UNCOND_EMBEDDINGS] = split_pooled(uncond, pooled_dim)
    schema = col.embeddings_schema(
        tuple(inversion.z_T.shape[1:]), tuple(cond.shape[1:]), cfg.embedding_dtype, pooled_dim, family
    )
    np_dtype = np.dtype(cfg.embedding_dtype)

    def stack(t: torch.Tensor | None, name: str) -> pa.ExtensionArray:
        type_ = schema.field(name).type
        if t is None:
            return pa.ExtensionArray.from_storage(type_, pa.nulls(n, type_.storage_type))
        return _tensor_column(t.detach().float().cpu().numpy().astype(np_dtype), type_)

    per_image = sum(inversion.seconds.values()) / max(n, 1)

    def optional(t: torch.Tensor | None) -> list:
        return [None] * n if t is None else t.float().cpu().tolist()

    columns = {
        col.ID: list(ids),
        col.SOURCE_PROMPT: list(source_prompts),
        col.METHOD: [cfg.method] * n,
        col.GUIDANCE: [cfg.guidance] * n,
        col.Z_T: _tensor_column(inversion.z_T.float().cpu().numpy(), schema.field(col.Z_T).type),
        col.PROMPT_EMBEDDINGS: stack(cond, col.PROMPT_EMBEDDINGS),
        col.UNCOND_EMBEDDINGS: stack(uncond, col.UNCOND_EMBEDDINGS),
        **{name: stack(pooled.get(name), name) for name in col.POOLED if pooled_dim is not None},
        col.TIMESTEPS: [list(reversed(engine.schedule.timesteps[1:]))] * n,
        col.RECONSTRUCTION_PSNR: optional(inversion.psnr),
        col.RECONSTRUCTION_SSIM: optional(inversion.ssim),
        col.TUNING_LOSS: optional(inversion.final_loss),
        col.MODEL: [cfg.model] * n,
        col.MODEL_FAMILY: [family] * n,
        col.MODEL_FINGERPRINT: [engine.sd.fingerprint] * n,
        col.CONFIG_FINGERPRINT: [engine.fingerprint] * n,
        col.CONFIG: [json.dumps(cfg.to_dict(), sort_keys=True)] * n,
        col.SECONDS: [per_image] * n,
    }
    return pa.Table.from_pydict(columns, schema=schema)


def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().to_numpy_ndarray()


def inversion_from_arrow(table: pa.Table) -> Inversion:
    """The part of stage 1 that editing needs (``z_T`` and the embedding stacks), as float32;
    an SDXL or SD3 table's pooled stacks joined back to their token stacks (``models.join_pooled``)."""
    pooled_family = col.family(table) in ("sdxl", "sd3")

    def stack(name: str, pooled: str) -> torch.Tensor | None:
        column = table.column(name)
        if column.null_count == len(column):
            return None
        tokens = torch.from_numpy(_to_numpy(column).astype(np.float32))
        if not pooled_family:
            return tokens
        return join_pooled(tokens, torch.from_numpy(_to_numpy(table.column(pooled)).astype(np.float32)))

    return Inversion(
        z_T=torch.from_numpy(_to_numpy(table.column(col.Z_T)).astype(np.float32)),
        cond=stack(col.PROMPT_EMBEDDINGS, col.POOLED_PROMPT_EMBEDDINGS),
        uncond=stack(col.UNCOND_EMBEDDINGS, col.POOLED_UNCOND_EMBEDDINGS),
    )


def config_of(table: pa.Table) -> PTIConfig:
    """The config a stored table was made with (all rows share it)."""
    configs = set(table.column(col.CONFIG).to_pylist())
    if len(configs) != 1:
        raise ValueError(f"the table mixes {len(configs)} configs; edit each part separately")
    values = json.loads(configs.pop())
    return PTIConfig.from_dict(values)
