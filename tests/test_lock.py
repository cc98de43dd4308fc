"""One writer per output and one night per manifest: the lease of ``pipeline.batch.lock``, on
local disk and on a real S3-compatible server (conditional puts)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from pipeline.batch import lock
from pipeline.io.storage import Location


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> Location:
    if request.param == "local":
        return Location(str(tmp_path / "out" / "_lock"))
    import boto3

    endpoint = request.getfixturevalue("s3_server")
    bucket = f"lock-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return Location(f"s3://{bucket}/out/_lock", endpoint)


def test_a_held_lease_refuses_a_second_holder_by_name_and_is_free_once_released(folder):
    first = lock.acquire(folder, "run-a", ttl_s=60, what="output out")
    with pytest.raises(lock.Busy, match=r"^output out is held by run-a \(pid \d+ on .+\) until "):
        lock.acquire(folder, "run-b", ttl_s=60, what="output out")
    first.release()
    with lock.acquire(folder, "run-b", ttl_s=60, what="output out") as second:
        assert second.record["holder"] == "run-b"
        with pytest.raises(lock.Busy, match="held by run-b"):
            lock.acquire(folder, "run-c", ttl_s=60, what="output out")


def test_a_dead_holders_lease_is_taken_over_once_expired_and_a_live_one_is_renewed(folder):
    dead = lock.acquire(folder, "run-dead", ttl_s=0.6, what="out")
    dead._stop.set()  # its process died: nothing renews it
    with pytest.raises(lock.Busy):
        lock.acquire(folder, "run-b", ttl_s=0.6, what="out")
    time.sleep(0.8)
    alive = lock.acquire(folder, "run-b", ttl_s=0.6, what="out")  # expired: taken over
    time.sleep(1.0)  # past its first ttl: its renewals keep it
    with pytest.raises(lock.Busy, match="held by run-b"):
        lock.acquire(folder, "run-c", ttl_s=0.6, what="out")
    alive.release()


def test_of_many_takers_at_once_exactly_one_gets_the_lease(folder):
    won, busy = [], []
    barrier = threading.Barrier(6)

    def take(n: int) -> None:
        barrier.wait()
        try:
            won.append(lock.acquire(folder, f"run-{n}", ttl_s=60, what="out"))
        except lock.Busy as error:
            busy.append(error)

    threads = [threading.Thread(target=take, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(busy)) == (1, 5)
    assert all(b.holder["holder"] == won[0].record["holder"] for b in busy if b.holder)
    won[0].release()


def test_only_one_generation_before_the_current_is_kept(tmp_path):
    folder = Location(str(tmp_path / "_lock"))
    for n in range(4):
        lock.acquire(folder, f"run-{n}", ttl_s=60, what="out").release()
    names = sorted(p.name for p in (tmp_path / "_lock").iterdir())
    assert names == ["00000002.json", "00000003.json"]
    assert json.loads((tmp_path / "_lock" / "00000003.json").read_text())["holder"] == "run-3"


def test_create_if_absent_is_a_conditional_put_that_never_overwrites(folder):
    fs, path = lock._filesystem(folder)
    assert lock.create_if_absent(fs, f"{path}/x.json", b"first")
    assert not lock.create_if_absent(fs, f"{path}/x.json", b"second")
    assert fs.cat_file(f"{path}/x.json") == b"first"


def test_a_lease_whose_holder_process_on_this_machine_is_gone_is_taken_at_once(tmp_path):
    import subprocess
    import sys

    folder = Location(str(tmp_path / "_lock"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lease = lock.acquire(folder, "run-killed", ttl_s=600, what="out")
    lease._stop.set()
    lease.record["pid"] = int(gone.stdout)  # as if that process had taken it and been killed
    lease.fs.pipe_file(lease.path, json.dumps(lease.record).encode())
    with lock.acquire(folder, "run-again", ttl_s=600, what="out") as again:
        assert again.record["holder"] == "run-again"
