"""What a stage's GPU actor needs around its engine: the device Ray gave it checked, its model loaded,
a failed batch retried on parts, and Arrow's uint8 images as the engine's float pixels.

Kept apart from the stages (``pipeline.batch.stages``), whose classes then read as Ray's
batch-inference examples do: load in ``__init__``, map a batch in ``__call__``.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa

from pipeline.batch.rows import out_of_memory
from pipeline.engine.config import PTIConfig
from pipeline.errors import DeviceError, ModelError
from pipeline.io.storage import Location
from schemas import embeddings as emb

log = logging.getLogger(__name__)


def split_on_failure(run, items: list):
    """``run(items)``; if it raises, ``run`` on parts of ``items`` down to single items, so only
    an item that fails alone fails: halves on out-of-memory (a smaller batch may fit), each item
    alone on any other failure (it may be one item's, e.g. one row's text that breaks a model).

    Yields ``(items, result)`` per call that ran, or ``(items, exception)`` for a single item that
    failed: a batch too big for the device, or holding one bad row, costs retries, not its rows."""
    try:
        result = run(items)
    except Exception as exc:  # noqa: BLE001 (retried on parts, then its items' errors)
        if len(items) == 1:
            yield items, exc
            return
        if out_of_memory(exc):
            log.warning("out of memory on a batch of %d: splitting it", len(items))
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(items) // 2
            parts = [items[:half], items[half:]]
        else:
            log.warning("a batch of %d failed (%s: %s): each runs alone", len(items), type(exc).__name__, exc)
            parts = [[item] for item in items]
        for part in parts:
            yield from split_on_failure(run, part)
        return
    yield items, result


def _ray_gpu_ids() -> list:
    """The GPUs Ray gave this process (an actor's ``num_gpus``); none outside a Ray worker."""
    import ray

    return list(ray.get_gpu_ids()) if ray.is_initialized() else []


def check_device(config: PTIConfig, gpu_ids: list) -> None:
    """Refuse a stage that Ray gave GPUs (``gpu_ids``) but whose engine would run on the CPU: torch
    sees no CUDA device, or ``pti.device`` is not one. No silent fallback: the job would run many
    times slower while holding the GPUs. ``pti.device: cpu`` is the operator's own choice (e.g. a
    cluster that declares GPUs it has not): it runs, with a warning."""
    import torch

    if not gpu_ids:
        return
    asked = f"Ray gave this actor GPU {', '.join(map(str, gpu_ids))} (gpus_per_actor > 0)"
    if config.device.split(":")[0] == "cpu":
        log.warning("%s, but runs on the CPU as pti.device=%r asks", asked, config.device)
        return
    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise DeviceError(
        f"{asked} and pti.device={config.device!r}, but torch {torch.__version__} ({build} build) "
        f"sees no CUDA device (CUDA_VISIBLE_DEVICES={visible!r}), so the model would run on the CPU. "
        "Install a CUDA build of torch on the GPU workers and check their NVIDIA driver (nvidia-smi), "
        "or run the actors on CPUs with gpus_per_actor=0 (or pti.device=cpu to keep the GPUs anyway)"
    )


def load_engine(config: PTIConfig, model: Location, expect_model: frozenset, cpus: float):
    """The stage's model, on the device it was given (``check_device``); refused if the output's
    stored embeddings came from another one. A CPU engine gets ``cpus`` threads, sharing the
    node's cores with other actors."""
    import torch

    from pipeline.engine.engine import Engine

    check_device(config, _ray_gpu_ids())
    engine = Engine.load(config.replace(progress=False), model.storage_options())
    if expect_model and engine.sd.fingerprint not in expect_model:
        raise ModelError(
            f"model {config.model!r} (fingerprint {engine.sd.fingerprint}) is not the one that made the "
            f"stored embeddings ({', '.join(sorted(expect_model))}): its files changed; write to a new output"
        )
    if engine.sd.device.type == "cpu":
        torch.set_num_threads(max(1, int(cpus)))
    return engine


def pixels_of(raw: list[bytes], side: int):
    """Raw uint8 RGB rows to a ``[B, 3, side, side]`` float batch in ``[0, 1]``."""
    return as_pixels(np.stack([np.frombuffer(r, np.uint8).reshape(side, side, 3) for r in raw]))


def as_pixels(images: np.ndarray):
    """uint8 RGB images ``[B, H, W, 3]`` as a float batch ``[B, 3, H, W]`` in ``[0, 1]``."""
    import torch

    writable = images if images.flags.writeable else images.copy()  # Arrow's arrays are read-only
    return torch.from_numpy(writable).permute(0, 3, 1, 2).contiguous().float() / 255


def stored_inputs(table: pa.Table):
    """The input images of stored stage-1 rows (``schemas.embeddings.IMAGE``) as a float batch,
    or None for rows written before inputs were stored."""
    if emb.IMAGE not in table.column_names or table.column(emb.IMAGE).null_count:
        return None
    return as_pixels(table.column(emb.IMAGE).combine_chunks().to_numpy_ndarray())
