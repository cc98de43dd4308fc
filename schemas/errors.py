"""The errors table: one row per input row that failed (per image, at the edit stage), and the
error columns that rows carry between the batch stages until the driver writes them there."""

from __future__ import annotations

import pyarrow as pa

ID = "id"  # null when the row had no usable id
ROW = "row"  # position in its manifest (0-based, files in name order); null for no manifest row
STAGE = "stage"  # one of STAGES
KIND = "kind"  # one of KINDS (README, "Bad input")
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

# Every kind an error row may have, and what it means. A row's first problem names its kind; its
# message lists them all, with the value and what is allowed.
KINDS = {
    # validate: the manifest row itself
    "bad_id": "the id is empty",
    "duplicate_id": "the id appears more than once (every copy fails)",
    "bad_image": "the image is empty, or its bytes are not a usable image (read)",
    "bad_uri": "the image URI does not parse (a NUL byte, a broken host or port)",
    "no_targets": "the target prompt list is empty",
    "empty_target": "a target prompt is empty",
    "bad_eta": "an eta is not a number in [0, 1]",
    "duplicate_eta": "two etas write the same image name",
    "bad_guidance": "guidance is not a finite number >= 0",
    "bad_reweight": "reweight does not map words to finite numbers >= 0",
    "bad_blend_words": "a blend word is empty or holds a space",
    "bad_instructions": "instructions do not give one text (or null) per target prompt, or one is empty",
    # read: the image
    "not_allowed": "the image URI is outside the allowed prefixes (refused unread)",
    "not_found": "no image at the URI",
    "access_denied": "the store refused to serve the image",
    "read_failed": "a storage error still there after the retries, or no answer in time",
    "too_large": "over max_image_bytes or max_image_pixels",
    # tune and edit: the model's work
    "non_finite": "the model produced NaN or inf for this row (or this edit)",
    "out_of_memory": "a single image or edit that does not fit on the device",
    "bad_control": "attention control that cannot be planned for this target",
    "no_embeddings": "jobs.edit: no stored embeddings for the id",
    "bad_input": "any other input the engine refused, with its reason",
    # any stage: the safety net (a bug, or an input nothing foresaw)
    "internal": "an unexpected exception for this row alone; the message names it",
}

# In flight: every row between stages carries these: its manifest row, and its error (null while
# the row is good), so the errors table can tell apart rows that share an id.
ERROR_FIELDS = [
    pa.field(ROW, pa.int64()),
    pa.field(STAGE, pa.string()),
    pa.field(KIND, pa.string()),
    pa.field(MESSAGE, pa.string()),
]


# The stages, in a row's order: its values checked, its image read, tuned, each edit made and written.
VALIDATE, READ, TUNE, EDIT, WRITE = STAGES = ("validate", "read", "tune", "edit", "write")


def fails_one_edit(stage: str) -> bool:
    """Whether an error of this stage is one edit's (made or written): the row's other edits
    may be done, so the row is done if any edit of it is. Errors of the earlier stages are the
    whole row's."""
    return stage in (EDIT, WRITE)


def error_row(row_id, stage: str, kind: str, message: str, row: int | None = None) -> dict:
    """One row of the errors table (and the error columns of a row in flight)."""
    return {ID: row_id, ROW: row, STAGE: stage, KIND: kind, MESSAGE: message}


def error_of(row: dict, stage: str, kind: str, message: str) -> dict:
    """``error_row`` of a row in flight: its id, and its manifest row where it has one."""
    return error_row(row.get(ID), stage, kind, message, row=row.get(ROW))
