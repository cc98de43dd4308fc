"""Every kind of bad input becomes its documented error row while every other row completes;
image URIs outside the allowed prefixes are refused unread (issue 5)."""

from __future__ import annotations

import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.batch.jobs import run_all
from pipeline.batch.config import RunConfig
from pipeline.io.storage import default_image_prefixes, is_allowed, key_for_id

# device cpu: the test cluster's GPUs are fake (conftest), and a GPU actor refuses the CPU unasked
PTI = dict(steps=3, inner_steps=2, lr=0.1, etas=[1.0], progress=False, device="cpu")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Server(ThreadingHTTPServer):
    """A web server on loopback that counts every request per path: 404, 403, a path that fails
    twice with 503 before it serves, and images."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.lock = files, Counter(), threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def _answer(self, body: bool):
        server: Server = self.server
        with server.lock:
            server.requests[self.path] += 1
            count = server.requests[self.path]
        if self.path.endswith("forbidden.png"):
            status, data = 403, b""
        elif self.path.endswith("redirect.png"):
            self.send_response(302)
            self.send_header("Location", "/secret.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        elif self.path.endswith("flaky.png") and count <= 2:
            status, data = 503, b""
        elif self.path.removesuffix("-flaky.png") in server.files or self.path in server.files:
            status, data = (
                200,
                server.files.get(self.path) or server.files[self.path.removesuffix("-flaky.png")],
            )
        else:
            status, data = 404, b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self):
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)

    def log_message(self, *args):
        pass


@pytest.fixture
def web(photos):
    server = Server(
        {"/public/cat": png(photos["chelsea"][::4, ::4]), "/secret.png": png(photos["coffee"][::4, ::4])}
    )
    yield server
    server.shutdown()


def test_every_bad_input_becomes_its_error_and_the_rest_completes(
    ray_cluster, tiny_model_dir, photos, web, tmp_path
):
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir(), outside.mkdir()
    good = png(photos["astronaut"][::4, ::4])
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.float32), "F").save(buffer, format="TIFF")
    files = {
        "good.png": good,
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(100),
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
        "notes.txt": b"not an image at all",
        "float.tiff": buffer.getvalue(),
        "bomb.png": png(np.zeros((3000, 3000), np.uint8)),  # 9 MP from a few kB
        "big.png": png(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    (outside / "elsewhere.png").write_bytes(good)
    (images / "link.png").symlink_to(outside / "elsewhere.png")
    assert len(files["bomb.png"]) < 50_000 and len(files["big.png"]) > 300_000

    def row(row_id, image, **extra):
        return {
            "id": row_id,
            "image": image,
            "target_prompts": ["a photo of a cat"],
            "guidance": None,
            "eta": None,
            **extra,
        }

    expected = {  # id -> (stage, kind); None: it completes
        "../../escape": None,
        "/absolute/id": None,
        "odd name?*%.png": None,
        "web-flaky": None,  # 503 twice, then served: retried with backoff
        "": ("validate", "bad_id"),
        "dup": ("validate", "duplicate_id"),
        "corrupt": ("read", "bad_image"),
        "truncated": ("read", "bad_image"),
        "zero-bytes": ("read", "bad_image"),
        "not-an-image": ("read", "bad_image"),
        "float-mode": ("read", "bad_image"),
        "bomb": ("read", "too_large"),
        "big-file": ("read", "too_large"),
        "missing": ("read", "not_found"),
        "outside": ("read", "not_allowed"),
        "dot-dot": ("read", "not_allowed"),
        "symlink-out": ("read", "not_allowed"),
        "web-secret": ("read", "not_allowed"),
        "web-gone": ("read", "not_found"),
        "web-forbidden": ("read", "access_denied"),
        "web-redirect": ("read", "not_allowed"),  # an allowed host cannot send us elsewhere
        "non-finite": ("tune", "non_finite"),
        "long-prompt": None,  # 10,000 characters: the tokenizer keeps what the model reads
        "negative-guidance": ("validate", "bad_guidance"),  # the config's own rule, per row (issue 30)
        "nul-uri": ("validate", "bad_uri"),
        "ipv6-uri": ("validate", "bad_uri"),
        "bucket-uri": ("validate", "bad_uri"),
    }
    rows = [
        row("../../escape", str(images / "good.png")),
        row("/absolute/id", str(images / "good.png"), eta=[1.2e-05]),
        row("odd name?*%.png", str(images / "good.png")),
        row("web-flaky", f"{web.url}/public/cat-flaky.png"),
        row("", str(images / "good.png")),
        row("dup", str(images / "good.png")),
        row("dup", str(images / "good.png")),
        row("corrupt", str(images / "corrupt.png")),
        row("truncated", str(images / "truncated.png")),
        row("zero-bytes", str(images / "empty.png")),
        row("not-an-image", str(images / "notes.txt")),
        row("float-mode", str(images / "float.tiff")),
        row("bomb", str(images / "bomb.png")),
        row("big-file", str(images / "big.png")),
        row("missing", str(images / "nowhere.png")),
        row("outside", str(outside / "elsewhere.png")),
        row("dot-dot", f"{images}/../outside/elsewhere.png"),
        row("symlink-out", str(images / "link.png")),
        row("web-secret", f"{web.url}/secret.png"),
        row("web-redirect", f"{web.url}/public/redirect.png"),
        row("web-gone", f"{web.url}/public/gone.png"),
        row("web-forbidden", f"{web.url}/public/forbidden.png"),
        row("non-finite", str(images / "good.png"), guidance=1e30),  # the model's outputs overflow
        row("long-prompt", str(images / "good.png"), target_prompts=["a cat " * 1666]),
        row("negative-guidance", str(images / "good.png"), guidance=-5.0),
        row("nul-uri", f"{images}/good.png\x00.png"),
        row("ipv6-uri", "http://[::1/x.png"),
        row("bucket-uri", "s3://[bucket/x.png"),
    ]
    done = sorted(i for i, k in expected.items() if k is None)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    config = RunConfig(
        manifest=str(manifest),
        output=str(out),
        gpus_per_actor=1,
        tune_batch_size=4,
        max_image_bytes=300_000,
        max_image_pixels=1_000_000,
        allowed_image_prefixes=[str(images), f"{web.url}/public/"],
        max_failed_fraction=1.0,  # nearly every row is bad on purpose
        pti=dict(model=tiny_model_dir, **PTI),
    )
    summary = run_all(config)

    errors = pq.read_table(out / "errors").to_pylist()
    got = {e["id"]: (e["stage"], e["kind"]) for e in errors}
    assert got == {i: k for i, k in expected.items() if k is not None}
    assert len(errors) == len(rows) - len(done)  # both copies of "dup"
    for e in errors:
        assert e["id"] is None or e["message"], e  # every error says what went wrong
        assert rows[e["row"]]["id"] == e["id"], e  # and names its manifest row: copies of "dup" apart
    assert "3000x3000" in next(e["message"] for e in errors if e["id"] == "bomb")
    results = pq.read_table(out / "results").to_pylist()
    assert sorted(r["id"] for r in results) == done
    for r in results:  # odd ids never escape the output prefix
        path = Path(r["image_uri"]).resolve()
        assert path.is_file() and path.is_relative_to((out / "images").resolve()), r["image_uri"]
    assert (
        summary["rows_in"] == len(rows)
        and summary["rows_done"] == len(done)
        and summary["rows_failed"] == len(rows) - len(done)
    )
    # Refused URIs are not read: the server never saw a request for the secret.
    assert web.requests["/secret.png"] == 0 and web.requests["/public/cat-flaky.png"] >= 3

    # Resumed rows are checked and edited as new ones (issue 30): one eta more, which a resume key
    # rounded to 5 decimals took for the first, is made; a done row's emptied target is its error.
    rows[1]["eta"] = [1.2e-05, 1.4e-05]
    rows[2]["target_prompts"] = [""]
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    again = run_all(config)
    assert again["edits"] == 1 and again["already_done"] == len(done) - 2 and again["resumed"] == 1
    made = sorted(p.name for p in (out / "images" / key_for_id("/absolute/id")).iterdir())
    assert made == ["0-1.2e-05.png", "0-1.4e-05.png"]
    errors = pq.read_table(out / "errors").to_pylist()
    expected["odd name?*%.png"] = ("validate", "empty_target")
    assert {e["id"]: (e["stage"], e["kind"]) for e in errors} == {i: k for i, k in expected.items() if k}


def test_default_prefixes_are_the_manifest_bucket_or_the_local_filesystem(tmp_path):
    s3 = default_image_prefixes("s3://data/manifests/night.parquet")
    assert s3 == ("s3://data/",)
    assert is_allowed("s3://data/images/a.png", s3) and is_allowed("s3a://data/a.png", s3)
    assert not is_allowed("s3://data-private/a.png", s3) and not is_allowed("s3://other/a.png", s3)
    assert not is_allowed("/etc/passwd", s3) and not is_allowed("file:///etc/passwd", s3)
    assert not is_allowed("http://127.0.0.1/latest/meta-data", s3) and not is_allowed("gs://data/a.png", s3)
    local = default_image_prefixes(str(tmp_path / "manifest.parquet"))
    assert is_allowed(str(tmp_path / "a.png"), local) and is_allowed("file:///srv/a.png", local)
    assert not is_allowed("http://127.0.0.1:8080/a.png", local) and not is_allowed("s3://data/a.png", local)
    only = [str(tmp_path / "images")]
    assert is_allowed(str(tmp_path / "images" / "a.png"), only)
    assert not is_allowed(str(tmp_path / "images-old" / "a.png"), only)
    assert not is_allowed(str(tmp_path / "images" / ".." / "secret.png"), only)
