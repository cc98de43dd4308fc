"""The manifest a user submits, and how its rows are checked (bad ones become ``schemas.errors`` rows).

A manifest row: ``id`` (unique string), ``image`` (a URI string, or raw bytes in a binary column),
``source_prompt`` (nullable), ``target_prompts`` (list of strings; a single ``target_prompt``
string column is accepted too), optional per-row overrides ``eta`` (list of floats),
``guidance`` (float) and ``seed`` (int: accepted, and shapes nothing, as the config's does not:
both stages are deterministic), and optional ``instructions``: an instruction-style text
per target prompt ("make it a cat"; null where there is none), which the results and the
training set carry beside the target prompt.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from schemas.errors import ROW, VALIDATE, error_row

ID = "id"
IMAGE = "image"
SOURCE_PROMPT = "source_prompt"
TARGET_PROMPTS = "target_prompts"
TARGET_PROMPT = "target_prompt"  # accepted on input, turned into TARGET_PROMPTS
ETA = "eta"
GUIDANCE = "guidance"
SEED = "seed"
# Attention control (ALGORITHM.md, stage 2b), when the config turns it on: per-row words.
BLEND_WORDS = "blend_words"  # local blend on these words (default: the words the prompts do not share)
REWEIGHT = "reweight"  # word -> factor on its cross-attention in the edits
INSTRUCTIONS = "instructions"  # one instruction (or null) per target prompt, in their order

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.string(), nullable=False),  # or pa.binary() / pa.large_binary()
        pa.field(SOURCE_PROMPT, pa.string()),
        pa.field(TARGET_PROMPTS, pa.list_(pa.string()), nullable=False),
        pa.field(ETA, pa.list_(pa.float64())),
        pa.field(GUIDANCE, pa.float64()),
        pa.field(SEED, pa.int64()),
        pa.field(BLEND_WORDS, pa.list_(pa.string())),
        pa.field(REWEIGHT, pa.map_(pa.string(), pa.float64())),
        pa.field(INSTRUCTIONS, pa.list_(pa.string())),
    ]
)


# All null is fine: not given.
OPTIONAL = (SOURCE_PROMPT, ETA, GUIDANCE, SEED, BLEND_WORDS, REWEIGHT, INSTRUCTIONS)


def _decoded(t: pa.DataType) -> pa.DataType:
    """A dictionary type (pandas writes a categorical column so) as the type of its values."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_string(t: pa.DataType) -> bool:
    t = _decoded(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_binary(t: pa.DataType) -> bool:
    t = _decoded(t)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _is_list_of(t: pa.DataType, check) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and check(t.value_type)


EXPECTED = {  # column -> (what it must be, check)
    ID: ("a string", _is_string),
    IMAGE: ("a string URI or binary", lambda t: _is_string(t) or _is_binary(t)),
    SOURCE_PROMPT: ("a string", _is_string),
    TARGET_PROMPTS: ("a list of strings", lambda t: _is_list_of(t, _is_string)),
    TARGET_PROMPT: ("a string", _is_string),
    ETA: ("a list of numbers", lambda t: _is_list_of(t, _is_number)),
    GUIDANCE: ("a number", _is_number),
    SEED: ("an integer", pa.types.is_integer),
    BLEND_WORDS: ("a list of strings", lambda t: _is_list_of(t, _is_string)),
    REWEIGHT: (
        "a map of word to number",
        lambda t: pa.types.is_map(t) and _is_string(t.key_type) and _is_number(t.item_type),
    ),
    INSTRUCTIONS: ("a list of strings", lambda t: _is_list_of(t, _is_string)),
}


def schema_problems(schema: pa.Schema) -> list[str]:
    """Every problem with a manifest's columns, so a bad manifest is rejected up front at once.
    Columns as pandas writes them pass: a categorical (dictionary) column as its values, an
    optional column with no value at all (Arrow's ``null`` type) as not given."""
    problems = []
    names = set(schema.names)
    for required in (ID, IMAGE):
        if required not in names:
            problems.append(f"missing column {required!r}")
    if TARGET_PROMPTS not in names and TARGET_PROMPT not in names:
        problems.append(f"missing column {TARGET_PROMPTS!r} (or a single {TARGET_PROMPT!r})")
    optional = (*OPTIONAL, TARGET_PROMPT) if TARGET_PROMPTS in names else OPTIONAL
    for field in schema:
        if field.name not in EXPECTED or (field.name in optional and pa.types.is_null(field.type)):
            continue
        what, check = EXPECTED[field.name]
        if not check(_decoded(field.type)):
            problems.append(f"column {field.name!r} must be {what}, got {field.type}")
    return problems


def read_schema(schema: pa.Schema) -> pa.Schema:
    """The types the stages read a manifest's columns as (only those of ``EXPECTED``, all
    nullable): ``MANIFEST_SCHEMA``'s, ``target_prompt`` a string, ``image`` a string or binary as
    given. For a manifest with no ``schema_problems``."""
    types = {f.name: f.type for f in MANIFEST_SCHEMA} | {TARGET_PROMPT: pa.string()}
    if IMAGE in schema.names and _is_binary(schema.field(IMAGE).type):
        types[IMAGE] = pa.binary()
    return pa.schema([pa.field(f.name, types[f.name]) for f in schema if f.name in EXPECTED])


def typed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Manifest rows as ``schema`` (from ``read_schema``): dictionary columns decoded, null-typed
    ones typed, large types made plain, numbers widened; a column ``table`` lacks is null."""
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


# --- The rules of the values a row may set. ``PTIConfig`` checks its own fields with these same
# functions (it imports them from here, the lowest layer), so a value a row overrides is refused by
# the one rule that refuses it in a config. Each returns the problem, or None.


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _word(value) -> bool:
    """A word to match in a prompt, which attention control splits on whitespace."""
    return isinstance(value, str) and value.split() == [value]


def eta_problem(eta) -> str | None:
    """An interpolation weight: a number in [0, 1] (the config's ``etas``, a row's ``eta``)."""
    if not (_real(eta) and 0.0 <= eta <= 1.0):  # also refuses NaN
        return f"eta must be in [0, 1], got {eta!r}"
    return None


def guidance_problem(guidance) -> str | None:
    """The classifier-free guidance weight w: a finite number >= 0."""
    if not (_real(guidance) and math.isfinite(guidance) and guidance >= 0):
        return f"guidance must be a finite number >= 0, got {guidance!r}"
    return None


def reweight_problem(factors: dict) -> str | None:
    """Words to factors on their cross-attention: each a word (no spaces) to a finite number >= 0."""
    bad = {w: f for w, f in factors.items() if not (_word(w) and _real(f) and math.isfinite(f) and f >= 0)}
    if bad:
        return f"reweight must map words (no spaces) to finite numbers >= 0, got {bad!r}"
    return None


def blend_words_problem(words) -> str | None:
    """Words of local blend: each a word (no spaces), as prompts are split into words."""
    bad = [w for w in words if not _word(w)]
    if bad:
        return f"blend words must be words (non-empty, no spaces), got {bad!r}"
    return None


def instructions_problem(instructions, targets) -> str | None:
    """Instructions of a row's targets: one per target prompt, each a non-empty text or null."""
    if len(instructions) != len(targets):
        return f"instructions must give one per target prompt ({len(targets)}), got {len(instructions)}"
    if any(i is not None and not str(i).strip() for i in instructions):
        return "an instruction is empty (null: the target has none)"
    return None


def instruction(row: dict, target_index: int) -> str | None:
    """The instruction a row gives for one of its targets, or None."""
    instructions = row.get(INSTRUCTIONS)
    return instructions[target_index] if instructions else None


def uri_problem(uri: str) -> str | None:
    """Why an image URI cannot name anything, or None: a NUL byte, or a URL that does not parse
    (``http://[::1/x.png``, a port out of range). Whether it may be read is the read stage's."""
    if "\x00" in uri:
        return f"image URI {uri!r} holds a NUL byte"
    try:
        uri.encode("utf-8")
        urlsplit(uri).port  # noqa: B018 (parses the netloc's port)
    except ValueError as exc:  # UnicodeEncodeError (a lone surrogate) is one
        return f"image URI {uri!r} does not parse: {exc}"
    return None


def row_problems(row: dict, duplicates: set) -> list[tuple[str, str]]:
    """``(kind, message)`` for each problem of one manifest row; ``duplicates`` holds the ids
    that appear more than once in the whole manifest."""
    problems = []
    row_id = row.get(ID)
    if row_id is None or not str(row_id).strip():
        problems.append(("bad_id", "id is empty"))
    elif row_id in duplicates:
        problems.append(("duplicate_id", f"id {row_id!r} appears more than once in the manifest"))
    image = row.get(IMAGE)
    if image in (None, "", b""):
        problems.append(("bad_image", "image is empty"))
    elif isinstance(image, str) and uri_problem(image):
        problems.append(("bad_uri", uri_problem(image)))
    targets = row.get(TARGET_PROMPTS)
    if targets is None and TARGET_PROMPT in row:
        targets = [] if row[TARGET_PROMPT] is None else [row[TARGET_PROMPT]]
    if not targets:
        problems.append(("no_targets", "the target prompt list is empty"))
    elif any(t is None or not str(t).strip() for t in targets):
        problems.append(("empty_target", "a target prompt is empty"))
    etas, guidance, instructions = row.get(ETA) or [], row.get(GUIDANCE), row.get(INSTRUCTIONS)
    overrides = [  # (kind, problem) of each value the row sets over the config's
        *(("bad_eta", eta_problem(eta)) for eta in etas),
        ("bad_guidance", None if guidance is None else guidance_problem(guidance)),
        ("bad_reweight", reweight_problem(dict(row.get(REWEIGHT) or []))),  # Arrow maps: (key, value) pairs
        ("bad_blend_words", blend_words_problem(row.get(BLEND_WORDS) or [])),
        ("bad_instructions", instructions and targets and instructions_problem(instructions, targets)),
    ]
    problems += [(kind, problem) for kind, problem in overrides if problem]
    for name, same in same_etas(etas).items():
        listed = ", ".join(repr(e) for e in same)
        problems.append(
            (
                "duplicate_eta",
                f"etas {listed} are one eta at the precision of image names ({name}): list it once",
            )
        )
    return problems


def eta_name(eta: float) -> str:
    """An eta as output file names write it (``images/{id}/{target_index}-{eta}.png``), and as
    resuming matches an edit to the results table's: at float32 (what that table stores), to 6
    significant digits. One name for all three, so two etas are one edit exactly when they write
    one file (``duplicate_eta`` refuses a row that lists both)."""
    return f"{float(np.float32(eta)):g}"


def same_etas(etas) -> dict[str, list[float]]:
    """The etas of one row that share a file name (``0.3`` and ``0.3000001`` both write ``0.3``),
    by that name: each pair would make one image twice, the second over the first."""
    by_name: dict[str, list[float]] = {}
    for eta in etas:
        if not eta_problem(eta):
            by_name.setdefault(eta_name(eta), []).append(eta)
    return {name: same for name, same in by_name.items() if len(same) > 1}


def duplicated_ids(ids) -> set:
    """The ids that appear more than once."""
    return {i for i, n in Counter(ids).items() if n > 1}


def validate_rows(
    rows: list[dict], duplicates: set | None = None, stage: str = VALIDATE, etas: Sequence[float] = ()
) -> tuple[list[dict], list[dict]]:
    """Split manifest rows into usable ones and error rows. A usable row has its ``target_prompts``
    (from a ``target_prompt`` column too) and its ``eta`` (``etas``, the config's, where it lists
    none): every later step reads them from the row.

    Every bad row is reported, each with all of its problems; every copy of a duplicated id is an
    error, since none of them can be told apart in the outputs. A row whose etas repeat at the
    precision of their file names (``[0.5, 0.5]``, ``[0.3, 0.3000001]``) is refused too
    (``duplicate_eta``, naming the etas), not merged: which one it meant is the user's to say.
    ``duplicates`` comes from the whole manifest (``duplicated_ids``); by default, from these rows.
    An error names the row's place in the manifest (``schemas.errors.ROW``, which rows read by the
    batch job carry), or else its place in ``rows``.
    """
    if duplicates is None:
        duplicates = duplicated_ids(r.get(ID) for r in rows)
    good, errors = [], []
    for position, row in enumerate(rows):
        try:
            problems = row_problems(row, duplicates)
        except Exception as exc:  # noqa: BLE001 (a value no check foresaw: this row's error, not the job's)
            problems = [("internal", f"the row cannot be checked: {type(exc).__name__}: {exc}")]
        if problems:
            message = "; ".join(m for _, m in problems)
            place = row.get(ROW, position)
            errors.append(error_row(row.get(ID), stage, problems[0][0], message, row=place))
            continue
        if row.get(TARGET_PROMPTS) is None:
            row = {**row, TARGET_PROMPTS: [row[TARGET_PROMPT]]}
        if not row.get(ETA) and etas:
            row = {**row, ETA: list(etas)}
        good.append(row)
    return good, errors
