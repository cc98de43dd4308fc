"""Runs an operator can trust (issue 12): a local Ray of its own and a CPU-starved cluster refused
at once; reads that cannot block; ids of any length stored safely; duplicate etas refused by name;
no request for a refused URI; a failure threshold that fails the job, the night and its ledger;
an errors table that a run ending early leaves in place."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.batch.cluster import actor_wait_s, autoscaler_can_add_nodes, starved_reads
from pipeline.batch.config import RunConfig
from pipeline.batch.jobs import run_all
from pipeline.batch.nightly import NightFailed, run_nightly
from pipeline.batch.output import image_key
from pipeline.errors import ImageError, InputError
from pipeline.io.fetch import read_bytes
from pipeline.io.storage import MAX_KEY_BYTES, is_allowed, key_for_id
from schemas.manifest import validate_rows

ROOT = Path(__file__).resolve().parents[1]
# device cpu: the test cluster's GPUs are fake (conftest), and a GPU actor refuses the CPU unasked
PTI = dict(steps=3, inner_steps=2, lr=0.1, etas=[1.0], progress=False, device="cpu")


def png(array: np.ndarray, size: int = 80) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def job_config(manifest, model, output, **overrides) -> RunConfig:
    settings = dict(gpus_per_actor=1, tune_batch_size=2, edit_batch_size=2, results_rows_per_file=2)
    return RunConfig(
        manifest=str(manifest),
        output=str(output),
        pti=dict(model=model, **PTI),
        **{**settings, **overrides},
    )


# --- an S3 store behind a loopback proxy that counts, throttles and stalls -----------------------

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)


class Store(ThreadingHTTPServer):
    """A proxy on loopback in front of moto's S3 server: it counts every request by method and
    path, answers 503 SlowDown for keys under ``throttled/`` and 403 AccessDenied under
    ``denied/``, and never answers for keys under ``stalled/``; in bucket ``flaky`` it answers
    ``flaky_share`` of all requests with 503 SlowDown or a dropped connection, half each
    (seeded); the rest reach moto."""

    daemon_threads = True

    def __init__(self, moto_port: int):
        self.moto_port, self.requests, self.lock = moto_port, Counter(), threading.Lock()
        self.flaky_share, self.dice, self.injected = 0.0, random.Random(0), Counter()
        self.release = threading.Event()  # ends the stalls at teardown
        super().__init__(("127.0.0.1", 0), Forward)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def seen(self, fragment: str) -> int:
        with self.lock:
            return sum(n for (_, path), n in self.requests.items() if fragment in path)


class Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        store: Store = self.server
        with store.lock:
            store.requests[(self.command, self.path)] += 1
        body = self._body()
        if self.path.startswith("/flaky"):
            with store.lock:
                roll = store.dice.random()
                fault = roll < store.flaky_share and ("reset" if roll < store.flaky_share / 2 else "503")
                store.injected[fault or "none"] += 1
            if fault == "reset":  # no answer: the connection is reset (RST, as a dropped peer)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
        else:
            fault = None
        if "/stalled/" in self.path:
            store.release.wait(120)
            self.close_connection = True
            return
        if "/denied/" in self.path:
            status, headers, data = 403, [("Content-Type", "application/xml")], ACCESS_DENIED
        elif "/throttled/" in self.path or fault == "503":
            status, headers, data = 503, [("Content-Type", "application/xml")], SLOW_DOWN
        else:
            moto = http.client.HTTPConnection("127.0.0.1", store.moto_port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(body))
            moto.request(self.command, self.path, body=body, headers=headers)
            response = moto.getresponse()
            status, headers, data = response.status, response.getheaders(), response.read()
        length = dict((k.lower(), v) for k, v in headers).get("content-length", len(data))  # HEAD: no body
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(length if self.command == "HEAD" else len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        """The request's body, also when sent in HTTP chunks (the AWS SDK's uploads are)."""
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b""
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            data += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return data

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def store(photos):
    """The proxy, with a bucket holding ``data/good.png`` and ``other/secret.png``."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket="bucket")
    client.put_object(Bucket="bucket", Key="data/good.png", Body=png(photos["coffee"]))
    client.put_object(Bucket="bucket", Key="other/secret.png", Body=png(photos["chelsea"]))
    proxy = Store(port)
    yield proxy
    proxy.release.set()
    proxy.shutdown()
    moto.stop()


