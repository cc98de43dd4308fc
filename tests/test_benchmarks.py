"""The engine benchmark counts what the engine does, as ALGORITHM.md states it (its timings are
recorded in docs/benchmarks.md, never asserted)."""

from __future__ import annotations

import pytest

from benchmarks.engine import run_case

T, K = 3, 2


def case(model: str, lever: str) -> dict:
    return run_case(
        dict(
            model=model,
            lever=lever,
            steps=T,
            inner_steps=K,
            lr=0.1,
            edits=2,
            batch=2,
            device="cpu",
            dtype="auto",
            no_early_stop=True,
            flops=True,
        )
    )


@pytest.fixture(scope="module")
def baseline(tiny_model_dir) -> dict:
    return case(tiny_model_dir, "baseline")


def test_engine_benchmark_counts_the_unet_evaluations_of_algorithm_md(baseline):
    assert baseline["stage1_evals_per_image"] == T + T * (1 + K + 1)
    assert baseline["inner_steps_taken"] == T * K
    assert baseline["stage2_calls"] == T and baseline["stage2_evals_per_edit"] == 2 * T
    assert (
        baseline["invert_tflop_per_image"] > 0
        and baseline["tune_tflop_per_image"] > 2 * baseline["invert_tflop_per_image"]
    )


def test_each_lever_changes_what_it_names(tiny_model_dir, baseline):
    recomputed = case(tiny_model_dir, "fixed_branch_every_step")
    assert recomputed["stage1_evals_per_image"] == baseline["stage1_evals_per_image"] + T * K
    split = case(tiny_model_dir, "split_edit_branches")
    assert split["stage2_calls"] == 2 * T and split["stage2_evals_per_edit"] == 2 * T
    assert split["stage1_evals_per_image"] == baseline["stage1_evals_per_image"]


def test_cpu_attention_flops_are_counted_as_the_math_path_counts_them(tiny_model_dir, baseline):
    """torch counts no FLOPs for the CPU's fused attention kernel unless the benchmark registers
    them; the unfused path's matmuls are counted by torch itself. Forward, the two are the same
    work; backward, the fused kernel recomputes the attention scores, so it counts more."""
    math = case(tiny_model_dir, "math_attention")
    assert baseline["invert_tflop_per_image"] == pytest.approx(math["invert_tflop_per_image"], rel=1e-9)
    assert (
        math["tune_tflop_per_image"] < baseline["tune_tflop_per_image"] < 1.05 * math["tune_tflop_per_image"]
    )
