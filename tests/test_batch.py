"""The batch pipeline on Ray: end to end on local files and on a real S3-compatible server."""

from __future__ import annotations

import io
import logging
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.batch.jobs import run_all, run_edit
from pipeline.batch.output import image_key
from pipeline.batch import lock
from pipeline.batch.config import RunConfig

# device cpu: the test cluster's GPUs are fake (conftest), and a GPU actor refuses the CPU unasked
PTI = dict(steps=3, inner_steps=2, lr=0.1, etas=[0.5, 1.0], progress=False, device="cpu")
BAD_ROWS_ALLOWED = 0.5  # max_failed_fraction: 5 of the manifest's 11 rows are bad on purpose


def png(array: np.ndarray, size: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def manifest_rows(photos, image_ref) -> list[dict]:
    """Two good rows and every kind of bad row."""
    return [
        {
            "id": "astronaut",
            "image": image_ref("astronaut.png", png(photos["astronaut"])),
            "source_prompt": "a photo of an astronaut",
            "target_prompts": ["a photo of a robot", "a painting of an astronaut"],
        },
        {
            "id": "cat/../chelsea",
            "image": image_ref("chelsea.png", png(photos["chelsea"])),
            "source_prompt": None,
            "target_prompts": ["a photo of a tiger"],
            "eta": [0.8],
        },
        {
            "id": "missing",
            "image": image_ref("nowhere.png", None),
            "source_prompt": None,
            "target_prompts": ["a cat"],
        },
        {
            "id": "corrupt",
            "image": image_ref("corrupt.png", b"\x89PNG not really"),
            "source_prompt": None,
            "target_prompts": ["a cat"],
        },
        {
            "id": "no-targets",
            "image": image_ref("chelsea.png", None),
            "source_prompt": None,
            "target_prompts": [],
        },
        {
            "id": "twin",
            "image": image_ref("chelsea.png", None),
            "source_prompt": None,
            "target_prompts": ["a cat"],
        },
        {
            "id": "twin",
            "image": image_ref("chelsea.png", None),
            "source_prompt": None,
            "target_prompts": ["a dog"],
        },
    ] + [
        {
            "id": f"copy-{i}",
            "image": image_ref("chelsea.png", None),
            "source_prompt": None,
            "target_prompts": ["a dog"],
            "eta": [1.0],
        }
        for i in range(4)
    ]


MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("source_prompt", pa.string()),
        ("target_prompts", pa.list_(pa.string())),
        ("eta", pa.list_(pa.float64())),
    ]
)


def local_manifest(tmp_path, photos) -> str:
    def ref(name, data):
        if data is not None:
            (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    folder = tmp_path / "manifest"
    folder.mkdir()
    rows = manifest_rows(photos, ref)
    pq.write_table(pa.Table.from_pylist(rows[:6], schema=MANIFEST_SCHEMA), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:], schema=MANIFEST_SCHEMA), folder / "b.parquet")
    return str(folder)


def check_outputs(summary, read_table, read_bytes, config: RunConfig):
    results = read_table("results")
    errors = read_table("errors")
    expected = {
        ("astronaut", 0, 0.5),
        ("astronaut", 0, 1.0),
        ("astronaut", 1, 0.5),
        ("astronaut", 1, 1.0),
        ("cat/../chelsea", 0, 0.8),
        *((f"copy-{i}", 0, 1.0) for i in range(4)),
    }
    got = list(
        zip(
            results["id"].to_pylist(),
            results["target_index"].to_pylist(),
            [round(e, 3) for e in results["eta"].to_pylist()],
        )
    )
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    for row in results.to_pylist():
        assert row["image_uri"].endswith(image_key(row["id"], row["target_index"], row["eta"]))
        image = Image.open(io.BytesIO(read_bytes(row["image_uri"])))
        assert image.size == (64, 64) and image.mode == "RGB"
    assert (
        "%2F..%2Fchelsea"
        in results.filter(pa.compute.equal(results["id"], "cat/../chelsea"))["image_uri"][0].as_py()
    )
    kinds = dict(zip(errors["id"].to_pylist(), errors["kind"].to_pylist()))
    assert kinds == {
        "missing": "not_found",
        "corrupt": "bad_image",
        "no-targets": "no_targets",
        "twin": "duplicate_id",
    }
    assert errors.num_rows == 5  # both copies of the duplicated id
    assert "not found" in errors.filter(pa.compute.equal(errors["id"], "missing"))["message"][0].as_py()
    assert (
        summary["rows_in"] == 11
        and summary["rows_done"] == 6
        and summary["rows_failed"] == 5
        and summary["edits"] == 9
    )

    embeddings = read_table("embeddings")
    assert sorted(embeddings["id"].to_pylist()) == [
        "astronaut",
        "cat/../chelsea",
        *(f"copy-{i}" for i in range(4)),
    ]
    stack = embeddings["prompt_embeddings"].combine_chunks().to_numpy_ndarray()
    assert stack.shape == (6, 3, 77, 32) and stack.dtype == np.float16
    assert embeddings["z_T"].combine_chunks().to_numpy_ndarray().shape == (6, 4, 8, 8)
    assert len(set(results["config_fingerprint"].to_pylist())) == 1
    return results


