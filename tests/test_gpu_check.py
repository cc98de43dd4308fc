"""The GPU check (``benchmarks/gpu_check.sh``) runs end to end on the CPU in its tiny mode, as a GPU
session would run it, so it is known to work before a GPU is lent: its tables hold ALGORITHM.md's
counts, finite numerics and the pipeline's rate, and a part that runs over its budget is stopped."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
TINY = gpu_check.PROFILES["tiny"]
CUDA_ONLY = gpu_check.CUDA_PARTS


@pytest.fixture(scope="module")
def check(tmp_path_factory, ray_cluster) -> dict:
    """One tiny run through bash into a fresh folder. Its pipeline part joins the session's Ray
    cluster (``RAY_ADDRESS``, as a job submitted to a cluster does) instead of starting one."""
    import ray

    out = tmp_path_factory.mktemp("gpu-check")
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--tiny"],
        env={**os.environ, "PYTHON": sys.executable, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        capture_output=True,
        text=True,
        timeout=1800,  # about a minute on 2 idle cores; far more when they are shared
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {
        "out": out,
        "report": json.loads((out / "gpu_check.json").read_text()),
        "markdown": (out / "gpu_check.md").read_text(),
        "seconds": time.perf_counter() - started,
    }


def rows_of(check: dict, part: str) -> list[dict]:
    return check["report"]["rows"].get(part, [])


def engine_settings(part: str) -> dict:
    """T and K of a tiny part's ``benchmarks.engine`` command (``--set pti.steps=.. pti.inner_steps=..``)."""
    argv = TINY["parts"][part][1]
    return {
        a.split("=")[0][4:]: int(a.split("=")[1]) for a in argv if a.startswith(("pti.steps", "pti.inner"))
    }


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_every_part_runs_and_writes_what_a_device_call_brings_back(check):
    parts = check["report"]["parts"]
    ran = ("sweep", "check", "numerics", "sdxl", "sd3", "pipeline", "levers", "train")
    assert {name: parts[name]["status"] for name in ran} == dict.fromkeys(ran, "done")
    assert all(parts[p]["status"] == "skipped" and parts[p]["reason"] == "CUDA only" for p in CUDA_ONLY)
    headings = (
        "Stage 1 and stage 2 by dtype and batch",
        "Levers",
        "Numerics",
        "SDXL",
        "SD3.5",
        "Pipeline",
        "Training",
    )
    for heading in headings:
        assert f"\n## {heading}" in check["markdown"]
    files = sorted(p.name for p in check["out"].iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "rows", "sharp-sd"]
    brought = [p.relative_to(check["out"]).as_posix() for p in check["out"].rglob("*") if p.is_file()]
    assert all(re.fullmatch(r"[A-Za-z0-9._/-]+", name) for name in brought)  # what $OUT brings back
    assert all(f"python {' '.join(TINY['parts'][p][1])}" in check["markdown"] for p in ran if p != "train")


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_train_part_trains_the_sharp_model_and_brings_back_a_loadable_model(check):
    from pipeline.engine.models import load_stable_diffusion

    (row,) = rows_of(check, "train")
    assert row["vae_steps"] == row["unet_steps"] == 4 and row["unet_steps_per_s"] > 0
    sd = load_stable_diffusion(str(check["out"] / "sharp-sd"), device="cpu")
    assert len(sd.unet.config.down_block_types) == 3 and sd.resolution == 64
    assert not list(check["out"].glob("sharp-sd*/state.pt"))  # the checkpoints stay out of OUTDIR


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_sweep_counts_algorithm_md_evaluations_scaled_from_its_first_steps(check):
    T, K = engine_settings("sweep").values()
    rows = rows_of(check, "sweep")
    assert [(r["dtype"], r["batch"]) for r in rows] == [("float32", 1), ("float32", 2)]
    for row in rows:
        assert row["timed_steps"] == 2 < T
        assert row["stage1_evals_timed_per_image"] == 2 + 2 * (1 + K + 1)  # what ran
        assert row["stage1_evals_per_image"] == T + T * (1 + K + 1)  # scaled to the whole schedule
        assert row["stage2_evals_per_edit"] == 2 * T
        assert row["stage1_tflops"] > 0 and row["stage2_tflops"] > 0 and row["stage1_of_peak"].endswith("%")
        assert row["stage1_peak_mb"] > 0 and row["stage2_peak_mb"] > 0 and row["peak_tflops"] > 0


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_all_steps_check_runs_what_the_scaling_predicts(check):
    T, K = engine_settings("check").values()
    (full,) = rows_of(check, "check")
    assert full["timed_steps"] == T and full["batch"] == 1
    assert full["stage1_evals_timed_per_image"] == T + T * (1 + K + 1)
    assert re.search(r"Scaling check: all 4 steps at batch 1 \(float32\) took x[0-9.]+", check["markdown"])


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_shipped_model_in_float32_reconstructs_with_no_non_finite_value(check):
    row, *skipped = rows_of(check, "numerics")
    assert row["dtype"] == "float32" and row["scenes"] == 2
    assert row["nonfinite"] == 0 and row["values_checked"] > 10_000
    assert math.isfinite(row["reconstruction_psnr"]) and row["reconstruction_psnr"] > 15
    assert {r["dtype"] for r in skipped} == {"bfloat16", "float16"}
    assert all("needs CUDA" in r["skipped"] for r in skipped)


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_pipeline_part_times_jobs_run_against_the_engine_alone(check):
    rows = {r["what"]: r for r in rows_of(check, "pipeline")}
    assert set(rows) == {"engine alone", "jobs.run, per row at scale", "jobs.run end to end, 4 rows"}
    # Per row at scale is a difference of two jobs' times: on 2 and 4 rows it is noise, of any sign.
    assert rows["engine alone"]["rows_per_s"] > 0 and rows["jobs.run end to end, 4 rows"]["rows_per_s"] > 0


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_levers_run_against_the_baseline_of_the_same_run(check):
    rows = rows_of(check, "levers")
    assert [r["lever"] for r in rows] == ["baseline", "pti.control=auto", "channels_last"]
    assert rows[0]["against_baseline"] == "x1.00"
    assert all(r["stage1_evals_per_image"] == rows[0]["stage1_evals_per_image"] for r in rows)
    T = rows[0]["steps"]  # one edit per image: under control its source branch doubles stage 2
    assert [r["stage2_evals_per_edit"] for r in rows] == [2 * T, 4 * T, 2 * T]


