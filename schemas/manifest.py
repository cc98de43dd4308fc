"""The manifest a user submits, and how its rows are checked (bad ones become ``schemas.errors`` rows).

A manifest row: ``id`` (unique string), ``image`` (a URI string, or raw bytes in a binary column),
``source_prompt`` (nullable), ``target_prompts`` (list of strings; a single ``target_prompt``
string column is accepted too), and optional per-row overrides ``eta`` (list of floats),
``guidance`` (float) and ``seed`` (int).
"""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa

from schemas.errors import error_row

ID = "id"
IMAGE = "image"
SOURCE_PROMPT = "source_prompt"
TARGET_PROMPTS = "target_prompts"
TARGET_PROMPT = "target_prompt"  # accepted on input, turned into TARGET_PROMPTS
ETA = "eta"
GUIDANCE = "guidance"
SEED = "seed"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.string(), nullable=False),  # or pa.binary() / pa.large_binary()
        pa.field(SOURCE_PROMPT, pa.string()),
        pa.field(TARGET_PROMPTS, pa.list_(pa.string()), nullable=False),
        pa.field(ETA, pa.list_(pa.float64())),
        pa.field(GUIDANCE, pa.float64()),
        pa.field(SEED, pa.int64()),
    ]
)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list_of(t: pa.DataType, check) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and check(t.value_type)


def schema_problems(schema: pa.Schema) -> list[str]:
    """Every problem with a manifest's columns, so a bad manifest is rejected up front at once."""
    problems = []
    names = set(schema.names)
    for required in (ID, IMAGE):
        if required not in names:
            problems.append(f"missing column {required!r}")
    if TARGET_PROMPTS not in names and TARGET_PROMPT not in names:
        problems.append(f"missing column {TARGET_PROMPTS!r} (or a single {TARGET_PROMPT!r})")
    expect = {
        ID: ("a string", _is_string),
        IMAGE: (
            "a string URI or binary",
            lambda t: _is_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t),
        ),
        SOURCE_PROMPT: ("a string", lambda t: _is_string(t) or pa.types.is_null(t)),
        TARGET_PROMPTS: ("a list of strings", lambda t: _is_list_of(t, _is_string)),
        TARGET_PROMPT: ("a string", _is_string),
        ETA: (
            "a list of numbers",
            lambda t: _is_list_of(t, lambda v: pa.types.is_floating(v) or pa.types.is_integer(v)),
        ),
        GUIDANCE: (
            "a number",
            lambda t: pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t),
        ),
        SEED: ("an integer", lambda t: pa.types.is_integer(t) or pa.types.is_null(t)),
    }
    for field in schema:
        if field.name in expect and not expect[field.name][1](field.type):
            problems.append(f"column {field.name!r} must be {expect[field.name][0]}, got {field.type}")
    return problems


def row_problems(row: dict, duplicates: set) -> list[tuple[str, str]]:
    """``(kind, message)`` for each problem of one manifest row; ``duplicates`` holds the ids
    that appear more than once in the whole manifest."""
    problems = []
    row_id = row.get(ID)
    if row_id is None or not str(row_id).strip():
        problems.append(("bad_id", "id is empty"))
    elif row_id in duplicates:
        problems.append(("duplicate_id", f"id {row_id!r} appears more than once in the manifest"))
    if row.get(IMAGE) in (None, "", b""):
        problems.append(("bad_image", "image is empty"))
    targets = row.get(TARGET_PROMPTS)
    if targets is None and TARGET_PROMPT in row:
        targets = [] if row[TARGET_PROMPT] is None else [row[TARGET_PROMPT]]
    if not targets:
        problems.append(("no_targets", "the target prompt list is empty"))
    elif any(t is None or not str(t).strip() for t in targets):
        problems.append(("empty_target", "a target prompt is empty"))
    for eta in row.get(ETA) or []:
        if eta is None or not (0.0 <= eta <= 1.0) or math.isnan(eta):
            problems.append(("bad_eta", f"eta must be in [0, 1], got {eta}"))
    guidance = row.get(GUIDANCE)
    if guidance is not None and not math.isfinite(guidance):
        problems.append(("bad_guidance", f"guidance must be a finite number, got {guidance}"))
    return problems


def duplicated_ids(ids) -> set:
    """The ids that appear more than once."""
    return {i for i, n in Counter(ids).items() if n > 1}


def validate_rows(
    rows: list[dict], duplicates: set | None = None, stage: str = "validate"
) -> tuple[list[dict], list[dict]]:
    """Split manifest rows into usable ones (``target_prompts`` filled in) and error rows.

    Every bad row is reported, each with all of its problems; every copy of a duplicated id is an
    error, since none of them can be told apart in the outputs. ``duplicates`` comes from the
    whole manifest (``duplicated_ids``); by default, from these rows.
    """
    if duplicates is None:
        duplicates = duplicated_ids(r.get(ID) for r in rows)
    good, errors = [], []
    for position, row in enumerate(rows):
        problems = row_problems(row, duplicates)
        if problems:
            message = "; ".join(m for _, m in problems)
            errors.append(error_row(row.get(ID), stage, problems[0][0], message, row=position))
            continue
        if row.get(TARGET_PROMPTS) is None:
            row = {**row, TARGET_PROMPTS: [row[TARGET_PROMPT]]}
        good.append(row)
    return good, errors
