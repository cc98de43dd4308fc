"""What the cluster's Prometheus sees of a job: Ray's metrics API (``ray.util.metrics``), exported
by every node's metrics agent with Ray's ``ray_`` prefix (counters as ``..._total``):

- ``ray_pti_rows_done_total``, ``ray_pti_rows_failed_total``, ``ray_pti_edits_total``: by the
  driver as results stream in, tagged with the job (``run``, ``tune``, ``edit``);
- ``ray_pti_batch_seconds`` (a histogram) and ``ray_pti_gpu_seconds_total``: by the stage actors
  for every batch, tagged with the stage (``tune``, ``edit``); GPU seconds are a batch's seconds
  times the GPUs Ray gave its actor, what a GPU hour is billed on.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

BATCH_SECONDS_BOUNDARIES = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]


@functools.cache
def _metrics() -> dict:
    from ray.util.metrics import Counter, Histogram

    job, stage = ("job",), ("stage",)
    return {
        "rows_done": Counter("pti_rows_done", "Input rows done: tuned and edited.", job),
        "rows_failed": Counter("pti_rows_failed", "Input rows in the errors table.", job),
        "edits": Counter("pti_edits", "Edited images written.", job),
        "batch_seconds": Histogram(
            "pti_batch_seconds", "Seconds per stage batch.", BATCH_SECONDS_BOUNDARIES, stage
        ),
        "gpu_seconds": Counter("pti_gpu_seconds", "Batch seconds x the actor's GPUs.", stage),
    }


def count(job: str, **deltas: int) -> None:
    """Add ``rows_done``, ``rows_failed`` and ``edits`` deltas for ``job``."""
    for name, delta in deltas.items():
        if delta > 0:
            _metrics()[name].inc(delta, tags={"job": job})


def timed_batches(stage: str) -> Callable:
    """A stage's ``__call__`` that records each batch's seconds and GPU seconds."""

    def wrap(call: Callable) -> Callable:
        @functools.wraps(call)
        def timed(self, *args, **kwargs):
            began = time.perf_counter()
            try:
                return call(self, *args, **kwargs)
            finally:
                seconds = time.perf_counter() - began
                metrics = _metrics()
                metrics["batch_seconds"].observe(seconds, tags={"stage": stage})
                gpus = _gpus_held()
                if gpus:
                    metrics["gpu_seconds"].inc(seconds * gpus, tags={"stage": stage})

        return timed

    return wrap


def _gpus_held() -> float:
    """The GPUs Ray gave this actor (fractional ones too); none outside a Ray worker."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return 0.0  # a driver (a stage called in-process): Ray assigned it nothing
    return ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)


class Progress:
    """Rows done and failed, rows per second and the time left, as a job log line at most every
    ``every_s`` seconds and once at the end (Ray Data's own progress bar counts blocks, ``0/?``),
    and as the job's metrics (``count``)."""

    def __init__(self, job: str, todo: int, every_s: float):
        self.job, self.todo, self.every_s = job, todo, every_s
        self.started = self.logged = time.monotonic()
        self.done = self.failed = self.edits = 0

    def update(self, done: int, failed: int, edits: int) -> None:
        """The counts so far: logged, and their growth added to the job's metrics."""
        delta = dict(rows_done=done - self.done, rows_failed=failed - self.failed, edits=edits - self.edits)
        count(self.job, **delta)
        self.done, self.failed, self.edits = done, failed, edits
        if time.monotonic() - self.logged >= self.every_s:
            self.log()

    def log(self) -> None:
        self.logged = time.monotonic()
        seconds = max(self.logged - self.started, 1e-9)
        finished = self.done + self.failed
        rate = finished / seconds
        left = f"{(self.todo - finished) / rate:.0f} s" if rate > 0 else "?"
        log.info(
            "%s: %d/%d rows done, %d failed, %d edits, %.2f rows/s, %.0f s elapsed, ETA %s",
            self.job,
            self.done,
            self.todo,
            self.failed,
            self.edits,
            rate,
            seconds,
            left,
        )
