"""Where inputs and outputs live: local paths or any fsspec/pyarrow URI, S3-compatible by URL.

Credentials come only from the standard AWS chain (environment, profile, instance role), which
s3fs and pyarrow read themselves; this module never sees or stores a secret. ``endpoint_url``
(or ``AWS_ENDPOINT_URL``) reaches any S3-compatible store.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def endpoint_from_env(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


# Tries of one request to an object store before it counts as failed: throttling (503 SlowDown)
# and dropped connections are what S3 does at scale. Retried by the clients themselves, with
# backoff: botocore's standard mode (s3fs) and the AWS SDK's standard strategy (pyarrow).
STORE_ATTEMPTS = 12


def storage_options(uri: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for ``uri``: for S3, the endpoint and botocore's standard retries."""
    if urlparse(uri).scheme not in ("s3", "s3a"):
        return {}
    options: dict = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": STORE_ATTEMPTS}}}
    endpoint = endpoint_from_env(endpoint_url)
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def arrow_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for Ray's readers and writers and for pyarrow."""
    endpoint = endpoint_from_env(endpoint_url)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        options = {}
        if endpoint:
            endpoint_parsed = urlparse(endpoint)
            options = dict(
                endpoint_override=endpoint_parsed.netloc or endpoint, scheme=endpoint_parsed.scheme or "https"
            )
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        retries = pafs.AwsStandardS3RetryStrategy(max_attempts=STORE_ATTEMPTS)
        return pafs.S3FileSystem(retry_strategy=retries, **options), parsed.netloc + parsed.path
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path if parsed.scheme else uri)
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)  # gs://, az://, ...: through fsspec's handlers
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def default_image_prefixes(manifest: str) -> tuple[str, ...]:
    """Where a manifest's images may be read from unless the config says otherwise: the
    manifest's own bucket (or container) when it lives in an object store; the local filesystem
    only when the manifest itself is a local file. Never a web URL."""
    parsed = urlparse(manifest)
    if parsed.scheme in ("", "file"):
        return ("/",)
    return (f"{'s3' if parsed.scheme == 's3a' else parsed.scheme}://{parsed.netloc}/",)


def normalize_uri(uri: str) -> str:
    """A URI in the one form prefixes are matched in: local paths absolute with symlinks and
    ``..`` resolved; others as ``scheme://host/path`` with ``..`` resolved (no query)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return os.path.realpath(os.path.expanduser(parsed.path if parsed.scheme else uri))
    path = posixpath.normpath("/" + parsed.path.lstrip("/"))
    return f"{'s3' if parsed.scheme == 's3a' else parsed.scheme}://{parsed.netloc.lower()}{path}"


def resolves_in_place(uri: str) -> bool:
    """Whether a request for ``uri`` asks for the object its normal form names. An object store
    takes ``data/../other/a.png`` (or ``data//a.png``) as a key of its own, and servers differ on
    resolving it, so a URI with ``.``, ``..`` or empty segments would be checked as one object and
    read as another. Local paths resolve the same way for both: the operating system does it."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return True
    path = unquote(parsed.path) if parsed.scheme in ("http", "https") else parsed.path  # servers decode
    *inner, last = path.split("/")[1:] or [""]
    return not any(s in ("", ".", "..") for s in inner) and last not in (".", "..")  # "a/" is fine


def is_allowed(uri: str, prefixes) -> bool:
    """Whether ``uri`` lies under one of ``prefixes`` (whole path components: ``s3://data/``
    does not allow ``s3://data-private/``), compared in normal form; a URI that would be read as
    another object than its normal form names is refused outright (``resolves_in_place``)."""
    if not resolves_in_place(uri):
        return False
    target = normalize_uri(uri)
    for prefix in prefixes:
        base = normalize_uri(prefix).rstrip("/")
        if target == base or target.startswith(base + "/"):
            return True
    return False


def join(uri: str, *parts: str) -> str:
    """``uri`` and key parts joined with ``/`` (URIs keep their scheme)."""
    return posixpath.join(uri.rstrip("/"), *parts) if "://" in uri else os.path.join(uri, *parts)


MAX_KEY_BYTES = 255  # a path component: most filesystems' NAME_MAX; S3 allows 1,024 bytes per whole key


def key_for_id(row_id: str) -> str:
    """A safe output key for an id: one path component of at most ``MAX_KEY_BYTES`` bytes that
    cannot escape the output prefix.

    Percent-encoding keeps readable ids readable (``cat-001``) and turns ``/``, ``..`` and odd
    characters into ``%XX``. An id whose encoding is longer is cut, and ends with ``!`` and a hash
    of the whole id: distinct ids stay distinct (encodings never hold a bare ``!``, so a cut key
    never equals a readable one), and the full id is in the results table.
    """
    parts = [quote(c, safe="-_") for c in row_id]  # one per character: a cut never splits one
    if parts[:1] == ["."]:  # '.' is never encoded by quote: guard a leading dot ('..' included)
        parts[0] = "%2E"
    key = "".join(parts)
    if len(key) <= MAX_KEY_BYTES:  # ASCII: bytes and characters are one
        return key
    digest = hashlib.sha256(row_id.encode()).hexdigest()[:32]
    budget, head = MAX_KEY_BYTES - len(digest) - 1, []
    for part in parts:
        budget -= len(part)
        if budget < 0:
            break
        head.append(part)
    return f"{''.join(head)}!{digest}"


def _finished_parquet(infos: list[pafs.FileInfo]) -> list[str]:
    """The finished Parquet files among a listing, in name order: ``*.parquet``, not hidden or
    ``_`` ones (staging files, metadata)."""
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
    )


