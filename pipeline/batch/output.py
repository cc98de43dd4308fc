"""A batch job's output: one prefix, and where each of its parts lies under it (README, "Outputs");
and the rolling Parquet writer of its results and errors tables."""

from __future__ import annotations

import io
import posixpath
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.faults import failpoint
from pipeline.io.storage import Location, key_for_id
from schemas.manifest import eta_name


def image_key(row_id: str, target_index: int, eta: float) -> str:
    """``images/{id}/{target_index}-{eta}.png`` with the id safely encoded: one folder name of at
    most 255 bytes (a long id is cut and ends with a hash of it), so the whole key stays far
    under S3's 1,024 bytes beside any reasonable output prefix."""
    return f"images/{key_for_id(row_id)}/{target_index}-{eta_name(eta)}.png"


@dataclass(frozen=True)
class Output:
    """``root`` and its parts: ``embeddings/`` (or another location of stored stage-1 rows),
    ``results/``, ``errors/``, ``images/``, ``contact_sheet.png``, and each job's
    ``config-{job}.yaml`` and ``summary-{job}.json``."""

    root: Location
    embeddings: Location

    @classmethod
    def at(cls, uri: str, endpoint_url: str | None = None, embeddings: str | None = None) -> Output:
        root = Location(uri, endpoint_url)
        return cls(root, Location(embeddings, endpoint_url) if embeddings else root / "embeddings")

    @property
    def results(self) -> Location:
        return self.root / "results"

    @property
    def errors(self) -> Location:
        return self.root / "errors"

    @property
    def images(self) -> Location:
        return self.root / "images"

    @property
    def lock(self) -> Location:
        """The lease of the job writing this output (``pipeline.batch.lock``)."""
        return self.root / "_lock"

    @property
    def contact_sheet(self) -> Location:
        """``jobs.run``'s picture of its first edits (``pipeline.batch.report``)."""
        return self.root / "contact_sheet.png"

    def config_file(self, job: str) -> Location:
        return self.root / f"config-{job}.yaml"

    def summary_file(self, job: str) -> Location:
        return self.root / f"summary-{job}.json"

    def image(self, row_id: str, target_index: int, eta: float) -> Location:
        return self.root / image_key(row_id, target_index, eta)


class RollingParquet:
    """Parquet files of at most ``rows_per_file`` rows under ``folder``, written as rows stream in,
    and at least every ``flush_seconds``, so a killed driver loses little committed work. File
    names carry ``prefix`` (the job and this attempt): a resumed run adds files, never
    overwrites an earlier attempt's."""

    def __init__(
        self,
        folder: Location,
        schema: pa.Schema,
        rows_per_file: int,
        prefix: str,
        flush_seconds: float = float("inf"),
    ):
        self.folder, self.schema, self.limit = folder, schema, rows_per_file
        self.prefix, self.flush_seconds, self.flushed_at = prefix, flush_seconds, time.monotonic()
        self.pending: list[pa.Table] = []
        self.pending_rows = self.files = self.rows = 0

    def add(self, table: pa.Table) -> None:
        if len(table):
            self.pending.append(table.select(self.schema.names).cast(self.schema))
            self.pending_rows += len(table)
            self.rows += len(table)
        while self.pending_rows >= self.limit:
            self._flush(self.limit)
        if self.pending_rows and time.monotonic() - self.flushed_at >= self.flush_seconds:
            self._flush(self.pending_rows)

    def close(self) -> None:
        while self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        head, rest = table.slice(0, n), table.slice(n)
        buffer = io.BytesIO()
        pq.write_table(head, buffer)
        (self.folder / f"{self.prefix}-{self.files:05d}.parquet").write_bytes(buffer.getvalue())
        self.files += 1
        self.flushed_at = time.monotonic()
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        failpoint(f"driver-after-{posixpath.basename(self.folder.uri.rstrip('/'))}")