def test_a_part_over_its_budget_is_stopped_with_every_process_it_started(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_PART_S", 2)
    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    child = "; ".join(
        [
            "import subprocess, sys, time",
            f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])",
            "time.sleep(60)",  # the grandchild has written its pid long before the budget's 5 s
        ]
    )
    started = time.perf_counter()
    status = gpu_check.run_part("sweep", ["-c", child], 5)
    assert status["status"] == "stopped" and "budget of 5 s" in status["reason"]
    assert time.perf_counter() - started < 20
    assert not running(int(pid_file.read_text()))
    assert gpu_check.run_part("sweep", ["-c", "pass"], 1)["status"] == "skipped"


def running(pid: int) -> bool:
    """Whether ``pid`` is alive (a killed process may stay a zombie until init reaps it)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
        except FileNotFoundError:
            return False
        if state in "ZX":
            return False
        time.sleep(0.1)
    return True


def test_graphed_unet_keeps_one_graph_per_shape_and_grad_mode(make_engine, pixels, monkeypatch):
    """The CUDA-graphs lever's plumbing on the CPU, the capture replaced by the eager function:
    one graph per input shape and grad mode, and the engine's results unchanged."""
    import torch

    from benchmarks.engine import GraphedUNet

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda forward, sample_args: forward)
    plain, graphed = (make_engine(steps=2, inner_steps=1, early_stop=False) for _ in range(2))
    graphed.eps.unet = GraphedUNet(graphed.eps.unet)
    images = pixels[:2]
    expected, got = (e.invert_and_tune(images, [None, None]) for e in (plain, graphed))
    torch.testing.assert_close(got.cond, expected.cond)
    edits = [
        e.edit(inv, [0, 1], ["a cat", "a dog"], [0.8, 0.8]) for e, inv in ((plain, expected), (graphed, got))
    ]
    torch.testing.assert_close(edits[1], edits[0])
    keys = graphed.eps.unet.graphs
    assert sorted((z[0], grad) for z, _, grad in keys) == [(2, False), (2, True), (4, False)]


@pytest.mark.slow  # the tiny run: make test-slow (README)
@pytest.mark.parametrize("part, model", [("sdxl", "tiny-sdxl"), ("sd3", "tiny-sd3")])
def test_the_model_parts_time_their_family_with_algorithm_md_counts(check, part, model):
    (row,) = rows_of(check, part)
    T, K = engine_settings(part).values()
    assert row["model"] == model and row["resolution"] == 64
    assert row["stage1_evals_per_image"] == T + T * (1 + K + 1) and row["stage2_evals_per_edit"] == 2 * T
    assert row["stage1_s_per_image"] > 0 and row["stage2_s_per_edit"] > 0
    assert {"sdxl": "\n## SDXL", "sd3": "\n## SD3.5"}[part] in check["markdown"]