def scrape(url: str) -> dict[tuple, float]:
    """The pti metrics the cluster exports: (name, job or stage) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (sample.name, sample.labels.get("job") or sample.labels.get("stage")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ray_pti_") and sample.name.endswith("_total")
    }


def settled(url: str) -> dict[tuple, float]:
    """The metrics once two scrapes two seconds apart agree (each process reports every second)."""
    last, deadline = scrape(url), time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(2)
        now = scrape(url)
        if now == last:
            break
        last = now
    return last


def test_run_on_local_files_with_two_gpu_actors_per_stage(
    ray_cluster, tiny_model_dir, photos, tmp_path, caplog, metrics_url
):
    caplog.set_level(logging.INFO, logger="pipeline.batch.metrics")
    before = settled(metrics_url)  # an earlier test's job may still be reporting
    config = RunConfig(
        manifest=local_manifest(tmp_path, photos),
        output=str(tmp_path / "out"),
        tune_actors=2,
        edit_actors=2,
        gpus_per_actor=1,
        tune_batch_size=1,
        edit_batch_size=1,
        max_failed_fraction=BAD_ROWS_ALLOWED,
        progress_every_s=0,  # a progress line per batch
        pti=dict(model=tiny_model_dir, **PTI),
    )
    summary = run_all(config)
    progress = [r.getMessage() for r in caplog.records if r.name == "pipeline.batch.metrics"]
    assert len(progress) >= 3 and progress[-1].startswith("run: 6/11 rows done, 5 failed, 9 edits, ")
    assert progress[-1].endswith("ETA 0 s")

    # The same counts reach the cluster's Prometheus endpoint; the stages report GPU seconds (a
    # series per live actor process: an ended actor's series may leave, so only their presence).
    want = {("ray_pti_rows_done_total", "run"): 6, ("ray_pti_rows_failed_total", "run"): 5}
    want[("ray_pti_edits_total", "run")] = 9
    gpu_seconds = [("ray_pti_gpu_seconds_total", stage) for stage in ("tune", "edit")]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # each process reports every second (conftest)
        after = scrape(metrics_url)
        grown = {key: after.get(key, 0) - before.get(key, 0) for key in want}
        grown |= {key: after.get(key, 0) for key in gpu_seconds}
        if all(grown[k] == v for k, v in want.items()) and all(grown[k] > 0 for k in gpu_seconds):
            break
        time.sleep(1)
    assert {k: grown[k] for k in want} == want and all(grown[k] > 0 for k in gpu_seconds), grown
    read_table = lambda name: pq.read_table(str(tmp_path / "out" / name))  # noqa: E731
    results = check_outputs(summary, read_table, lambda uri: open(uri, "rb").read(), config)
    assert len(set(results["tune_worker"].to_pylist())) == 2, "each tuning actor gets work"
    written = json.loads((tmp_path / "out" / "summary-run.json").read_text())
    assert written["edits"] == 9
    assert RunConfig.load(tmp_path / "out" / "config-run.yaml") == config

    # New targets reuse the stored tunings; a target already edited gives the same image.
    targets = tmp_path / "targets.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "id": "astronaut",
                    "target_prompts": ["a photo of a robot", "a photo of a horse"],
                    "eta": [1.0],
                },
                *(
                    {"id": f"copy-{i}", "target_prompts": ["a photo of a lion"], "eta": [0.7]}
                    for i in range(4)
                ),
                {"id": "unknown", "target_prompts": ["a cat"], "eta": None},
            ]
        ),
        targets,
    )
    again = RunConfig.load(
        overrides=[
            f"output={tmp_path / 'edit'}",
            f"embeddings={tmp_path / 'out' / 'embeddings'}",
            f"targets={targets}",
            "gpus_per_actor=1",
            f"pti.model={tiny_model_dir}",
            "edit_actors=2",
            "edit_batch_size=1",
            f"max_failed_fraction={BAD_ROWS_ALLOWED}",  # 1 of 6 targets rows has no embeddings
            *(f"pti.{k}={json.dumps(v)}" for k, v in PTI.items()),
        ]
    )
    edit_summary = run_edit(again)
    assert edit_summary["edits"] == 6 and edit_summary["rows_failed"] == 1
    # Stored embeddings are all there at once: every editing actor gets work.
    assert len(set(pq.read_table(tmp_path / "edit" / "results")["edit_worker"].to_pylist())) == 2
    first = np.asarray(Image.open(tmp_path / "out" / image_key("astronaut", 0, 1.0))).astype(int)
    second = np.asarray(Image.open(tmp_path / "edit" / image_key("astronaut", 0, 1.0))).astype(int)
    assert np.abs(first - second).max() <= 1
    assert not np.array_equal(
        second, np.asarray(Image.open(tmp_path / "edit" / image_key("astronaut", 1, 1.0)))
    )
    assert pq.read_table(tmp_path / "edit" / "errors")["kind"].to_pylist() == ["no_embeddings"]

    # jobs.run's contact sheet: the first min(4, 6 rows done) ids, each its input and edits (at most
    # astronaut's 4), at 256 px over a 52 px caption band; the summary names it. jobs.edit makes none.
    sheet = tmp_path / "out" / "contact_sheet.png"
    assert summary["contact_sheet"] == written["contact_sheet"] == str(sheet)
    assert Image.open(sheet).size == (5 * 258 + 2, min(4, summary["rows_done"]) * (256 + 52 + 2) + 2)
    assert "contact_sheet" not in edit_summary and not (tmp_path / "edit" / "contact_sheet.png").exists()


def test_read_stage_decodes_inline_image_bytes_and_reports_bad_ones(photos):
    from pipeline.batch.manifests import prepare_rows
    from schemas.stages import PIXELS

    table = pa.table(
        {
            "id": ["inline", "garbage"],
            "image": [png(photos["coffee"]), b"\x00\x01"],
            "target_prompts": [["a cup of tea"], ["a cat"]],
        }
    )
    out = prepare_rows(
        table,
        resolution=64,
        duplicates=set(),
        endpoint_url=None,
        allowed=("/",),
        max_bytes=2**20,
        max_pixels=10**6,
        etas=PTI["etas"],
    ).to_pylist()
    assert len(out[0][PIXELS]) == 64 * 64 * 3 and out[0]["kind"] is None
    assert out[1]["kind"] == "bad_image" and "garbage" in out[1]["message"] and out[1][PIXELS] is None


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible HTTP server on loopback (moto's, as s3fs's own tests use)."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_run_against_s3_reads_and_writes_the_bucket(
    ray_cluster, s3_endpoint, tiny_model_dir, photos, tmp_path, monkeypatch, capfd, caplog
):
    import boto3
    import s3fs

    monkeypatch.setenv("PTI_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="data")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(tiny_model_dir, "data/models/tiny", recursive=True)  # the model comes from the bucket too

    def ref(name, data):
        if data is not None:
            client.put_object(Bucket="data", Key=f"images/{name}", Body=data)
        return f"s3://data/images/{name}"

    arrow_s3 = pafs.S3FileSystem(
        endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http", region="us-east-1"
    )
    rows = manifest_rows(photos, ref)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
        "data/manifests/night-1.parquet",
        filesystem=arrow_s3,
    )

    config = RunConfig(
        manifest="s3://data/manifests/",
        output="s3://data/out",
        endpoint_url=s3_endpoint,
        tune_actors=1,
        edit_actors=1,
        gpus_per_actor=1,
        tune_batch_size=2,
        edit_batch_size=2,
        max_failed_fraction=BAD_ROWS_ALLOWED,
        pti=dict(model="s3://data/models/tiny", **PTI),
    )
    summary = run_all(config)

    def read_table(name):  # plain pyarrow, no Ray, no project code
        return pq.read_table(f"data/out/{name}", filesystem=arrow_s3)

    check_outputs(summary, read_table, lambda uri: fs.cat_file(uri), config)
    assert fs.exists("data/out/config-run.yaml") and fs.exists("data/out/summary-run.json")
    # The secret the job ran with appears in no output, no log line and no Ray log file.
    import ray
    from conftest import SECRET

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET
    written = fs.find("data/out")
    assert len(written) > 10 and all(SECRET.encode() not in fs.cat_file(key) for key in written)
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # the head node's logs
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs and all(SECRET.encode() not in p.read_bytes() for p in logs)


def wait_for_job_agent(timeout_s: float = 120.0) -> None:
    """Wait until the head node's job agent has registered: the dashboard hands every submitted job
    to it and answers "No available agent to submit job" when it has not within 10 s (the agent
    starts after the dashboard, late on a loaded machine). The same look-up as the dashboard's."""
    import time

    from ray._private.ray_constants import KV_HEAD_NODE_ID_KEY, KV_NAMESPACE_DASHBOARD, KV_NAMESPACE_JOB
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + timeout_s
    while True:
        head = _internal_kv_get(KV_HEAD_NODE_ID_KEY, namespace=KV_NAMESPACE_JOB)
        key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head.decode()}" if head else None
        agent = key and _internal_kv_get(key, namespace=KV_NAMESPACE_DASHBOARD)
        if agent and json.loads(agent)[1] > 0:  # (ip, http_port, grpc_port); -1: no HTTP server
            return
        assert time.monotonic() < deadline, f"the head node's job agent did not register in {timeout_s:g} s"
        time.sleep(0.5)


