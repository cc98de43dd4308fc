"""Crashed workers, a killed job and re-runs lose nothing and duplicate nothing (issue 5).

Faults are real: a failpoint (``pipeline.faults``) makes a Ray worker or the driver kill itself
with SIGKILL at a named point, and the outputs are compared with an undisturbed run's.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.batch.jobs import run_all
from pipeline.errors import InputError, TooManyFailures
from pipeline.batch.config import RunConfig

# device cpu: the test cluster's GPUs are fake (conftest), and a GPU actor refuses the CPU unasked
PTI = dict(steps=3, inner_steps=2, lr=0.1, etas=[0.5, 1.0], progress=False, device="cpu")
PHOTOS = ("astronaut", "chelsea", "coffee")
GOOD = 6  # rows that edit; 2 targets x 2 etas each
BAD = 1


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, photos) -> str:
    folder = tmp_path_factory.mktemp("reliability")
    rows = []
    for i in range(GOOD):
        buffer = io.BytesIO()
        Image.fromarray(photos[PHOTOS[i % 3]]).resize((80, 80)).save(buffer, format="PNG")
        (folder / f"{i}.png").write_bytes(buffer.getvalue())
        rows.append(
            {
                "id": f"row-{i}",
                "image": str(folder / f"{i}.png"),
                "target_prompts": ["a photo of a cat", "a painting of a dog"],
            }
        )
    rows.append({"id": "broken", "image": str(folder / "missing.png"), "target_prompts": ["a cat"]})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


def config(manifest, model, output, **overrides) -> RunConfig:
    return RunConfig(
        manifest=manifest,
        output=str(output),
        tune_actors=1,
        edit_actors=1,
        gpus_per_actor=1,
        tune_batch_size=1,
        edit_batch_size=1,
        max_edits_per_call=2,
        results_rows_per_file=2,
        max_failed_fraction=0.2,  # the one broken row of seven
        pti=dict(model=model, **PTI),
        **overrides,
    )


def outputs(output) -> dict:
    """Everything a run leaves, keyed so two runs compare: one entry per result row, embedding
    row and error row; duplicates fail here."""
    results = pq.read_table(output / "results").to_pylist()
    keys = [(r["id"], r["target_index"], r["target_prompt"], round(r["eta"], 3)) for r in results]
    assert len(keys) == len(set(keys)), "a result row is written twice"
    images = {k: np.asarray(Image.open(r["image_uri"])).astype(int) for k, r in zip(keys, results)}
    embedded = pq.read_table(output / "embeddings", columns=["id"]).column("id").to_pylist()
    assert len(embedded) == len(set(embedded)), "an image is tuned twice"
    errors = pq.read_table(output / "errors").to_pylist()
    return {
        "images": images,
        "embedded": sorted(embedded),
        "errors": sorted((e["id"], e["kind"]) for e in errors),
    }


def assert_same(got: dict, want: dict) -> None:
    assert got["embedded"] == want["embedded"] and got["errors"] == want["errors"]
    assert sorted(got["images"]) == sorted(want["images"])
    for key, image in want["images"].items():
        assert np.abs(got["images"][key] - image).max() <= 1, key  # the same edit, up to rounding


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, manifest, tiny_model_dir, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("undisturbed")
    summary = run_all(config(manifest, tiny_model_dir, output))
    assert (summary["rows_done"], summary["rows_failed"], summary["edits"]) == (GOOD, BAD, GOOD * 4)
    return outputs(output)


def arm(failpoints, name: str):
    for earlier in failpoints.glob(f"{name}.fired-*"):  # another test's firing: not this one's
        earlier.unlink()
    (failpoints / name).touch()
    return lambda: sorted(p.name for p in failpoints.glob(f"{name}.fired-*"))


def test_workers_killed_mid_batch_in_every_stage_are_retried_and_nothing_is_lost(
    undisturbed, manifest, tiny_model_dir, failpoints, tmp_path
):
    fired = [arm(failpoints, point) for point in ("read", "tune", "edit")]  # one worker of each dies
    summary = run_all(config(manifest, tiny_model_dir, tmp_path))
    assert [len(f()) for f in fired] == [1, 1, 1], "a worker of each stage was killed"
    assert (summary["rows_done"], summary["rows_failed"], summary["edits"]) == (GOOD, BAD, GOOD * 4)
    assert_same(outputs(tmp_path), undisturbed)


def test_a_killed_job_run_again_ends_as_an_undisturbed_run_and_redoes_nothing(
    undisturbed, manifest, tiny_model_dir, failpoints, tmp_path
):
    import ray

    # A first run of two of the rows (one broken) leaves an errors table.
    first = tmp_path / "first.parquet"
    pq.write_table(pq.read_table(manifest).take([0, GOOD]), first)
    with pytest.raises(TooManyFailures) as too_many:  # 1 of 2 rows: over 0.2, after writing everything
        run_all(config(str(first), tiny_model_dir, tmp_path / "out"))
    assert too_many.value.summary["rows_failed"] == 1
    errors_before = sorted(p.name for p in (tmp_path / "out" / "errors").iterdir())

    job = tmp_path / "job.yaml"
    job.write_text(config(manifest, tiny_model_dir, tmp_path / "out").to_yaml())
    fired = arm(failpoints, "driver-after-results")  # the driver dies right after its first results file
    env = {**__import__("os").environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    killed = subprocess.run(
        [sys.executable, "-m", "jobs.run", "--config", str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9 and len(fired()) == 1, killed.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "summary-run.json").read_text())["rows_in"] == 2  # the first run's

    # What the killed run committed (whole files: a partial one would not read back).
    out = tmp_path / "out"
    tuned_before = set(pq.read_table(out / "embeddings", columns=["id"]).column("id").to_pylist())
    edits_before = pq.read_table(out / "results").num_rows
    assert 2 <= len(tuned_before) and 4 + 2 <= edits_before < GOOD * 4  # mid-way: past the first run's
    # A run that ends early leaves the earlier errors table, not its own half of one.
    assert sorted(p.name for p in (out / "errors").iterdir()) == errors_before
    assert pq.read_table(out / "errors")["id"].to_pylist() == ["broken"]

    summary = run_all(RunConfig.load(job))
    assert_same(outputs(out), undisturbed)
    assert summary["edits"] == GOOD * 4 - edits_before  # no edit made twice
    tuned_now = summary["rows_done"] - summary["already_done"] - summary["resumed"]
    assert tuned_now == GOOD - len(tuned_before)  # no image tuned twice
    assert 1 <= summary["resumed"] and summary["already_done"] + summary["resumed"] <= len(tuned_before)
    assert (summary["rows_done"], summary["rows_failed"]) == (GOOD, BAD)
    assert json.loads((out / "summary-run.json").read_text())["edits"] == summary["edits"]

    # A run once more on a finished output (nothing to do, nothing written twice) is
    # tests/test_operator_runs.py's "again", and test_nightly's resumed manifest.

    # Other settings on the same output are refused before any work.
    with pytest.raises(InputError, match=r"pti.steps was 3, now 4.*new output"):
        run_all(RunConfig.load(job, ["pti.steps=4"]))


def test_out_of_memory_splits_the_batch_before_a_row_fails(ray_cluster, tiny_model_dir, photos):
    import torch

    from pipeline.batch.manifests import prepare_rows
    from pipeline.batch.stages import TuneStage
    from pipeline.io.storage import Location
    from pipeline.engine.config import PTIConfig

    table = pa.table(
        {"id": list(PHOTOS), "image": [_png(photos[p]) for p in PHOTOS], "target_prompts": [["a cat"]] * 3}
    )
    prepared = prepare_rows(
        table,
        resolution=64,
        duplicates=set(),
        endpoint_url=None,
        allowed=(),
        max_bytes=2**24,
        max_pixels=10**7,
        etas=PTI["etas"],
    )
    stage = TuneStage(PTIConfig(model=tiny_model_dir, **PTI), Location(tiny_model_dir))
    real, calls = stage.engine.invert_and_tune, []

    def device_that_holds(n):
        def invert_and_tune(pixels, sources):
            calls.append(len(pixels))
            if len(pixels) > n:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(pixels, sources)

        return invert_and_tune

    stage.engine.invert_and_tune = device_that_holds(1)
    out = stage(prepared)
    assert calls == [3, 1, 2, 1, 1]  # halves, then single images
    assert out["kind"].null_count == 3 and sorted(out["id"].to_pylist()) == sorted(PHOTOS)
    stage.engine.invert_and_tune = real
    for k, name in enumerate(out["id"].to_pylist()):  # each equals the image tuned on its own
        single = stage(prepared.filter(pa.compute.equal(prepared["id"], name)))
        np.testing.assert_array_equal(
            single["prompt_embeddings"].combine_chunks().to_numpy_ndarray()[0],
            out["prompt_embeddings"].combine_chunks().to_numpy_ndarray()[k],
        )

    calls.clear()
    stage.engine.invert_and_tune = device_that_holds(0)  # not even one image fits: the rows fail, named
    out = stage(prepared)
    assert calls == [3, 1, 2, 1, 1] and out["kind"].to_pylist() == ["out_of_memory"] * 3
    assert all("out of memory" in m for m in out["message"].to_pylist())


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).resize((80, 80)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_model_whose_files_changed_is_refused_on_an_output_it_did_not_make(ray_cluster, manifest, tmp_path):
    import time

    from pipeline.world.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", seed=0)
    first = run_all(config(manifest, str(model), tmp_path / "out"))
    assert first["rows_done"] == GOOD
    build_tiny_model(model, seed=1)  # same place, other weights
    started = time.monotonic()
    with pytest.raises(Exception, match="is not the one that made the stored embeddings"):
        run_all(config(manifest, str(model), tmp_path / "out"))
    assert time.monotonic() - started < 120  # fails, does not wait
    assert pq.read_table(tmp_path / "out" / "results").num_rows == GOOD * 4  # nothing added