def s3_options(store: Store) -> dict:
    return {"client_kwargs": {"endpoint_url": store.url}}


# --- 1. a local Ray of its own; a cluster whose actors would starve the reads is refused ---------


def test_reads_are_starved_when_the_actors_leave_no_whole_cpu():
    problem = starved_reads(actors=2, cpus_per_actor=1.0, cluster_cpus=2)  # `ray start --num-cpus 2`
    assert problem == (
        "the job's 2 actor(s) x cpus_per_actor=1 take 2 of the Ray cluster's 2 CPUs, leaving 0: reading "
        "images needs a whole CPU, so the job would wait forever; set cpus_per_actor=0.5 "
        "(--set cpus_per_actor=0.5), run fewer actors or add CPUs to the cluster"
    )
    assert starved_reads(2, 0.5, 2) is None  # the fix it names fits
    assert starved_reads(2, 1.0, 3) is None
    assert "leaving 0.5" in starved_reads(5, 1.1, 6)  # half a CPU is no CPU for a read task
    assert "cpus_per_actor=0.83" in starved_reads(6, 1.0, 6)
    assert starved_reads(10, 0.1, 2) is None  # shares that do not add up exactly in floats
    assert starved_reads(1, 1.0, 0.5).endswith("would wait forever; add CPUs to the cluster")


def test_pools_of_several_actors_wait_for_them_all_only_where_they_fit_and_single_actors_never_wait():
    config = RunConfig(gpus_per_actor=1, cpus_per_actor=1.0, actor_start_timeout_s=900)
    cluster = {"CPU": 6.0, "GPU": 4.0}
    assert actor_wait_s(config, (2, 2), cluster) == 900  # every actor gets some of a small job's blocks
    assert actor_wait_s(config, (2,), cluster) == 900
    assert actor_wait_s(config, (3, 2), cluster) == -1  # 5 GPUs asked of 4: waiting would deadlock
    assert actor_wait_s(config, (3, 3), {"CPU": 6.0, "GPU": 8.0}) == -1  # no CPU left for reads
    # One actor per pool: both pools' models load at once, and there is nothing to share out.
    assert actor_wait_s(config, (1, 1), cluster) == actor_wait_s(config, (1,), cluster) == -1


def test_only_an_autoscaler_with_node_types_of_its_own_can_add_cpus():
    node = "node_" + "ab12" * 14  # `ray start` nodes, as Ray's read-only autoscaler reports them
    fixed = {"autoscaler_report": {"active_nodes": {node: 1}, "node_type_mapping": {node[5:]: node}}}
    assert not autoscaler_can_add_nodes(fixed) and not autoscaler_can_add_nodes({})
    kuberay = {
        "autoscaler_report": {"active_nodes": {"headgroup": 1, "gpu-group": 1}, "pending_launches": {}}
    }
    assert autoscaler_can_add_nodes(kuberay)


def test_a_cluster_whose_actors_would_take_every_cpu_is_refused_at_once(
    ray_cluster, tiny_model_dir, tmp_path
):
    import ray

    cpus = ray.cluster_resources()["CPU"]  # the session cluster: `ray start --num-cpus=6`, no autoscaler
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "image": "a.png", "target_prompts": ["x"]}]), manifest)
    config = job_config(manifest, tiny_model_dir, tmp_path / "out", tune_actors=3, edit_actors=3)
    started = time.monotonic()
    with pytest.raises(InputError) as refused:
        run_all(config)
    assert time.monotonic() - started < 30  # refused, not waited on
    assert str(refused.value) == starved_reads(6, 1.0, cpus)
    assert f"take 6 of the Ray cluster's {cpus:g} CPUs" in str(refused.value)
    assert not (tmp_path / "out" / "config-run.yaml").exists()  # nothing started


