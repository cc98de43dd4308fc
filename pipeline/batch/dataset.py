"""``jobs.dataset``: an output's kept edits as a training set (``schemas/dataset.py``).

The driver reads what is small (the results' keys, scores and verdicts; the stored rows' ids and
prompts), keeps the best kept edits of each (image, target) (``curate.select_best``) and splits them
into files of ``dataset.rows_per_file`` edits, grouped by the embeddings file their inputs lie in.
Each file is one Ray task: it reads its inputs (one column of few embeddings files) and its edits'
PNGs, and writes its Parquet file straight to the store, so no image passes through the driver. The
set is written whole each time (a re-run with other selection settings replaces it); its config and
summary lie beside it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.batch import driver
from pipeline.batch.config import RunConfig
from pipeline.batch.curate import select_best
from pipeline.batch.resume import one_per_key, read_results
from pipeline.errors import InputError
from pipeline.io.images import encode_png
from pipeline.io.storage import Location
from schemas import dataset as ds
from schemas import embeddings as emb
from schemas import results as res

log = logging.getLogger(__name__)

FILE = "_file"  # the embeddings file that holds an edit's input (a path inside its filesystem)
INDEX_THREADS = 16  # embeddings files whose small columns the driver reads at once
RESULT_COLUMNS = [
    res.ID,
    res.TARGET_INDEX,
    res.TARGET_PROMPT,
    res.INSTRUCTION,
    res.ETA,
    res.GUIDANCE,
    res.IMAGE_URI,
    res.CONFIG_FINGERPRINT,
    *res.SCORES,
    res.KEPT,
]


def stored_inputs_index(embeddings: Location) -> pa.Table:
    """id, source prompt, method and model of every stored stage-1 row, with the file that holds
    its input image (the first file in name order, should an id be stored twice). The files are
    read concurrently: a store's reads are latency-bound, and pyarrow's dataset reader does not
    say which file a row came from."""
    fs, _ = embeddings.filesystem()
    columns = [emb.ID, emb.SOURCE_PROMPT, emb.METHOD, emb.MODEL]

    def read(path: str) -> pa.Table:
        part = pq.read_table(path, columns=columns, filesystem=fs)
        return part.append_column(FILE, pa.array([path] * len(part), pa.string()))

    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        parts = list(pool.map(read, sorted(embeddings.parquet_files())))
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in (*columns, FILE)})
    return one_per_key(pa.concat_tables(parts), [emb.ID], "min")


def read_inputs(embeddings: Location, files: list[str], ids: list[str]) -> dict[str, bytes | None]:
    """id -> its stored input as PNG (None for a row stored before inputs were), read from the
    given embeddings files: only their id and image columns, only these ids' rows."""
    fs, _ = embeddings.filesystem()
    inputs = {}
    for path in files:
        names = pq.read_schema(path, filesystem=fs).names
        if emb.IMAGE not in names:
            continue
        wanted = [(emb.ID, "in", ids)]
        table = pq.read_table(path, columns=[emb.ID, emb.IMAGE], filesystem=fs, filters=wanted)
        images = table.column(emb.IMAGE).combine_chunks()
        for k, row_id in enumerate(table.column(emb.ID).to_pylist()):
            pixels = images[k : k + 1].to_numpy_ndarray()[0] if images[k].is_valid else None
            inputs[row_id] = None if pixels is None else encode_png(pixels)
    return inputs


def read_edits(uris: list[str], endpoint_url: str | None) -> list[bytes | None]:
    """The PNGs of edits (None where one is missing), read in one fsspec ``cat``: s3fs fetches
    them concurrently through one client."""
    import fsspec

    if not uris:
        return []
    fs, _ = fsspec.core.url_to_fs(uris[0], **Location(uris[0], endpoint_url).storage_options())
    paths = [fs._strip_protocol(uri) for uri in uris]  # fsspec's own key for each path in cat's answer
    found = fs.cat(paths, on_error="return")
    return [None if isinstance(found[p], Exception) else found[p] for p in paths]


