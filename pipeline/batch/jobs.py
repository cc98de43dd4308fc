"""The three batch jobs, each read -> map -> map -> write on Ray Data, top to bottom:
``run_tune`` (manifest -> embeddings), ``run_edit`` (embeddings + targets -> edits) and
``run_all`` (both in one streaming pipeline). Resumable: each does only what its output lacks."""

from __future__ import annotations

import logging

import pyarrow.parquet as pq

from pipeline.batch import driver
from pipeline.batch.config import RunConfig
from pipeline.batch.manifests import check_manifest, parquet_input, prepare_rows, read_manifest
from pipeline.batch.report import write_contact_sheet
from pipeline.batch.resume import TARGET_COLUMNS, Committed, checked_targets, manifest_targets, read_committed
from pipeline.batch.stages import (
    EditStage,
    TuneStage,
    attach_targets,
    write_embeddings,
    write_images,
)
from pipeline.errors import InputError
from pipeline.io.storage import Location, default_image_prefixes
from schemas import errors as err
from schemas import manifest as man
from schemas import results as res

log = logging.getLogger(__name__)


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
    from pipeline.engine.checkpoints import model_resolution

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
        etas=config.pti.etas,
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
    missing = {
        i: committed.missing_edits(i, row[man.TARGET_PROMPTS], row[man.ETA]) for i, row in targets.items()
    }
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
    return checked_targets(table_rows, config.pti.etas)


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
        if i in committed.tuned and committed.missing_edits(i, row[man.TARGET_PROMPTS], row[man.ETA])
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
