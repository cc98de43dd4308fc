"""The nightly job: only manifests no earlier run processed, a ledger row only after success, a
failed night resumed by its run id, and a report whose numbers match the outputs."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.batch import lock, nightly
from pipeline.errors import InputError
from pipeline.batch.nightly import NightFailed, run_nightly
from pipeline.batch.config import RunConfig
from pipeline.batch.curate import CurateConfig
from pipeline.world.tiny import build_tiny_clip

# device cpu: the test cluster's GPUs are fake (conftest), and a GPU actor refuses the CPU unasked
PTI = dict(steps=3, inner_steps=2, lr=0.1, etas=[0.5, 1.0], progress=False, device="cpu")


def write_manifest(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def photo_row(tmp_path, photos, name: str, target: str) -> dict:
    image = tmp_path / "images" / f"{name}.png"
    if not image.exists():
        image.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(photos[name]).resize((80, 80)).save(buffer, format="PNG")
        image.write_bytes(buffer.getvalue())
    return {"id": name, "image": str(image), "target_prompts": [target]}


def night(tmp_path, model: str, run_id: str, **nightly) -> RunConfig:
    return RunConfig(
        output=str(tmp_path / "out"),
        tune_actors=1,
        edit_actors=1,
        gpus_per_actor=1,
        tune_batch_size=2,
        edit_batch_size=2,
        max_failed_fraction=0.5,  # the first night's manifest has one bad row of two: still done
        pti=dict(model=model, **PTI),
        nightly=dict(manifests=str(tmp_path / "manifests"), run_id=run_id, **nightly),
    )


def report(tmp_path, run_id: str) -> dict:
    return json.loads((tmp_path / "out" / run_id / "report.json").read_text())


def ledger(tmp_path) -> list[dict]:
    return pq.read_table(tmp_path / "out" / "_ledger").sort_by("run_id").to_pylist()


def stage_actors() -> int:
    """How many stage actors (Ray Data's map workers) the session's cluster has ever started."""
    from ray.util.state import list_actors

    return sum("MapWorker" in a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False))


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_second_night_processes_only_the_manifest_added_since(
    ray_cluster, tiny_model_dir, photos, tmp_path
):
    manifests = tmp_path / "manifests"
    write_manifest(
        manifests / "a.parquet",
        [
            photo_row(tmp_path, photos, "astronaut", "a photo of a robot"),
            {"id": "lost", "image": str(tmp_path / "nowhere.png"), "target_prompts": ["a cat"]},
        ],
    )
    first = run_nightly(night(tmp_path, tiny_model_dir, "night-1", gpu_hour_price=2.0, sample_images=3))
    assert (
        first["manifests_done"],
        first["rows_in"],
        first["rows_done"],
        first["rows_failed"],
        first["edits"],
    ) == (1, 2, 1, 1, 2)
    assert first["error_kinds"] == {"not_found": 1}
    night_one = tmp_path / "out" / "night-1"
    results_before = files(night_one / "a" / "results")

    write_manifest(
        manifests / "2026-11-25" / "b.parquet", [photo_row(tmp_path, photos, "chelsea", "a photo of a tiger")]
    )
    # The second night scores its edits and writes each manifest's training set (nightly.dataset).
    scored = dict(scorer=str(build_tiny_clip(tmp_path / "clip")), curate=CurateConfig(*[None] * 5))
    second_night = night(tmp_path, tiny_model_dir, "night-2", gpu_hour_price=2.0, sample_images=3)
    second_night = dataclasses.replace(
        second_night, nightly=dataclasses.replace(second_night.nightly, dataset=True)
    )
    second = run_nightly(dataclasses.replace(second_night, **scored))
    written = report(tmp_path, "night-2")
    assert [m["manifest"] for m in written["manifests"]] == [str(manifests / "2026-11-25" / "b.parquet")]
    assert written["totals"]["manifests_skipped"] == 1 and second["manifests_done"] == 1
    assert (second["rows_in"], second["rows_done"], second["edits"], second["error_kinds"]) == (1, 1, 2, {})
    assert files(tmp_path / "out" / "night-2") == [
        "2026-11-25%2Fb",
        "config-nightly.yaml",
        "contact_sheet.png",
        "report.json",
        "report.md",
    ]
    assert files(night_one / "a" / "results") == results_before, "the first night's manifest is not run again"
    trained = pq.read_table(tmp_path / "out" / "night-2" / "2026-11-25%2Fb" / "dataset" / "data")
    assert trained.column("id").to_pylist() == ["chelsea"]  # the better of its two edits (etas)
    with pytest.raises(InputError, match="nightly.dataset .* set scorer"):
        nightly.resolve(second_night)
    assert pq.read_table(tmp_path / "out" / "night-2" / "2026-11-25%2Fb" / "results")["id"].to_pylist() == [
        "chelsea",
        "chelsea",
    ]
    assert [(r["manifest"].rsplit("/", 1)[-1], r["run_id"], r["edits"]) for r in ledger(tmp_path)] == [
        ("a.parquet", "night-1", 2),
        ("b.parquet", "night-2", 2),
    ]

    # The report's numbers: GPU hours are job seconds x the 2 GPUs held; the cost is those at the price.
    totals, (entry,) = written["totals"], written["manifests"]
    assert totals["gpu_hours"] == pytest.approx(entry["seconds"] * 2 / 3600, abs=1e-4)
    assert totals["cost_estimate"] == pytest.approx(totals["gpu_hours"] * 2.0, abs=0.01)
    assert 0 < totals["rows_per_second"] <= 1 / entry["seconds"] * 1.01
    # The contact sheet: one row (the one image), its input and its two edits, 64 px shown at 256
    # px, each over a 52 px band of captions (three 16 px lines and a margin).
    assert Image.open(tmp_path / "out" / "night-2" / "contact_sheet.png").size == (
        3 * 258 + 2,
        256 + 52 + 4,
    )
    markdown = (tmp_path / "out" / "night-2" / "report.md").read_text()
    assert (
        "# Nightly run night-2" in markdown and "1 done, 0 failed, 1 processed by earlier nights" in markdown
    )

    # A manifest another night is running now (it holds its claim) is left to that night.
    write_manifest(manifests / "c.parquet", [photo_row(tmp_path, photos, "coffee", "a cup of tea")])
    c = str(manifests / "c.parquet")
    with lock.acquire(nightly.claim_of(nightly.ledger(night(tmp_path, "-", "x")), c), "night-x", 60, c):
        third = run_nightly(night(tmp_path, tiny_model_dir, "night-3"))
    assert (third["manifests"], third["manifests_skipped"], third["rows_in"]) == (0, 2, 0)
    assert files(tmp_path / "out" / "night-3") == ["config-nightly.yaml", "report.json", "report.md"]
    assert len(ledger(tmp_path)) == 2
    assert report(tmp_path, "night-3")["totals"]["cost_estimate"] is None  # no price set


def test_a_failed_manifest_gets_no_ledger_row_and_a_rerun_of_its_night_resumes_it(
    ray_cluster, tiny_model_dir, photos, tmp_path, monkeypatch
):
    manifests = tmp_path / "manifests"
    write_manifest(manifests / "good.parquet", [photo_row(tmp_path, photos, "coffee", "a cup of tea")])
    write_manifest(manifests / "bad.parquet", [{"id": "x", "target_prompts": ["a cat"]}])  # no image column

    # The driver dies after the good manifest's run, before its ledger row: like a killed job.
    def killed(*args, **kwargs):
        raise SystemExit("killed")

    monkeypatch.setattr(nightly, "record", killed)
    with pytest.raises(SystemExit):
        run_nightly(night(tmp_path, tiny_model_dir, "night-1"))
    good = tmp_path / "out" / "night-1" / "good"
    made = {folder: files(good / folder) for folder in ("embeddings", "results")}
    assert not list((tmp_path / "out" / "_ledger").glob("*.parquet"))  # no ledger row (claims aside)
    monkeypatch.undo()

    # Run again under the same run id: the good manifest resumes on its output and adds nothing
    # (every row done: no actor starts); the bad one fails on its own, gets no ledger row, and the
    # night says so after its report.
    actors_before = stage_actors()
    assert actors_before >= 2  # the first attempt's tuning and editing actors, counted
    with pytest.raises(NightFailed, match=r"1 of 2 manifests failed .*bad\.parquet.*--run-id night-1"):
        run_nightly(night(tmp_path, tiny_model_dir, "night-1"))
    assert stage_actors() == actors_before
    assert {folder: files(good / folder) for folder in made} == made
    assert json.loads((good / "summary-run.json").read_text())["already_done"] == 1
    assert [(r["manifest"].rsplit("/", 1)[-1], r["rows_done"], r["edits"]) for r in ledger(tmp_path)] == [
        ("good.parquet", 1, 2)
    ]
    written = report(tmp_path, "night-1")
    assert {m["manifest"].rsplit("/", 1)[-1]: m["status"] for m in written["manifests"]} == {
        "bad.parquet": "failed",
        "good.parquet": "done",
    }
    assert "missing column 'image'" in next(
        m["error"] for m in written["manifests"] if m["status"] == "failed"
    )

    # A third attempt runs only the manifest still without a ledger row; the night's report keeps
    # the one an earlier attempt did, and counts no manifest as another night's.
    summary_before = (good / "summary-run.json").read_text()
    with pytest.raises(NightFailed, match="1 of 2 manifests failed"):
        run_nightly(night(tmp_path, tiny_model_dir, "night-1"))
    totals = report(tmp_path, "night-1")["totals"]
    assert (
        totals["manifests_done"],
        totals["manifests_failed"],
        totals["manifests_skipped"],
        totals["edits"],
    ) == (1, 1, 0, 2)
    assert (good / "summary-run.json").read_text() == summary_before, (
        "the good manifest is not run a third time"
    )


def test_nightly_refuses_outputs_under_the_manifests_prefix_and_bad_run_ids(tmp_path):
    with pytest.raises(InputError, match="lies under nightly.manifests"):
        run_nightly(
            RunConfig(output=str(tmp_path / "in" / "out"), nightly=dict(manifests=str(tmp_path / "in")))
        )
    with pytest.raises(InputError, match="no manifests prefix"):
        run_nightly(RunConfig(output=str(tmp_path / "out")))
    with pytest.raises(InputError, match="must be letters, digits"):
        RunConfig.load(overrides=["nightly.run_id=../2026-11-25"])
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")  # the default run id: the UTC date
    assert (
        nightly.resolve(
            RunConfig(output=str(tmp_path / "out"), nightly=dict(manifests=str(tmp_path / "in")))
        ).nightly.run_id
        == today
    )


def test_pti_nightly_is_jobs_nightly_with_its_own_flags():
    from typer.testing import CliRunner

    from jobs.cli import app

    shown = CliRunner().invoke(
        app, ["nightly", "--manifests", "s3://b/in/", "--run-id", "night-9", "--print-config"]
    )
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout)["nightly"] == {
        "manifests": "s3://b/in/",
        "run_id": "night-9",
        "ledger": None,
        "gpu_hour_price": None,
        "sample_images": 4,
        "dataset": False,
    }
    assert (
        CliRunner().invoke(app, ["run", "--manifests", "s3://b/in/", "--print-config"]).exit_code == 2
    )  # not a jobs.run flag
