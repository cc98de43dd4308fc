"""Ray for a job: join the cluster it was submitted to or start a local one, and check that the
cluster can hold the job's actor pools (waiting for an autoscaler to add the GPUs they need)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable

from pipeline.batch.config import RunConfig
from pipeline.errors import InputError

log = logging.getLogger(__name__)


def init_ray(config: RunConfig) -> None:
    """Join the cluster a job was submitted to (``RAY_ADDRESS``), or start a local one sized so
    that reads always have a CPU beside the actor pools (a pool that takes every CPU starves the
    reads: a hang). Without ``RAY_ADDRESS`` a local Ray is always a new one: a cluster that
    ``ray start`` left on the machine is not joined by accident (nor sized for this job)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    actors = config.tune_actors + config.edit_actors
    ray.init(address="local", num_cpus=int(actors * config.cpus_per_actor) + 2, include_dashboard=False)


def starved_reads(actors: int, cpus_per_actor: float, cluster_cpus: float) -> str | None:
    """What is wrong when a job's actors would leave its reads no whole CPU (each read and write
    task asks for one), with the fix; None when a CPU is left."""
    left = cluster_cpus - actors * cpus_per_actor
    if left >= 1 - 1e-9:  # shares like 0.1 do not add up exactly
        return None
    fits = math.floor((cluster_cpus - 1) / actors * 100) / 100  # the largest share that leaves a CPU
    fix = "add CPUs to the cluster"
    if fits > 0:
        fix = f"set cpus_per_actor={fits:g} (--set cpus_per_actor={fits:g}), run fewer actors or {fix}"
    return (
        f"the job's {actors} actor(s) x cpus_per_actor={cpus_per_actor:g} take {actors * cpus_per_actor:g} "
        f"of the Ray cluster's {cluster_cpus:g} CPUs, leaving {max(left, 0):g}: reading images needs a "
        f"whole CPU, so the job would wait forever; {fix}"
    )


READ_ONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]+")  # how Ray reports each node of a `ray start` cluster


def autoscaler_can_add_nodes(status: dict) -> bool:
    """From Ray's autoscaler status (``ray status``'s source): whether an autoscaler with node
    types of its own runs. A cluster made with ``ray start`` reports each node as a read-only type
    named after it, and never grows."""
    report = status.get("autoscaler_report") or {}
    types = {*(report.get("active_nodes") or {}), *(report.get("idle_nodes") or {})}
    types |= {*(report.get("pending_launches") or {}), *(report.get("node_type_mapping") or {}).values()}
    return any(not READ_ONLY_NODE_TYPE.fullmatch(t) for t in types)


def cluster_can_grow(wait_s: float = 15.0) -> bool:
    """Whether the cluster Ray is connected to has an autoscaler that can add nodes. Its first
    report can take a few seconds after the cluster starts; with none by ``wait_s``, the cluster
    is taken to stay as it is."""
    import ray
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):  # v2 keeps no such report; it runs only to scale
        return True
    deadline = time.monotonic() + wait_s
    while True:
        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        status = json.loads(raw) if raw else {}
        if "autoscaler_report" in status or time.monotonic() >= deadline or not ray.is_initialized():
            return autoscaler_can_add_nodes(status)
        time.sleep(0.5)


def check_cpus(config: RunConfig, actors: int) -> None:
    """Refuse a job whose actors would take every CPU of a cluster that cannot grow: its reads
    would never start, and Ray Data would wait for them forever. An autoscaling cluster may add
    the CPUs: a warning then."""
    import ray

    problem = starved_reads(actors, config.cpus_per_actor, ray.cluster_resources().get("CPU", 0))
    if problem is None:
        return
    if cluster_can_grow():
        log.warning("%s (unless the autoscaler adds CPUs)", problem)
        return
    raise InputError(problem)


GPU_WAIT_LOG_EVERY_S = 30.0  # a log line this often while a job waits for the autoscaler's GPUs
GPU_POLL_S = 5.0


