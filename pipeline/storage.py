"""Where inputs and outputs live: local paths or any fsspec/pyarrow URI, S3-compatible by URL.

Credentials come only from the standard AWS chain (environment, profile, instance role), which
s3fs and pyarrow read themselves; this module never sees or stores a secret. ``endpoint_url``
(or ``AWS_ENDPOINT_URL``) reaches any S3-compatible store.
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import quote, urlparse

import pyarrow.fs as pafs


def endpoint_from_env(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(uri: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for ``uri``: the endpoint for S3, nothing else."""
    endpoint = endpoint_from_env(endpoint_url)
    if urlparse(uri).scheme in ("s3", "s3a") and endpoint:
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def arrow_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for Ray's readers and writers and for pyarrow."""
    endpoint = endpoint_from_env(endpoint_url)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        options = {}
        if endpoint:
            endpoint_parsed = urlparse(endpoint)
            options = dict(endpoint_override=endpoint_parsed.netloc or endpoint, scheme=endpoint_parsed.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options), parsed.netloc + parsed.path
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path if parsed.scheme else uri)
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)  # gs://, az://, ...: through fsspec's handlers
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """``uri`` and key parts joined with ``/`` (URIs keep their scheme)."""
    return posixpath.join(uri.rstrip("/"), *parts) if "://" in uri else os.path.join(uri, *parts)


def key_for_id(row_id: str) -> str:
    """A safe output key for an id: one path component that cannot escape the output prefix.

    Percent-encoding keeps readable ids readable (``cat-001``) and turns ``/``, ``..`` and odd
    characters into ``%XX``; distinct ids stay distinct.
    """
    key = quote(row_id, safe="-_")  # '.' is never encoded by quote, so guard a leading dot
    return "%2E" + key[1:] if key.startswith(".") else key


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write one object; the parent folders of a local path are created."""
    fs, path = arrow_filesystem(uri, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