@dataclass(frozen=True)
class Location:
    """A file or folder anywhere: a local path or any fsspec/pyarrow URI, with the S3-compatible
    endpoint that reaches it (None: ``AWS_ENDPOINT_URL``, read where it is used). ``loc / "a"``
    is the location of ``a`` under it."""

    uri: str
    endpoint_url: str | None = None

    def __truediv__(self, part: str) -> Location:
        return Location(join(self.uri, part), self.endpoint_url)

    def __str__(self) -> str:
        return self.uri

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the path inside it."""
        return arrow_filesystem(self.uri, self.endpoint_url)

    def storage_options(self) -> dict:
        """fsspec options to open it."""
        return storage_options(self.uri, self.endpoint_url)

    def write_bytes(self, data: bytes) -> None:
        """Write one object, all or nothing: an object store's PUT is atomic; a local file is
        written beside its final name (hidden, ``.tmp``: no reader lists it) and renamed into
        place, so a killed writer never leaves a partial file that looks finished."""
        fs, path = self.filesystem()
        if isinstance(fs, pafs.LocalFileSystem):
            folder, name = os.path.split(path)
            os.makedirs(folder, exist_ok=True)
            staging = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
            with open(staging, "wb") as f:
                f.write(data)
            os.replace(staging, path)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)

    def read_bytes(self) -> bytes:
        """One object's bytes; FileNotFoundError if there is none."""
        fs, path = self.filesystem()
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(self.uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def parquet_files(self) -> list[str]:
        """The finished Parquet files under a folder (none if it does not exist), as paths inside
        its filesystem; hidden staging files are not finished ones."""
        fs, path = self.filesystem()
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return _finished_parquet(fs.get_file_info(pafs.FileSelector(path, recursive=True)))

    def parquet_input(self) -> tuple[list[str], list[str]]:
        """What a reader takes of a Parquet file or folder given as input, as paths inside its
        filesystem: the file itself, or the folder's finished ``*.parquet`` files in name order;
        and the folder's other files, which it skips (``_SUCCESS``, ``.crc`` files, a
        ``README.txt``). FileNotFoundError if nothing is there."""
        fs, path = self.filesystem()
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.File:
            return [path], []
        if kind != pafs.FileType.Directory:
            raise FileNotFoundError(self.uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = _finished_parquet(infos)
        taken = set(files)
        return files, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path not in taken)

    def read_columns(self, columns: list[str]) -> pa.Table | None:
        """Some columns of the Parquet files under a folder as one table, or None if there are none."""
        files = self.parquet_files()
        if not files:
            return None
        return pq.ParquetDataset(files, filesystem=self.filesystem()[0]).read(columns=columns)

    def delete(self, paths: list[str]) -> None:
        """Delete files given as paths inside this location's filesystem."""
        fs, _ = self.filesystem()
        for path in paths:
            fs.delete_file(path)