def test_ray_job_submit_runs_the_job_on_a_head_node(ray_cluster, tiny_model_dir, photos, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "run.yaml"
    config.write_text(
        RunConfig(
            manifest=local_manifest(tmp_path, photos),
            output=str(tmp_path / "out"),
            gpus_per_actor=1,
            max_failed_fraction=BAD_ROWS_ALLOWED,
            pti=dict(model=tiny_model_dir, **PTI),
        ).to_yaml()
    )
    repo = Path(__file__).resolve().parents[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    wait_for_job_agent()
    job = subprocess.run(
        [
            ray_bin,
            "job",
            "submit",
            "--address",
            ray_cluster,
            "--working-dir",
            str(repo),
            "--",
            sys.executable,
            "-m",
            "jobs.run",
            "--config",
            str(config),
            "--set",
            "edit_batch_size=3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    summary = json.loads((tmp_path / "out" / "summary-run.json").read_text())
    assert summary["edits"] == 9 and summary["rows_failed"] == 5
    assert pq.read_table(tmp_path / "out" / "results").num_rows == 9
    assert RunConfig.load(tmp_path / "out" / "config-run.yaml").edit_batch_size == 3


def test_too_few_gpus_and_bad_manifests_fail_before_any_work(ray_cluster, tiny_model_dir, tmp_path):
    from pipeline.errors import InputError

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1, 2], "target_prompts": ["a", "b"]}), bad)
    base = dict(output=str(tmp_path / "out"), pti=dict(model=tiny_model_dir, **PTI))
    with pytest.raises(InputError, match="ask for 3 GPU per actor but the Ray cluster has 2 GPUs"):
        run_all(RunConfig(manifest=str(bad), gpus_per_actor=3, **base))
    with pytest.raises(InputError) as error:
        run_all(RunConfig(manifest=str(bad), gpus_per_actor=1, **base))
    message = str(error.value)
    assert "missing column 'image'" in message and "column 'id' must be a string" in message
    assert "column 'target_prompts' must be a list of strings" in message
    assert not (tmp_path / "out" / "results").exists()

    # A second job on an output that a live job writes is refused by name, before any work.
    config = RunConfig(manifest=str(bad), gpus_per_actor=1, **dict(base, output=str(tmp_path / "busy")))
    with lock.acquire(config.output_location.lock, "run-other", 60, "output"):
        with pytest.raises(lock.Busy, match=f"^output {tmp_path / 'busy'} is held by run-other "):
            run_all(config)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["_lock"]


