"""Ray for a job: join the cluster it was submitted to or start a local one, and check that the
cluster can hold the job's actor pools."""

from __future__ import annotations

import logging
import os

from pipeline.batch.config import RunConfig
from pipeline.errors import InputError

log = logging.getLogger(__name__)


def init_ray(config: RunConfig) -> None:
    """Join the cluster a job was submitted to, or start a local one sized so that reads always
    have a CPU beside the actor pools (a pool that takes every CPU starves the reads: a hang)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    actors = config.tune_actors + config.edit_actors
    ray.init(num_cpus=int(actors * config.cpus_per_actor) + 2, include_dashboard=False)


def check_gpus(config: RunConfig) -> None:
    """Refuse a job whose actors ask for GPUs the cluster does not have at all."""
    import ray

    needed = config.gpus_per_actor * max(config.tune_actors, config.edit_actors)
    have = ray.cluster_resources().get("GPU", 0)
    if config.gpus_per_actor > 0 and have < config.gpus_per_actor:
        raise InputError(
            f"the GPU stages ask for {config.gpus_per_actor} GPU per actor but the Ray cluster has "
            f"{have:g} GPUs; add GPU workers or set gpus_per_actor=0 to run on CPUs"
        )
    if have < needed:
        log.warning("the cluster has %g GPUs for %g requested: some actors will wait", have, needed)


def pools_fit(config: RunConfig, actors: int) -> bool:
    """Whether all of a job's actors fit in the cluster at once, with a CPU left for reads.

    When they do, pools wait for all their actors before taking work, so every actor gets some
    (otherwise the first actor up can take a small job's every block). When they don't (jobs.run
    with fewer GPUs than tune_actors + edit_actors), editing actors can only start as tuning ones
    finish, so waiting would deadlock: Ray then starts each actor as resources free up."""
    import ray

    have = ray.cluster_resources()
    gpus_fit = config.gpus_per_actor * actors <= have.get("GPU", 0)
    return gpus_fit and config.cpus_per_actor * actors < have.get("CPU", 0)
