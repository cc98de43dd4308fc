"""The errors table: one row per input row that failed (per image, at the edit stage), and the
error columns that rows carry between the batch stages until the driver writes them there."""

from __future__ import annotations

import pyarrow as pa

ID = "id"  # null when the row had no usable id
ROW = "row"  # position in its manifest (0-based, files in name order); null for no manifest row
STAGE = "stage"  # validate, read, tune, edit
KIND = "kind"  # e.g. duplicate_id, bad_image, not_found, non_finite (README, "Bad input")
MESSAGE = "message"

ERRORS_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(ROW, pa.int64()),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(KIND, pa.string(), nullable=False),
        pa.field(MESSAGE, pa.string(), nullable=False),
    ]
)

# In flight: every row between stages carries these: its manifest row, and its error (null while
# the row is good), so the errors table can tell apart rows that share an id.
ERROR_FIELDS = [
    pa.field(ROW, pa.int64()),
    pa.field(STAGE, pa.string()),
    pa.field(KIND, pa.string()),
    pa.field(MESSAGE, pa.string()),
]


def error_row(row_id, stage: str, kind: str, message: str, row: int | None = None) -> dict:
    """One row of the errors table (and the error columns of a row in flight)."""
    return {ID: row_id, ROW: row, STAGE: stage, KIND: kind, MESSAGE: message}
