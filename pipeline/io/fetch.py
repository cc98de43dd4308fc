"""Reading an image's bytes from bytes, a local path or any fsspec URI: retries, time and size limits,
no redirects; every failure is an ``ImageError`` with the errors table's kind."""

from __future__ import annotations

import os
import stat
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from pipeline.errors import ImageError

# Limits against decompression bombs and runaway downloads; the batch job's config sets its own.
# MAX_IMAGE_PIXELS is a decode limit (images.decode_rgb's), kept here with the rest so that the batch
# job's config reads every limit without importing PIL, numpy or torch.
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 64_000_000  # about 190 MB decoded as 8-bit RGB
READ_ATTEMPTS = 3  # tries of one read: botocore's own for S3 (standard mode), ours for the rest
READ_TIMEOUT_S = 60.0  # all the tries of one read together: a stalled store ends as read_failed
READ_BACKOFF_S = 0.5  # our tries wait 0.5 s, then 1 s


def read_bytes(
    source: str | bytes,
    name: str | None = None,
    storage_options: dict | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout_s: float = READ_TIMEOUT_S,
    attempts: int = READ_ATTEMPTS,
) -> bytes:
    """The raw bytes of an image given as bytes, a local path or any fsspec URI.

    A missing object or a refused one is permanent and fails at once; any other storage error is
    tried ``attempts`` times in all, and every try together takes at most ``timeout_s`` (then
    ``read_failed``). A local file that is not a regular file (a named pipe, a device) is refused
    before it is opened: reading one could wait forever. An object larger than ``max_bytes`` is
    refused from its size, unread."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = _read_with_retries(source, name, storage_options or {}, max_bytes, timeout_s, attempts)
    if len(data) > max_bytes:
        raise ImageError(
            f"image {name!r}: larger than the {max_bytes}-byte limit (max_image_bytes)", "too_large"
        )
    return data


def _is_s3(uri: str) -> bool:
    return urlparse(uri).scheme in ("s3", "s3a")


def _s3_client_settings(storage_options: dict, timeout_s: float, attempts: int) -> dict:
    """botocore retries in its standard mode (throttling and 5xx, with backoff), each request
    given its share of the read's time to connect and between bytes (the defaults wait 60 s)."""
    per_request = timeout_s / attempts
    config = {
        **storage_options.get("config_kwargs", {}),
        "connect_timeout": per_request,
        "read_timeout": per_request,
        "retries": {"mode": "standard", "total_max_attempts": attempts},
    }
    return {**storage_options, "config_kwargs": config}


def _read_with_retries(
    uri: str, name: str, storage_options: dict, max_bytes: int, timeout_s: float, attempts: int
) -> bytes:
    started = time.monotonic()
    deadline = started + timeout_s
    if _is_s3(uri):  # botocore retries: one more loop here would multiply its tries
        storage_options, tries = _s3_client_settings(storage_options, timeout_s, attempts), 1
    else:
        tries = attempts
    for attempt in range(tries):
        try:
            return _read_once(uri, name, storage_options, max_bytes, deadline, timeout_s / attempts)
        except ImageError:
            raise
        except FileNotFoundError as exc:
            raise ImageError(f"image {name!r}: not found", "not_found") from exc
        except PermissionError as exc:
            raise ImageError(f"image {name!r}: access denied: {exc}", "access_denied") from exc
        except IsADirectoryError as exc:
            raise ImageError(f"image {name!r}: is a folder, not a file", "bad_image") from exc
        except Exception as exc:
            status = getattr(exc, "status", None)  # HTTP errors carry their status
            if status in (401, 403):
                raise ImageError(f"image {name!r}: access denied: HTTP {status}", "access_denied") from exc
            if status in (404, 410):
                raise ImageError(f"image {name!r}: not found: HTTP {status}", "not_found") from exc
            backoff = READ_BACKOFF_S * 2**attempt
            if attempt + 1 == tries or time.monotonic() + backoff >= deadline:
                raise ImageError(
                    f"image {name!r}: cannot read it (up to {attempts} attempts, "
                    f"{time.monotonic() - started:.1f} s of the {timeout_s:g} s allowed): {_describe(exc)}",
                    "read_failed",
                ) from exc
            time.sleep(backoff)
    raise AssertionError("unreachable")