def test_pti_tune_writes_embeddings_and_errors_only(ray_cluster, tiny_model_dir, photos, tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    args = [
        "tune",
        "--manifest",
        local_manifest(tmp_path, photos),
        "--output",
        str(tmp_path / "out"),
        "--model",
        tiny_model_dir,
        "--set",
        "gpus_per_actor=1",
        "--set",
        "tune_batch_size=3",
        "--set",
        f"max_failed_fraction={BAD_ROWS_ALLOWED}",
        *(a for k, v in PTI.items() for a in ("--set", f"pti.{k}={json.dumps(v)}")),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary-tune.json").read_text())
    assert (summary["rows_in"], summary["rows_done"], summary["rows_failed"]) == (11, 6, 5)
    embeddings = pq.read_table(tmp_path / "out" / "embeddings")
    assert sorted(embeddings["id"].to_pylist()) == sorted(
        ["astronaut", "cat/../chelsea", *(f"copy-{i}" for i in range(4))]
    )
    assert len(list((tmp_path / "out" / "embeddings").glob("*.parquet"))) < 6  # files per batch, not per row
    assert pq.read_table(tmp_path / "out" / "errors").num_rows == 5
    assert not (tmp_path / "out" / "images").exists() and not (tmp_path / "out" / "results").exists()
