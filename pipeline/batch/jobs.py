"""The three batch jobs, each read -> map -> map -> write on Ray Data, top to bottom:
``run_tune`` (manifest -> embeddings), ``run_edit`` (embeddings + targets -> edits) and
``run_all`` (both in one streaming pipeline). Resumable: each does only what its output lacks."""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch import driver
from pipeline.batch.config import RunConfig
from pipeline.batch.report import write_contact_sheet
from pipeline.batch.resume import TARGET_COLUMNS, Committed, checked_targets, manifest_targets, read_committed
from pipeline.batch.stages import (
    EditStage,
    TuneStage,
    attach_targets,
    prepare_rows,
    write_embeddings,
    write_images,
)
from pipeline.errors import InputError
from pipeline.io.storage import Location, default_image_prefixes
from schemas import errors as err
from schemas import manifest as man
from schemas import results as res

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


def _spread(ds, rows: int, config: RunConfig):
    """Enough blocks that every actor gets work: a small manifest is one block otherwise. Strict:
    Ray fuses a non-strict repartition into the map before it, whose task then hands all its rows
    on as one block (one actor gets a small manifest's every row)."""
    per_block = max(1, min(config.tune_batch_size, -(-rows // (2 * config.tune_actors))))
    return ds.repartition(target_num_rows_per_block=per_block, strict=True)


def _model(config: RunConfig) -> Location:
    return Location(config.pti.model, config.endpoint_url)


def _on_actors(ds, stage, config: RunConfig, batch_size: int, actors: int, committed: Committed, **kwargs):
    """``stage`` on a pool of ``actors`` actors, each holding one model on ``gpus_per_actor`` GPUs."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        stage,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
        fn_constructor_kwargs=dict(
            config=config.pti,
            model=_model(config),
            cpus=config.cpus_per_actor,
            expect_model=frozenset(committed.model_fingerprints),
            **kwargs,
        ),
    )


def tune(ds, config: RunConfig, rows: int, duplicates: set, committed: Committed):
    """Manifest rows -> read and decoded -> tuned (actor pool) -> embeddings written."""
    from pipeline.engine.models import model_resolution

    model = _model(config)
    resolution = config.pti.resolution or model_resolution(
        config.pti.model, storage_options=model.storage_options()
    )
    read = dict(
        resolution=resolution,
        duplicates=duplicates,
        endpoint_url=config.endpoint_url,
        allowed=tuple(config.allowed_image_prefixes or default_image_prefixes(config.manifest)),
        max_bytes=config.max_image_bytes,
        max_pixels=config.max_image_pixels,
        read_timeout_s=config.image_read_timeout_s,
        read_attempts=config.image_read_attempts,
        skip=frozenset(committed.tuned) - duplicates,
    )
    ds = _spread(ds, rows, config).map_batches(prepare_rows, batch_format="pyarrow", fn_kwargs=read)
    ds = _on_actors(ds, TuneStage, config, config.tune_batch_size, config.tune_actors, committed)
    folder = config.output_location.embeddings
    return ds.map_batches(
        write_embeddings, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(folder=folder)
    )


def stored(config: RunConfig, committed: Committed, targets: dict):
    """Stored stage-1 rows of the ids in ``targets``, with their targets: only the files that
    hold them are read."""
    import ray

    fs, _ = config.output_location.embeddings.filesystem()
    ds = ray.data.read_parquet(sorted({committed.tuned[i] for i in targets}), filesystem=fs)
    # Strict, as in _spread: a non-strict repartition may be fused into the read, whose task then
    # hands every row on as one block, and one editing actor gets them all.
    ds = ds.repartition(target_num_rows_per_block=config.edit_batch_size, strict=True)
    return ds.map_batches(
        attach_targets, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(targets=targets)
    )


def scorer(config: RunConfig) -> Location | None:
    """The job's scorer, checked on the driver before any work (one clear error if it cannot be
    reached or is no CLIP checkpoint; a hub id or URI is fetched into the cache the actors read)."""
    if not config.scorer:
        return None
    from pipeline.engine.scoring import scorer_folder

    location = Location(config.scorer, config.endpoint_url)
    scorer_folder(config.scorer, location.storage_options())
    return location


def edit(ds, config: RunConfig, committed: Committed, done=frozenset()):
    """Stage-1 rows -> edited and scored (actor pool) -> images written."""
    extra = dict(max_edits_per_call=config.max_edits_per_call, done=done, scorer=scorer(config))
    ds = _on_actors(ds, EditStage, config, config.edit_batch_size, config.edit_actors, committed, **extra)
    output = config.output_location
    return ds.map_batches(
        write_images, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(output=output)
    )


@driver.job("tune")
def run_tune(config: RunConfig, started: float, attempt: str) -> dict:
    """``jobs.tune``: manifest -> embeddings (and errors). Ids already tuned are skipped."""
    manifest = check_manifest(config)  # on the driver, before any Ray Data work
    ids, duplicates = manifest.ids, manifest.duplicates
    ds = read_manifest(config, manifest)
    committed = read_committed(config.output_location, results=False)
    committed.check_model_family(config)  # before any work
    tuned = manifest_targets(config, set(committed.tuned) - duplicates)  # those still good: not read again
    already = sum(1 for i in ids if i in tuned)
    todo = len(ids) - already
    if todo:
        ds = tune(ds, config, len(ids), duplicates, committed).select_columns(
            [err.ID, err.ROW, err.STAGE, err.KIND, err.MESSAGE]
        )
    else:  # every row was tuned by an earlier run: no actor starts
        ds = None
    counts = driver.drain(ds, config, attempt, None, todo)
    output = config.output_location
    return driver.finish(
        config,
        "tune",
        started,
        {
            **driver.account(len(ids), counts, already),
            "embeddings": output.embeddings.uri,
            "errors": output.errors.uri,
        },
    )


@driver.job("run")
def run_all(config: RunConfig, started: float, attempt: str) -> dict:
    """``jobs.run``: both stages in one streaming pipeline. On an output an earlier run wrote,
    rows already edited are skipped and rows already tuned are edited from their stored
    embeddings (only the edits still missing)."""
    manifest = check_manifest(config)  # on the driver, before any Ray Data work
    ids, duplicates = manifest.ids, manifest.duplicates
    ds = read_manifest(config, manifest)
    output = config.output_location
    committed = read_committed(output, results=True)
    committed.check_model_family(config)  # before any work
    targets = manifest_targets(config, set(committed.tuned) - duplicates)
    missing = {i: committed.missing_edits(i, *_edits(config, row)) for i, row in targets.items()}
    unfinished = {i: targets[i] for i in targets if missing[i]}
    already = sum(1 for i in ids if i in targets and not missing[i])
    todo = len(ids) - already
    if todo:
        ds = tune(ds, config, len(ids), duplicates, committed)
        if unfinished:
            ds = ds.union(stored(config, committed, unfinished))
        done = frozenset(k for k in committed.edits if k[0] in unfinished)
        ds = edit(ds, config, committed, done)
    else:  # every row was done by an earlier run: no actor starts (nor loads a model) to find that out
        ds = None
    counts = driver.drain(ds, config, attempt, res.RESULTS_SCHEMA, todo)
    accounted = driver.account(len(ids), counts, already)
    sheet = None
    if accounted["rows_done"] and config.contact_sheet_images:
        sheet = write_contact_sheet(output, config.manifest_location, config.contact_sheet_images)
    return driver.finish(
        config,
        "run",
        started,
        {
            **accounted,
            "resumed": counts["resumed"],
            "edits": counts["result_rows"],
            **counts["curation"],
            "embeddings": output.embeddings.uri,
            "images": output.images.uri,
            "results": output.results.uri,
            "errors": output.errors.uri,
            "contact_sheet": sheet,
        },
    )


def targets_by_id(config: RunConfig) -> tuple[dict[str, dict], list[dict]]:
    """id -> its ``schemas.stages.CARRIED`` values (target prompts, etas, attention words) from
    the targets table, or from the manifest; and an error row for each row of it that fails the
    manifest's checks (those rows are not edited, the others are)."""
    source = config.targets or config.manifest
    if not source:
        raise InputError("jobs.edit needs targets: set targets (a table of id, target_prompts) or manifest")
    location = Location(source, config.endpoint_url)
    fs, _ = location.filesystem()
    table_rows = []
    for path, _, footer in parquet_input(location, "targets" if config.targets else "manifest"):
        columns = [c for c in TARGET_COLUMNS if c in footer.schema.to_arrow_schema().names]
        table_rows += pq.read_table(path, columns=columns, filesystem=fs).to_pylist()
    return checked_targets(table_rows)


def _edits(config: RunConfig, row: dict) -> tuple[list[str], list[float]]:
    """A row's target prompts and etas (the config's when the row has none)."""
    return row[man.TARGET_PROMPTS], row[man.ETA] or list(config.pti.etas)


@driver.job("edit")
def run_edit(config: RunConfig, started: float, attempt: str) -> dict:
    """``jobs.edit``: stored embeddings + targets -> edits. New targets reuse old tunings; edits
    already in the output's results are not made again."""
    targets, refused = targets_by_id(config)  # on the driver, before any Ray Data work
    output = config.output_location
    committed = read_committed(output, results=True)
    committed.check_model_family(config)  # before any work
    todo = {
        i: row
        for i, row in targets.items()
        if i in committed.tuned and committed.missing_edits(i, *_edits(config, row))
    }
    already = sum(1 for i in targets if i in committed.tuned and i not in todo)
    no_embeddings = [
        err.error_row(
            i, err.EDIT, "no_embeddings", f"no stored embeddings for id {i!r} under {output.embeddings}"
        )
        for i in sorted(set(targets) - set(committed.tuned))
    ]
    ds = None
    if todo:
        ds = edit(
            stored(config, committed, todo),
            config,
            committed,
            frozenset(k for k in committed.edits if k[0] in todo),
        )
    rows_in = len(targets) + len(refused)
    counts = driver.drain(ds, config, attempt, res.RESULTS_SCHEMA, rows_in - already, refused + no_embeddings)
    return driver.finish(
        config,
        "edit",
        started,
        {
            **driver.account(rows_in, counts, already),
            "edits": counts["result_rows"],
            **counts["curation"],
            "results": output.results.uri,
            "errors": output.errors.uri,
        },
    )
