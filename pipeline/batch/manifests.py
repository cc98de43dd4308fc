"""Manifests, from the driver to the read tasks: found and checked on the driver (files, columns,
ids), read row group by row group (a Ray task each), and each row validated and its image read and
decoded (CPU tasks) before stage 1.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch.config import RunConfig
from pipeline.batch.rows import row_by_row, table_of
from pipeline.errors import InputError, PTIError
from pipeline.faults import failpoint
from pipeline.io.fetch import READ_ATTEMPTS, READ_TIMEOUT_S
from pipeline.io.images import read_image
from pipeline.io.storage import Location, is_allowed
from schemas import errors as err
from schemas import manifest as man
from schemas.stages import PIXELS, PREPARED_SCHEMA

log = logging.getLogger(__name__)


class Manifest(NamedTuple):
    """A manifest checked on the driver: the types its rows are read as, its row groups (each a
    file's path, group and the manifest row it starts at) and its ids in manifest order."""

    schema: pa.Schema
    parts: list[dict]
    ids: list

    @property
    def duplicates(self) -> set:
        return man.duplicated_ids(self.ids)


def parquet_input(location: Location, what: str) -> list[tuple[str, str, pq.FileMetaData]]:
    """The Parquet files of an input file or folder: each one's path in its filesystem, its name
    for people and its footer. Other files in a folder are skipped, with a log line; a missing
    path, a folder without Parquet files or a file that is not Parquet is an ``InputError``."""
    fs, base = location.filesystem()
    try:
        paths, skipped = location.parquet_input()
    except FileNotFoundError:
        raise InputError(f"{what} {location}: no such file or folder") from None
    except OSError as exc:
        raise InputError(f"{what} {location}: cannot be listed: {exc}") from None
    names = [posixpath.relpath(p, base) for p in skipped]
    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    if not paths:
        only = f", only {listed}" if names else ""
        raise InputError(f"{what} {location}: no *.parquet files in this folder{only}")
    if names:
        log.info("%s %s: skipping files not named *.parquet: %s", what, location, listed)

    def opened(path: str) -> tuple[str, str, pq.FileMetaData]:
        name = location.uri if path == base else (location / posixpath.relpath(path, base)).uri
        try:
            return path, name, pq.read_metadata(path, filesystem=fs)
        except pa.ArrowInvalid as exc:
            reason = str(exc).split(". ")[0]
            raise InputError(f"{what} {name} is not a Parquet file ({reason})") from None
        except OSError as exc:
            raise InputError(f"{what} {name}: cannot be read: {exc}") from None

    with ThreadPoolExecutor(8) as pool:  # a request per file: an object store answers them at once
        return list(pool.map(opened, paths))


def check_manifest(config: RunConfig) -> Manifest:
    """Find, open and check the manifest on the driver, before any Ray Data work: every problem with
    its files or columns is one ``InputError`` naming the file. Only ids are read."""
    if not config.manifest:
        raise InputError("no manifest given: set manifest in the config or pass --manifest")
    location = config.manifest_location
    fs, base = location.filesystem()
    files = parquet_input(location, "manifest")
    fields: dict[str, pa.Field] = {}
    problems = []
    for path, _, footer in files:
        schema = footer.schema.to_arrow_schema()
        found = man.schema_problems(schema)
        for f in man.read_schema(schema) if not found else ():
            if fields.setdefault(f.name, f).type != f.type:
                found.append(f"column {f.name!r} is {f.type} here but {fields[f.name].type} in other files")
        # In a folder, each problem names its file.
        problems += found if path == base else [f"{posixpath.relpath(path, base)}: {p}" for p in found]
    if problems:
        raise InputError(f"manifest {config.manifest}: " + "; ".join(problems))

    def ids_of(path: str) -> list:
        column = pq.read_table(path, columns=[man.ID], filesystem=fs).column(man.ID)
        return column.cast(pa.string()).to_pylist()  # a categorical's values

    with ThreadPoolExecutor(8) as pool:
        per_file = list(pool.map(ids_of, [path for path, _, _ in files]))
    parts, ids = [], []
    for (path, _, footer), file_ids in zip(files, per_file):
        first = len(ids)
        for group in range(footer.num_row_groups):
            parts.append({"path": path, "row_group": group, "first_row": first})
            first += footer.row_group(group).num_rows
        ids += file_ids
    return Manifest(pa.schema(list(fields.values())), parts, ids)


def read_manifest_part(parts: pa.Table, *, location: Location, schema: pa.Schema) -> pa.Table:
    """Row groups of a manifest's files (a Ray task) as ``schema``, each row with its place in the
    manifest (``schemas.errors.ROW``): files in name order, rows in file order, so the same
    manifest numbers its rows the same in every run."""
    fs, _ = location.filesystem()
    tables = []
    for path, group, first in zip(*(parts.column(c).to_pylist() for c in ("path", "row_group", "first_row"))):
        with fs.open_input_file(path) as f:
            source = pq.ParquetFile(f)
            names = [n for n in schema.names if n in source.schema_arrow.names]
            table = man.typed(source.read_row_group(group, columns=names), schema)
        rows = pa.array(range(first, first + len(table)), pa.int64())
        tables.append(table.append_column(pa.field(err.ROW, pa.int64()), rows))
    return pa.concat_tables(tables)


def read_manifest(config: RunConfig, manifest: Manifest):
    """The checked manifest's rows as a Ray dataset."""
    import ray

    location = config.manifest_location
    # A read task per row group (a block each); batch_size=None (the whole block) also keeps Ray
    # from fusing this read with _spread's repartition, which would put every row back into one
    # block for the actors (see _spread).
    return ray.data.from_items(manifest.parts, override_num_blocks=max(1, len(manifest.parts))).map_batches(
        read_manifest_part,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=dict(location=location, schema=manifest.schema),
    )


# --- the read stage: validate rows, fetch and decode images (CPU tasks) ----------------------------


@row_by_row(err.READ, lambda **_: PREPARED_SCHEMA)
def prepare_rows(
    table: pa.Table,
    *,
    resolution: int,
    duplicates: set,
    endpoint_url: str | None,
    allowed: tuple[str, ...],
    max_bytes: int,
    max_pixels: int,
    etas: tuple[float, ...],
    skip=frozenset(),
    read_timeout_s: float = READ_TIMEOUT_S,
    read_attempts: int = READ_ATTEMPTS,
) -> pa.Table:
    """Validate manifest rows and decode their images to ``resolution``; bad rows become errors.
    An image URI outside the ``allowed`` prefixes is refused unread. Good rows whose ids are in
    ``skip`` (tuned by an earlier run) are dropped: a tuned row is checked as every row is. A row
    without etas gets ``etas`` (the config's)."""
    failpoint(err.READ)
    good, out = man.validate_rows(table.to_pylist(), duplicates, etas=etas)
    good = [row for row in good if row[man.ID] not in skip]
    for row in good:
        row_id, image = row[man.ID], row[man.IMAGE]
        name = f"{row_id}: {image if isinstance(image, str) else '<bytes>'}"
        if isinstance(image, str) and not is_allowed(image, allowed):
            message = (
                f"image {name!r}: outside the allowed prefixes ({', '.join(allowed)}); "
                "list its prefix in allowed_image_prefixes to read it"
            )
            out.append(err.error_of(row, err.READ, "not_allowed", message))
            continue
        options = Location(image, endpoint_url).storage_options() if isinstance(image, str) else {}
        try:
            image = read_image(
                image,
                resolution,
                name=name,
                storage_options=options,
                max_bytes=max_bytes,
                max_pixels=max_pixels,
                timeout_s=read_timeout_s,
                attempts=read_attempts,
            )
        except PTIError as exc:
            kind = getattr(exc, "kind", "bad_image")
            out.append(err.error_of(row, err.READ, kind, str(exc)))
            continue
        kept = {k: row.get(k) for k in PREPARED_SCHEMA.names if k in row}
        out.append({**kept, PIXELS: np.asarray(image, dtype=np.uint8).tobytes()})
    return table_of(out, PREPARED_SCHEMA)
