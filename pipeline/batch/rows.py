"""Rows between the batch stages: Arrow tables built column-wise, and the error columns
(``schemas.errors``) that let a row that failed flow on to the driver, skipped by later stages,
so every input row ends in the results or the errors table."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError, NonFiniteError
from schemas import errors as err

log = logging.getLogger(__name__)


def table_of(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows to a table; fields a row lacks are null (column-wise, so extension types work)."""
    columns = {}
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if isinstance(f.type, pa.ExtensionType) and all(v is None for v in values):
            storage = pa.nulls(len(rows), f.type.storage_type)
            columns[f.name] = pa.ExtensionArray.from_storage(f.type, storage)
        elif isinstance(f.type, pa.ExtensionType):
            columns[f.name] = values
        else:
            columns[f.name] = pa.array(values, type=f.type)
    return pa.Table.from_pydict(columns, schema=schema)


def conform(table: pa.Table, schema: pa.Schema, extra: dict[str, list]) -> pa.Table:
    """``table`` plus ``extra`` columns (lists, or Arrow arrays as they are), in ``schema``'s
    order; fields neither has are null. Column-wise, so tensor columns never pass through Python
    objects."""
    columns = []
    for f in schema:
        if f.name in extra:
            value = extra[f.name]
            columns.append(value if isinstance(value, pa.Array) else pa.array(value, type=f.type))
        elif f.name in table.column_names:
            columns.append(table.column(f.name).combine_chunks())
        elif isinstance(f.type, pa.ExtensionType):
            columns.append(pa.ExtensionArray.from_storage(f.type, pa.nulls(len(table), f.type.storage_type)))
        else:
            columns.append(pa.nulls(len(table), f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def good_rows(table: pa.Table) -> np.ndarray:
    """Which rows carry no error."""
    return np.asarray(table.column(err.KIND).is_null().to_pylist(), dtype=bool)


def worker_id() -> str:
    """The Ray actor (or task) running this: the results table says which did each piece of work."""
    import ray

    context = ray.get_runtime_context()
    return context.get_actor_id() or context.get_task_id() or "driver"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (CUDA's, or another backend's message)."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def failure(exc: BaseException) -> tuple[str, str]:
    """The errors table's ``kind`` and ``message`` for what one row raised: an image's own kind
    (``pipeline.errors.ImageError``), ``non_finite``, ``out_of_memory``, ``bad_input`` for any
    other ``InputError``, and ``internal`` for the unexpected, whose message names its type."""
    if out_of_memory(exc):
        return "out_of_memory", str(exc)
    if isinstance(exc, NonFiniteError):
        return "non_finite", str(exc)
    if isinstance(exc, InputError):
        return getattr(exc, "kind", "bad_input"), str(exc)
    return "internal", f"{type(exc).__name__}: {exc}"


def row_by_row(stage: str, schema):
    """The safety net of a stage's batch function ``fn(..., table)``: a batch that raises runs
    again one row at a time, so a row that raises alone becomes that row's error (``failure``'s
    kind, stage ``stage``; other columns null, in ``schema(...)``'s, given ``fn``'s arguments
    but the table) and its batch's other rows go on. What a stage foresees it handles itself;
    this is for what it does not: one row must never end a job."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            *head, table = args
            try:
                return fn(*head, table, **kwargs)
            except Exception as exc:  # noqa: BLE001 (any row's failure: see above)
                if len(table) > 1:
                    log.warning("%s: a batch of %d rows failed (%s): each runs alone", stage, len(table), exc)
                    alone = [call(*head, table.slice(i, 1), **kwargs) for i in range(len(table))]
                    return pa.concat_tables(alone)
                kind, message = failure(exc)
                log.warning("%s: a row failed (%s): %s", stage, kind, message, exc_info=kind == "internal")
                row = table.select([c for c in (err.ID, err.ROW) if c in table.column_names]).to_pylist()[0]
                error = err.error_row(row.get(err.ID), stage, kind, message, row=row.get(err.ROW))
                return table_of([error], schema(*head, **kwargs))

        return call

    return wrap