def test_without_ray_address_a_job_starts_its_own_ray_beside_a_ray_start_cluster(ray_cluster):
    import ray

    code = (
        "import json, ray\n"
        "from pipeline.batch.cluster import init_ray\n"
        "from pipeline.batch.config import RunConfig\n"
        "init_ray(RunConfig(tune_actors=1, edit_actors=1, cpus_per_actor=0.5))\n"
        "print(json.dumps({'cpus': ray.cluster_resources()['CPU'],"
        " 'gcs': ray.get_runtime_context().gcs_address}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, started.stderr[-3000:]
    local = json.loads(started.stdout.strip().splitlines()[-1])
    assert local["gcs"] != ray.get_runtime_context().gcs_address  # not the session's `ray start` cluster
    assert local["cpus"] == 3  # sized for the job: 2 actors x 0.5 CPU, and 2 for the reads


# --- 2. reads that cannot block ----------------------------------------------------------------


def test_a_named_pipe_or_a_device_is_refused_unopened(tmp_path):
    pipe = tmp_path / "image.png"
    os.mkfifo(pipe)  # no writer: opening it to read would wait forever
    started = time.monotonic()
    with pytest.raises(ImageError) as error:
        read_bytes(str(pipe), name="row-7")
    assert time.monotonic() - started < 5
    assert (error.value.kind, str(error.value)) == (
        "bad_image",
        "image 'row-7': is a named pipe, not a regular file",
    )
    with pytest.raises(ImageError, match="is a character device, not a regular file"):
        read_bytes("/dev/zero")  # would read forever
    link = tmp_path / "link.png"
    link.symlink_to(pipe)
    with pytest.raises(ImageError, match="named pipe"):
        read_bytes(f"file://{link}")


def test_a_stalled_store_is_read_failed_within_the_read_timeout(store):
    started = time.monotonic()
    with pytest.raises(ImageError) as error:
        read_bytes("s3://bucket/stalled/a.png", storage_options=s3_options(store), timeout_s=3)
    took = time.monotonic() - started
    assert error.value.kind == "read_failed" and "no answer in time" in str(error.value)
    assert 2 <= took < 8, took


def test_a_throttled_read_is_retried_by_botocore_within_bounds(store):
    before = store.seen("/throttled/")
    started = time.monotonic()
    with pytest.raises(ImageError) as error:
        read_bytes("s3://bucket/throttled/a.png", storage_options=s3_options(store))
    took = time.monotonic() - started
    assert error.value.kind == "read_failed" and "up to 3 attempts" in str(error.value)
    # Was 15 requests and about 25 s: botocore's 5 tries x s3fs's own retries x ours.
    assert store.seen("/throttled/") - before == 3 and took < 10, took
    assert read_bytes("s3://bucket/data/good.png", storage_options=s3_options(store))[:4] == b"\x89PNG"


# --- 3. ids of any length and script ------------------------------------------------------------


def old_key(row_id: str) -> str:
    """The encoding before issue 12, which every readable id keeps."""
    key = quote(row_id, safe="-_")
    return "%2E" + key[1:] if key.startswith(".") else key


def test_readable_ids_keep_their_keys_and_long_ones_are_capped_and_stay_distinct():
    readable = ["cat-001", "cat/../chelsea", ".hidden", "..", "odd name?*%.png", "猫" * 28, "x" * 255]
    for row_id in readable:
        assert key_for_id(row_id) == old_key(row_id)  # existing outputs keep their paths
    assert image_key("cat-001", 0, 1.0) == "images/cat-001/0-1.png"
    long = ["x" * 256, "x" * 300, "y" * 10_000, "猫" * 100, "🐈" * 70, "/" * 1_000, "." + "x" * 400]
    long += [f"{'z' * 300}-{i}" for i in range(500)]  # one long prefix, distinct ends
    keys = [key_for_id(i) for i in readable + long]
    assert len(set(keys)) == len(keys)
    for row_id, key in zip(long, keys[len(readable) :]):
        assert len(key.encode()) <= MAX_KEY_BYTES and "/" not in key and not key.startswith(".")
        assert key.startswith(old_key(row_id)[:100])  # still readable at the start
        assert len(image_key(row_id, 99, 0.123456).encode()) < 300  # far under S3's 1,024
    # A readable id spelling another's cut key is not that key: encodings never hold a bare '!'.
    assert key_for_id(key_for_id("y" * 10_000)) != key_for_id("y" * 10_000)


def test_long_ids_and_a_pipe_among_good_rows_finish_first_and_again_with_their_error_rows(
    ray_cluster, tiny_model_dir, photos, store, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png(photos["astronaut"]))
    os.mkfifo(images / "pipe.png")
    long = {"ascii": "x" * 300, "huge": "y" * 10_000, "cjk": "猫" * 100}
    done = [*long.values(), "short", "s3-good"]
    failed = {
        "pipe": "bad_image",
        "s3-dot-dot": "not_allowed",  # checked as other/secret.png, but an object store reads the key as is
        "s3-outside": "not_allowed",
        "s3-throttled": "read_failed",
    }
    rows = [{"id": i, "image": str(images / "a.png"), "target_prompts": ["a cat"]} for i in done[:4]]
    rows += [
        {"id": "s3-good", "image": "s3://bucket/data/good.png", "target_prompts": ["a cup of tea"]},
        {"id": "pipe", "image": str(images / "pipe.png"), "target_prompts": ["a cat"]},
        {"id": "s3-dot-dot", "image": "s3://bucket/data/../other/secret.png", "target_prompts": ["a cat"]},
        {"id": "s3-outside", "image": "s3://bucket/other/secret.png", "target_prompts": ["a cat"]},
        {"id": "s3-throttled", "image": "s3://bucket/data/throttled/c.png", "target_prompts": ["a cat"]},
    ]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    config = job_config(
        manifest,
        tiny_model_dir,
        out,
        endpoint_url=store.url,
        allowed_image_prefixes=[str(images), "s3://bucket/data/"],
        max_failed_fraction=1.0,
    )
    throttled_before = store.seen("/throttled/")
    for attempt in ("first", "again"):
        summary = run_all(config)
        assert (summary["rows_done"], summary["rows_failed"]) == (5, 4), attempt
        assert summary["already_done"] == (0 if attempt == "first" else 5)
        errors = pq.read_table(out / "errors").to_pylist()
        assert {e["id"]: e["kind"] for e in errors} == failed and len(errors) == 4, attempt
    results = pq.read_table(out / "results").to_pylist()
    assert sorted(r["id"] for r in results) == sorted(done)  # the full ids, however long
    for r in results:
        path = Path(r["image_uri"])
        assert path.is_file() and Image.open(path).size == (64, 64)
        relative = path.relative_to(out)
        assert all(len(part.encode()) <= 255 for part in relative.parts) and len(str(relative).encode()) < 300
    assert (out / image_key("short", 0, 1.0)).is_file()
    # A refused URI is never requested, in either spelling; a throttled one is tried 3 times a run.
    assert store.seen("secret") == 0
    assert store.seen("/throttled/") - throttled_before == 2 * 3


def flaky_job(store: Store, photos, model: str):
    """A bucket ``flaky`` with two images and their manifest, through the proxy; a boto3 client
    past the proxy, and the job's config (output ``s3://flaky/out``)."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{store.moto_port}", region_name="us-east-1")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket="flaky")
    rows = []
    for i, name in enumerate(["astronaut", "chelsea"]):
        client.put_object(Bucket="flaky", Key=f"images/{i}.png", Body=png(photos[name]))
        rows.append({"id": f"row-{i}", "image": f"s3://flaky/images/{i}.png", "target_prompts": ["a cat"]})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    client.put_object(Bucket="flaky", Key="manifest.parquet", Body=buffer.getvalue())
    config = job_config(
        "s3://flaky/manifest.parquet",
        model,
        "s3://flaky/out",
        endpoint_url=store.url,
        image_read_attempts=12,
        max_failed_fraction=1.0,
    )
    return client, config


@pytest.mark.slow  # a chaos run of a whole job: make test-slow (README)
def test_a_job_through_a_store_failing_40_percent_of_requests_loses_and_duplicates_nothing(
    ray_cluster, tiny_model_dir, photos, store
):
    """Every request to the bucket (manifest, images, model-free outputs, leases) meets 20%
    503 SlowDown and 20% dropped connections; the clients' own retries carry the job through."""
    client, config = flaky_job(store, photos, tiny_model_dir)
    store.flaky_share = 0.4
    try:
        summary = run_all(config)
    finally:
        store.flaky_share = 0.0
    assert store.injected["reset"] >= 5 and store.injected["503"] >= 5, store.injected
    assert (summary["rows_in"], summary["rows_done"], summary["rows_failed"]) == (2, 2, 0)
    results = read_s3_table(client, "out/results")
    assert sorted(results["id"].to_pylist()) == ["row-0", "row-1"]  # once each
    for key in results["image_uri"].to_pylist():
        assert client.head_object(Bucket="flaky", Key=key.removeprefix("s3://flaky/"))["ContentLength"] > 0
    assert sorted(read_s3_table(client, "out/embeddings")["id"].to_pylist()) == ["row-0", "row-1"]


def test_an_output_prefix_the_job_may_not_write_is_one_clean_error_before_any_work(
    ray_cluster, tiny_model_dir, photos, store
):
    _, config = flaky_job(store, photos, tiny_model_dir)
    denied = dataclasses.replace(config, output="s3://flaky/denied/out")
    with pytest.raises(InputError, match=r"^cannot write to output s3://flaky/denied/out: .*may write under"):
        run_all(denied)


def read_s3_table(client, prefix: str) -> pa.Table:
    listed = client.list_objects_v2(Bucket="flaky", Prefix=prefix + "/")["Contents"]
    tables = [
        pq.read_table(io.BytesIO(client.get_object(Bucket="flaky", Key=o["Key"])["Body"].read()))
        for o in listed
        if o["Key"].endswith(".parquet")
    ]
    return pa.concat_tables(tables)


def test_a_uri_an_object_store_would_read_as_another_key_is_never_allowed():
    assert not is_allowed("s3://bucket/data/../other/secret.png", ["s3://bucket/"])
    assert not is_allowed("s3://bucket/data//a.png", ["s3://bucket/"])
    assert not is_allowed("https://host/public/%2e%2e/secret.png", ["https://host/"])
    assert is_allowed("s3://bucket/data/a.png", ["s3://bucket/data/"])
    assert is_allowed("/srv/images/../images/a.png", ["/srv/images"])  # the OS resolves '..' for both


# --- 4. duplicate etas in one row ----------------------------------------------------------------


@pytest.mark.parametrize("etas", [[0.5, 0.5], [0.3, 0.3000001]], ids=["equal", "same-file-name"])
def test_etas_that_would_write_one_image_twice_refuse_their_row_by_name(etas):
    rows = [
        {"id": "twice", "image": "a.png", "target_prompts": ["a cat"], "eta": [*etas, 0.8]},
        {"id": "fine", "image": "b.png", "target_prompts": ["a cat"], "eta": [0.3, 0.31]},
    ]
    good, errors = validate_rows(rows)
    assert [r["id"] for r in good] == ["fine"]
    (error,) = errors
    assert (error["id"], error["row"], error["kind"]) == ("twice", 0, "duplicate_eta")
    assert error["message"] == (
        f"etas {etas[0]!r}, {etas[1]!r} are one eta at the precision of image names ({etas[0]:g}): "
        "list it once"
    )


# --- 6. never lie about failures -------------------------------------------------------------


def test_a_job_whose_rows_all_fail_exits_2_after_writing_everything(
    ray_cluster, tiny_model_dir, tmp_path, capsys
):
    from jobs.common import main

    manifest = tmp_path / "manifest.parquet"
    missing = [
        {"id": f"gone-{i}", "image": str(tmp_path / f"{i}.png"), "target_prompts": ["a"]} for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(missing), manifest)
    out = tmp_path / "out"
    argv = ["--manifest", str(manifest), "--output", str(out), "--model", tiny_model_dir]
    argv += ["--set", "gpus_per_actor=1", *(f"--set=pti.{k}={json.dumps(v)}" for k, v in PTI.items())]
    with pytest.raises(SystemExit) as exited:
        main(run_all, "jobs.run", argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the job's (timestamped) log lines
    assert error.startswith("error: 3 of 3 rows failed (100%), more than max_failed_fraction=0.1")
    assert f"the errors table {out / 'errors'} says why" in error
    summary = json.loads((out / "summary-run.json").read_text())  # written before the job failed
    assert (summary["rows_in"], summary["rows_failed"]) == (3, 3)
    assert sorted(pq.read_table(out / "errors")["kind"].to_pylist()) == ["not_found"] * 3


def test_a_night_over_the_threshold_fails_unrecorded_and_its_resume_processes_the_fixed_manifest(
    ray_cluster, tiny_model_dir, photos, tmp_path
):
    manifests, images = tmp_path / "manifests", tmp_path / "images"
    manifests.mkdir(), images.mkdir()
    rows = [{"id": n, "image": str(images / f"{n}.png"), "target_prompts": ["a cat"]} for n in ("a", "b")]
    pq.write_table(pa.Table.from_pylist(rows), manifests / "late.parquet")
    config = RunConfig(
        output=str(tmp_path / "out"),
        gpus_per_actor=1,
        pti=dict(model=tiny_model_dir, **PTI),
        nightly=dict(manifests=str(manifests), run_id="2026-11-25"),
    )
    with pytest.raises(NightFailed, match=r"1 of 1 manifests failed .*late\.parquet.*--run-id 2026-11-25"):
        run_nightly(config)  # the images have not arrived yet: every row fails
    assert not list((tmp_path / "out" / "_ledger").glob("*.parquet"))  # no ledger row (claims aside)
    report = json.loads((tmp_path / "out" / "2026-11-25" / "report.json").read_text())
    (entry,) = report["manifests"]
    assert (entry["status"], entry["rows_in"], entry["rows_failed"]) == ("failed", 2, 2)
    assert entry["error"].startswith("TooManyFailures: 2 of 2 rows failed") and entry["error_kinds"] == {
        "not_found": 2
    }

    for name, photo in (("a", "astronaut"), ("b", "coffee")):  # the inputs are fixed
        (images / f"{name}.png").write_bytes(png(photos[photo]))
    resumed = run_nightly(config)
    assert (resumed["manifests_done"], resumed["rows_done"], resumed["rows_failed"]) == (1, 2, 0)
    (recorded,) = pq.read_table(tmp_path / "out" / "_ledger").to_pylist()
    assert (recorded["run_id"], recorded["rows_done"], recorded["edits"]) == ("2026-11-25", 2, 2)
    assert not list((tmp_path / "out" / "2026-11-25" / "late" / "errors").glob("*.parquet"))  # retried: done