def write_part(
    rows: pa.Table, *, embeddings: Location, to: Location, endpoint_url: str | None
) -> tuple[int, list[str]]:
    """One file of the set: ``rows`` (selected edits with their stored row's prompts and file) with
    both images as PNG bytes, written to ``to``. Returns the rows written, and the URIs of the edits
    left out because their image is gone from the output."""
    ids = sorted(set(rows.column(res.ID).to_pylist()))
    inputs = read_inputs(embeddings, sorted(set(filter(None, rows.column(FILE).to_pylist()))), ids)
    uris = rows.column(res.IMAGE_URI).to_pylist()
    records, missing = [], []
    for row, edit, uri in zip(rows.to_pylist(), read_edits(uris, endpoint_url), uris):
        if edit is None:
            missing.append(uri)
            continue
        instruction = row.get(ds.INSTRUCTION)
        records.append(
            {
                **{name: row[name] for name in ds.VALUES if name in row},
                ds.INPUT_IMAGE: None if inputs.get(row[res.ID]) is None else {"bytes": inputs[row[res.ID]]},
                ds.EDITED_IMAGE: {"bytes": edit, "path": uri},
                ds.EDIT_PROMPT: instruction or row[res.TARGET_PROMPT],
                ds.INSTRUCTION: instruction,
            }
        )
    table = pa.Table.from_pylist(records, schema=ds.dataset_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    to.write_bytes(buffer.getvalue())
    return len(table), missing


def selected_edits(config: RunConfig) -> tuple[pa.Table, dict]:
    """The edits the set takes, each with its stored row's prompt, method, model and file, in the
    order the files hold them; and the counts for the summary."""
    output = config.output_location
    results = read_results(output, RESULT_COLUMNS)
    if results is None:
        raise InputError(f"no results under {output.results}: run jobs.run or jobs.edit on this output first")
    judged = int(pc.sum(results.column(res.KEPT).is_valid()).as_py() or 0)
    if not judged:
        raise InputError(
            f"none of the {len(results)} edits under {output.results} is scored: a training set takes the "
            "kept edits of a run with a scorer (README, Scores)"
        )
    selected = select_best(results, config.dataset)
    index = stored_inputs_index(output.embeddings)
    joined = selected.join(index, keys=res.ID, join_type="left outer")
    order = pc.sort_indices(joined, [(c, "ascending") for c in (FILE, res.ID, res.TARGET_INDEX, ds.RANK)])
    counts = {
        "edits": len(results),
        "scored": judged,
        "kept": int(pc.sum(pc.fill_null(results.column(res.KEPT), False)).as_py() or 0),
        "selected": len(selected),
    }
    return joined.take(order), counts


@driver.job("dataset")
def run_dataset(config: RunConfig, started: float, attempt: str) -> dict:
    """``jobs.dataset``: the output's kept edits, the best ``dataset.best_of`` of each (image,
    target), as Parquet files of a Hugging Face dataset under ``dataset.output``."""
    import ray

    rows, counts = selected_edits(config)
    target = config.dataset_location
    data = target / "data"
    files = max(1, math.ceil(len(rows) / config.dataset.rows_per_file))
    names = [f"train-{k:05d}-of-{files:05d}.parquet" for k in range(files)]
    write = ray.remote(num_cpus=1)(write_part)
    per_file = config.dataset.rows_per_file
    parts = ray.get(
        [
            write.remote(
                rows.slice(k * per_file, per_file),
                embeddings=config.output_location.embeddings,
                to=data / name,
                endpoint_url=config.endpoint_url,
            )
            for k, name in enumerate(names)
        ]
    )
    written, missing = sum(n for n, _ in parts), [uri for _, gone in parts for uri in gone]
    if missing:
        log.warning("dataset: %d edits left out, their images are gone: %s", len(missing), missing[:5])
    stale = [p for p in data.parquet_files() if posixpath.basename(p) not in names]
    data.delete(stale)  # an earlier set's files, once every file of this one is written
    summary = {
        "job": "dataset",
        "output": config.output,
        "dataset": target.uri,
        "seconds": round(time.perf_counter() - started, 3),
        **counts,
        "rows": written,
        "missing_images": len(missing),  # results rows whose image is no longer in the output
        "files": files,
        "best_of": config.dataset.best_of,
        "rank_by": config.dataset.rank_by,
    }
    written_summary = json.dumps(summary, indent=2).encode()
    (target / "config.yaml").write_bytes(config.to_yaml().encode())
    (target / "summary.json").write_bytes(written_summary)
    config.output_location.summary_file("dataset").write_bytes(written_summary)
    log.info("dataset: %d of %d kept edits written to %s, %d file(s)", written, counts["kept"], target, files)
    return summary
