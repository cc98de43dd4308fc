"""Rows between the batch stages: Arrow tables built column-wise, and the error columns
(``schemas.errors``) that let a row that failed flow on to the driver, skipped by later stages,
so every input row ends in the results or the errors table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas import errors as err


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
    """``table`` plus ``extra`` columns, in ``schema``'s order; fields neither has are null.
    Column-wise, so tensor columns never pass through Python objects."""
    columns = []
    for f in schema:
        if f.name in extra:
            columns.append(pa.array(extra[f.name], type=f.type))
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
