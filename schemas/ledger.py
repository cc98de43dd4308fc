"""The nightly job's ledger: one row per manifest it processed, written only once that manifest's
run succeeded, so a manifest without a row is taken again by the next night (or a re-run)."""

from __future__ import annotations

import pyarrow as pa

MANIFEST = "manifest"  # the manifest's URI, normalized (pipeline.io.storage.normalize_uri)
RUN_ID = "run_id"  # the night that processed it
OUTPUT = "output"  # where its embeddings, images, results and errors are
FINISHED_AT = "finished_at"
ROWS_IN = "rows_in"
ROWS_DONE = "rows_done"
ROWS_FAILED = "rows_failed"  # rows in the errors table
EDITS = "edits"  # rows in the results table
SECONDS = "seconds"  # the last attempt's job time
ROWS_PER_SECOND = "rows_per_second"  # rows the last attempt did, per second
GPUS = "gpus"  # GPUs the job's actors held: gpus_per_actor x (tune_actors + edit_actors)

LEDGER_SCHEMA = pa.schema(
    [
        pa.field(MANIFEST, pa.string(), nullable=False),
        pa.field(RUN_ID, pa.string(), nullable=False),
        pa.field(OUTPUT, pa.string(), nullable=False),
        pa.field(FINISHED_AT, pa.timestamp("s", tz="UTC"), nullable=False),
        pa.field(ROWS_IN, pa.int64(), nullable=False),
        pa.field(ROWS_DONE, pa.int64(), nullable=False),
        pa.field(ROWS_FAILED, pa.int64(), nullable=False),
        pa.field(EDITS, pa.int64(), nullable=False),
        pa.field(SECONDS, pa.float64(), nullable=False),
        pa.field(ROWS_PER_SECOND, pa.float64(), nullable=False),
        pa.field(GPUS, pa.float64(), nullable=False),
    ]
)
