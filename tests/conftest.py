"""Shared fixtures: one tiny model per session, real photographs from scikit-image."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.faults import ENV as FAILPOINTS_ENV
from pipeline.engine.models import load_stable_diffusion
from pipeline.world.tiny import build_tiny_model, photographs

# Small and quick: the tiny model's 64x64 images, few steps. Its text embeddings are 32 wide
# (SD's are 768), so tuning uses a larger learning rate than ALGORITHM.md's default.
TEST_CONFIG = dict(steps=10, inner_steps=10, lr=0.1, progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_sd(tiny_model_dir):
    return load_stable_diffusion(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def make_engine(tiny_sd, tiny_model_dir):
    """An engine over the session's one loaded model, with config overrides."""

    def make(**overrides) -> Engine:
        return Engine(tiny_sd, PTIConfig(model=tiny_model_dir, **{**TEST_CONFIG, **overrides}))

    return make


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    """The three photographs as a ``[3, 3, 64, 64]`` batch in ``[0, 1]``."""
    return photographs(64)


@pytest.fixture(autouse=True)
def _quiet_loaders():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The fake S3 secret: distinctive, so a test can look for it in every output and log line.
SECRET = "pti-test-secret-Zq81vW3n"


@pytest.fixture(scope="session")
def s3_server() -> str:
    """The session's S3-compatible HTTP server on loopback (moto's, as s3fs's own tests use),
    with fake credentials in the environment; its endpoint URL."""
    from moto.server import ThreadedMotoServer

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", SECRET)):
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def failpoints(tmp_path_factory) -> Path:
    """The folder where tests arm failpoints (``pipeline.faults``) for the session's cluster."""
    return tmp_path_factory.mktemp("failpoints")


@pytest.fixture(scope="session")
def ray_cluster(failpoints):
    """The session's one Ray cluster: a real head node on 127.0.0.1 (``ray start --head``) with two
    fake GPUs, so the GPU actor path runs on the CPU and ``ray job submit`` has a cluster to talk
    to. Returns the dashboard's address. Fake S3 credentials are set first: Ray's processes
    inherit the environment when they start."""
    import ray

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[key] = value
    os.environ[FAILPOINTS_ENV] = str(failpoints)  # armed by tests: see pipeline.faults
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test cluster: no token to hand around
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="pti-ray-")  # short: Ray's socket paths must fit in 107 bytes
    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=6",
            "--num-gpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--metrics-export-port={METRICS_PORT}",
            '--system-config={"metrics_report_interval_ms": 1000}',  # metrics seen within seconds
        ],
        check=True,
        capture_output=True,
    )
    ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
    yield f"http://127.0.0.1:{dashboard}"
    ray.shutdown()
    stop_head_node(temp_dir)


METRICS_PORT = free_port()  # where the session cluster's metrics agent serves Prometheus text


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    """The session cluster's Prometheus endpoint (its metrics agent)."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


def stop_head_node(temp_dir: str) -> None:
    """End the processes of the head node started with ``temp_dir``, and their children (``ray
    stop`` would end every Ray on the machine, other people's too)."""
    import psutil

    def started_here(process: psutil.Process) -> bool:
        try:
            return any(temp_dir in part for part in process.cmdline())
        except psutil.Error:
            return False

    family = {}
    for head in (p for p in psutil.process_iter() if started_here(p)):
        try:
            family |= {p.pid: p for p in [head, *head.children(recursive=True)]}
        except psutil.Error:
            continue  # ended already
    for process in family.values():
        process.terminate()
    _, alive = psutil.wait_procs(list(family.values()), timeout=3)  # a test cluster: no need to linger
    for process in alive:
        process.kill()  # its temp folder stays: Ray Data's log threads may still write there at exit
