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


def rows_of(check: dict, part: str, kind: str) -> list[dict]:
    return [r for r in check["report"]["rows"] if r["part"] == part and r.get("kind") == kind]


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_every_part_runs_and_writes_what_a_device_call_brings_back(check):
    parts = check["report"]["parts"]
    ran = ("sweep", "numerics", "sdxl", "sd3", "pipeline", "levers", "train")
    assert {name: parts[name]["status"] for name in ran} == dict.fromkeys(ran, "done")
    assert parts["cuda_graphs"] == parts["compile"] == {"status": "skipped", "reason": "CUDA only"}
    headings = (
        "Stage 1 and stage 2 by dtype and batch",
        "Levers",
        "Numerics",
        "SDXL",
        "SD3.5",
        "Pipeline",
        "Training",
    )
    for heading in (*headings, "Parts"):
        assert f"\n## {heading}" in check["markdown"]
    files = sorted(p.name for p in check["out"].iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "rows.jsonl", "sharp-sd"]
    brought = [p.relative_to(check["out"]).as_posix() for p in check["out"].rglob("*") if p.is_file()]
    assert all(re.fullmatch(r"[A-Za-z0-9._/-]+", name) for name in brought)  # what $OUT brings back


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_train_part_trains_the_sharp_model_and_brings_back_a_loadable_model(check):
    from pipeline.engine.models import load_stable_diffusion

    (row,) = rows_of(check, "train", "train")
    changes = TINY["train"]["changes"]
    assert row["done"] and row["vae_steps"] == f"{changes['vae_steps']}/{changes['vae_steps']}"
    assert (
        row["unet_steps"] == f"{changes['unet_steps']}/{changes['unet_steps']}"
        and row["unet_steps_per_s"] > 0
    )
    sd = load_stable_diffusion(str(check["out"] / "sharp-sd"), device="cpu")
    assert len(sd.unet.config.down_block_types) == 3 and sd.resolution == changes["resolution"]
    assert not list(check["out"].glob("sharp-sd*/state.pt"))  # the checkpoints stay out of OUTDIR
    assert check["report"]["device"]["peak_tflops"] > 0


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_sweep_counts_algorithm_md_evaluations_scaled_from_its_first_steps(check):
    sweep = TINY["sweep"]
    T, K, n = sweep["steps"], sweep["inner_steps"], sweep["timed_steps"]
    table = check["report"]["tables"]["sweep"]["rows"]
    assert [(r["dtype"], r["batch"]) for r in table] == [("float32", b) for b in sweep["batches"]]
    for row in table:
        assert row["timed_steps"] == n < T
        assert row["stage1_evals_timed_per_image"] == n + n * (1 + K + 1)  # what ran
        assert row["stage1_evals_per_image"] == T + T * (1 + K + 1)  # scaled to the whole schedule
        assert row["stage2_evals_per_edit"] == 2 * T
        assert row["stage1_tflops"] > 0 and row["stage2_tflops"] > 0 and row["stage1_of_peak"].endswith("%")
        assert row["stage1_peak_mb"] > 0 and row["stage2_peak_mb"] > 0


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_all_steps_check_runs_what_the_scaling_predicts(check):
    sweep = TINY["sweep"]
    T, K = sweep["steps"], sweep["inner_steps"]
    result = check["report"]["tables"]["sweep"]["check"]
    full = result["full"]
    assert full["timed_steps"] == T and full["batch"] == sweep["check_batch"]
    assert full["stage1_evals_timed_per_image"] == T + T * (1 + K + 1)
    assert math.isfinite(result["stage1_ratio"]) and result["stage1_ratio"] > 0
    assert "Scaling check: all 4 steps" in check["markdown"]


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_engine_parts_load_neither_ray_nor_s3fs(check):
    (imports,) = rows_of(check, "sweep", "imports")
    assert imports["ray_or_s3fs"] == []


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_shipped_model_in_float32_reconstructs_with_no_non_finite_value(check):
    (row,) = check["report"]["tables"]["numerics"]["rows"]
    assert row["dtype"] == "float32" and row["scenes"] == TINY["numerics"]["scenes"]
    assert row["nonfinite"] == 0 and row["values_checked"] > 10_000
    assert math.isfinite(row["reconstruction_psnr"]) and row["reconstruction_psnr"] > 15
    skipped = {r["dtype"]: r["reason"] for r in rows_of(check, "numerics", "skipped")}
    assert set(skipped) == {"bfloat16", "float16"} and all("needs CUDA" in r for r in skipped.values())


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_the_pipeline_part_times_jobs_run_against_the_engine_alone(check):
    rows = {r["what"]: r for r in check["report"]["tables"]["pipeline"]["table"]}
    rows_in = TINY["pipeline"]["sizes"][-1]
    assert set(rows) == {"engine alone", f"jobs.run end to end, {rows_in} rows"}
    assert all(r["rows_per_s"] > 0 for r in rows.values())


@pytest.mark.slow  # the tiny run: make test-slow (README)
def test_levers_run_against_the_baseline_of_the_same_run(check):
    table = check["report"]["tables"]["levers"]["rows"]
    assert [r["lever"] for r in table] == ["baseline", "channels_last"]
    assert table[0]["stage1_vs_baseline"] == "x1.00"
    assert all(r["stage1_evals_per_image"] == table[0]["stage1_evals_per_image"] for r in table)


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
    status = gpu_check.run_part("sweep", TINY, tmp_path / "rows.jsonl", 5, ["-c", child])
    assert status["status"] == "stopped" and "budget of 5 s" in status["reason"]
    assert time.perf_counter() - started < 20
    assert not running(int(pid_file.read_text()))
    assert gpu_check.run_part("sweep", TINY, tmp_path / "rows.jsonl", 1)["status"] == "skipped"


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
    (row,) = rows_of(check, part, "case")
    T, K = TINY["sweep"]["steps"], TINY["sweep"]["inner_steps"]
    assert row["model"] == model and row["resolution"] == 64
    assert row["stage1_evals_per_image"] == T + T * (1 + K + 1) and row["stage2_evals_per_edit"] == 2 * T
    assert row["stage1_s_per_image"] > 0 and row["stage2_s_per_edit"] > 0
    assert {"sdxl": "\n## SDXL", "sd3": "\n## SD3.5"}[part] in check["markdown"]