def _describe(exc: Exception) -> str:
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "FSTimeoutError":
        return "no answer in time (a stalled store or server)"
    return f"{type(exc).__name__}: {exc}"


def _read_once(
    uri: str, name: str, storage_options: dict, max_bytes: int, deadline: float, per_request_s: float
) -> bytes:
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        return _get(uri, max_bytes + 1, deadline, per_request_s)
    if scheme in ("", "file"):
        return _read_local(os.path.expanduser(urlparse(uri).path if scheme else uri), name, max_bytes)
    return _read_object(uri, name, storage_options, max_bytes, deadline)


_SPECIAL_FILES = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _refuse_special_file(mode: int, name: str) -> None:
    if stat.S_ISDIR(mode):
        raise ImageError(f"image {name!r}: is a folder, not a file", "bad_image")
    if not stat.S_ISREG(mode):
        kind = _SPECIAL_FILES.get(stat.S_IFMT(mode), "a special file")
        raise ImageError(f"image {name!r}: is {kind}, not a regular file", "bad_image")


def _read_local(path: str, name: str, max_bytes: int) -> bytes:
    """A regular file's first bytes. A named pipe or device is refused from its stat, unopened;
    the open does not wait either (O_NONBLOCK), and the opened file is checked again, in case a
    pipe took the file's place in between."""
    _refuse_special_file(os.stat(path).st_mode, name)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        _refuse_special_file(os.fstat(f.fileno()).st_mode, name)
        return f.read(max_bytes + 1)


def _read_object(uri: str, name: str, storage_options: dict, max_bytes: int, deadline: float) -> bytes:
    """An object's bytes through fsspec: its size first (a HEAD: too large is refused unread),
    then one GET. Async stores (S3, GCS, HTTP) stop each call at the deadline."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if _is_s3(uri):
        fs.retries = 1  # s3fs retries SlowDown 5 times over botocore's tries; botocore's are enough

    def bounded() -> dict:  # fsspec takes 0 as "no limit"
        return {"timeout": max(deadline - time.monotonic(), 0.01)} if getattr(fs, "async_impl", False) else {}

    info = fs.info(path, **bounded())
    if info.get("type") == "directory":
        raise ImageError(f"image {name!r}: is a folder, not a file", "bad_image")
    size = info.get("size")
    if size is not None and size > max_bytes:
        raise ImageError(
            f"image {name!r}: {size} bytes, larger than the {max_bytes}-byte limit (max_image_bytes)",
            "too_large",
        )
    return b"" if size == 0 else fs.cat_file(path, **bounded())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ImageError(
            f"image {req.full_url!r}: redirects to {newurl!r}; redirects are not followed", "not_allowed"
        )


def _get(url: str, limit: int, deadline: float, per_request_s: float) -> bytes:
    """One GET of at most ``limit`` bytes, done by ``deadline``. Hand-written on urllib: fsspec's
    HTTP filesystem first probes the size and reports any failure of the probe (403, 503) as "not
    found", hiding the status that says whether to retry; and redirects are refused, so an
    allowed host cannot send the reader to an address the allow-list would refuse. A server
    that sends a byte now and then is cut off at the deadline, not at each socket timeout."""
    timeout = max(0.01, min(per_request_s, deadline - time.monotonic()))
    chunks, size = [], 0
    with urllib.request.build_opener(_NoRedirects).open(url, timeout=timeout) as response:
        while size < limit:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: the answer did not end in time")
            chunk = response.read(min(2**20, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)