def check_gpus(
    config: RunConfig,
    actors: int | None = None,
    *,
    cluster_resources: Callable[[], dict] | None = None,
    can_grow: Callable[[], bool] = cluster_can_grow,
    request_gpus: Callable[[list[dict]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Make sure the cluster has GPUs for the job's ``actors`` (default: the larger pool).

    A cluster with fewer GPUs that an autoscaler can grow (a GPU group that scales from zero) is
    asked for them, one bundle per actor, and waited for up to ``actor_start_timeout_s``; the
    request is withdrawn when the wait ends, so that the GPU nodes go once the job is done. A job
    then refuses to start only when not even one actor's GPUs are there; on a cluster that cannot
    grow it refuses at once. With fewer GPUs than actors, some actors wait for others: a warning.
    The callables are Ray's unless given (tests give fakes)."""
    per_actor = config.gpus_per_actor
    if per_actor <= 0:
        return
    if actors is None:
        actors = max(config.tune_actors, config.edit_actors)
    needed = per_actor * actors
    if cluster_resources is None or request_gpus is None:
        import ray
        from ray.autoscaler.sdk import request_resources

        cluster_resources = cluster_resources or ray.cluster_resources
        request_gpus = request_gpus or (lambda bundles: request_resources(bundles=bundles))

    def gpus() -> float:
        return cluster_resources().get("GPU", 0)

    have = gpus()
    waited = None
    if have < needed and can_grow():
        timeout = config.actor_start_timeout_s
        log.info(
            "the cluster has %g of the %g GPUs the job's actors ask for: asking its autoscaler for "
            "them and waiting up to %g s (actor_start_timeout_s)",
            have,
            needed,
            timeout,
        )
        start = logged = clock()
        request_gpus([{"GPU": per_actor}] * actors)
        try:
            while (have := gpus()) < needed and (waited := clock() - start) < timeout:
                if clock() - logged >= GPU_WAIT_LOG_EVERY_S:
                    log.info("waiting for GPUs: %g of %g after %.0f s of %g", have, needed, waited, timeout)
                    logged = clock()
                sleep(min(GPU_POLL_S, timeout - waited))
        finally:
            request_gpus([])  # a standing request would keep the GPU nodes after the job
        waited = clock() - start
    if have < per_actor:
        after = "" if waited is None else f" after {waited:.0f} s of waiting for its autoscaler"
        raise InputError(
            f"the GPU stages ask for {per_actor} GPU per actor but the Ray cluster has {have:g} GPUs"
            f"{after}; add GPU workers or set gpus_per_actor=0 to run on CPUs"
        )
    if have < needed:
        log.warning("the cluster has %g GPUs for %g requested: some actors will wait", have, needed)


def actor_wait_s(config: RunConfig, pools: tuple[int, ...], have: dict[str, float]) -> float:
    """How long a job's actor pools (their sizes) wait for all their actors before taking work
    (Ray Data's ``wait_for_min_actors_s``) on a cluster of resources ``have``; -1: each actor takes
    work as it comes up.

    A pool of several actors waits, so that every actor gets some of a small job's blocks (the
    first actor up would otherwise take them all); but only when all the job's actors fit in the
    cluster at once with a CPU left for reads. When they don't (jobs.run with fewer GPUs than
    tune_actors + edit_actors), editing actors can only start as tuning ones finish, so waiting
    would deadlock: Ray then starts each actor as resources free up. Pools of one actor each never
    wait: Ray Data starts a job's pools one after another and waits for each, so the editing
    actor would load its model only once the tuning actor has loaded its own, and one actor has
    no blocks to share. Without the wait they load at once (a 6-row job of two one-actor pools on
    the test cluster, 2 cores: 12.7 s instead of 15.9 s; see docs/benchmarks.md, "Pipeline
    overhead")."""
    if max(pools, default=0) <= 1:  # a job of Ray tasks (jobs.dataset) has no pools
        return -1
    actors = sum(pools)
    gpus_fit = config.gpus_per_actor * actors <= have.get("GPU", 0)
    fit = gpus_fit and config.cpus_per_actor * actors < have.get("CPU", 0)
    return config.actor_start_timeout_s if fit else -1
