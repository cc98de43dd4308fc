"""The three batch jobs, each read -> map -> map -> write on Ray Data, top to bottom:
``run_tune`` (manifest -> embeddings), ``run_edit`` (embeddings + targets -> edits) and
``run_all`` (both in one streaming pipeline). Resumable: each does only what its output lacks."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline.batch import driver
from pipeline.batch.config import RunConfig
from pipeline.batch.resume import Committed, manifest_targets, read_committed
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
from schemas.stages import CARRIED

MANIFEST_COLUMNS = (
    man.ID,
    man.IMAGE,
    man.SOURCE_PROMPT,
    man.TARGET_PROMPTS,
    man.TARGET_PROMPT,
    man.ETA,
    man.GUIDANCE,
    man.SEED,
    man.BLEND_WORDS,
    man.REWEIGHT,
)


def read_manifest(config: RunConfig):
    """The manifest as a Ray dataset, after checking its columns; its ids and the duplicated ones."""
    import ray

    if not config.manifest:
        raise InputError("no manifest given: set manifest in the config or pass --manifest")
    fs, path = config.manifest_location.filesystem()
    dataset = pq.ParquetDataset(path, filesystem=fs)
    problems = man.schema_problems(dataset.schema)
    if problems:
        raise InputError(f"manifest {config.manifest}: " + "; ".join(problems))
    ids = dataset.read(columns=[man.ID]).column(man.ID).to_pylist()  # ids only: small
    columns = [c for c in dataset.schema.names if c in MANIFEST_COLUMNS]
    ds = ray.data.read_parquet(path, filesystem=fs, columns=columns)
    return ds, ids, man.duplicated_ids(ids)


def _spread(ds, rows: int, config: RunConfig):
    """Enough blocks that every actor gets work: a small manifest is one block otherwise."""
    per_block = max(1, min(config.tune_batch_size, -(-rows // (2 * config.tune_actors))))
    return ds.repartition(target_num_rows_per_block=per_block)


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
    ds = ds.repartition(target_num_rows_per_block=config.edit_batch_size)
    return ds.map_batches(
        attach_targets, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(targets=targets)
    )


def edit(ds, config: RunConfig, committed: Committed, done=frozenset()):
    """Stage-1 rows -> edited (actor pool) -> images written."""
    extra = dict(max_edits_per_call=config.max_edits_per_call, done=done)
    ds = _on_actors(ds, EditStage, config, config.edit_batch_size, config.edit_actors, committed, **extra)
    output = config.output_location
    return ds.map_batches(
        write_images, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(output=output)
    )


def run_tune(config: RunConfig) -> dict:
    """``jobs.tune``: manifest -> embeddings (and errors). Ids already tuned are skipped."""
    started, attempt = driver.start(config, "tune")
    ds, ids, duplicates = read_manifest(config)
    committed = read_committed(config.output_location, results=False)
    already = sum(1 for i in ids if i in committed.tuned and i not in duplicates)
    ds = tune(ds, config, len(ids), duplicates, committed).select_columns(
        [err.ID, err.STAGE, err.KIND, err.MESSAGE]
    )
    counts = driver.drain(ds, config, attempt, None)
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


def run_all(config: RunConfig) -> dict:
    """``jobs.run``: both stages in one streaming pipeline. On an output an earlier run wrote,
    rows already edited are skipped and rows already tuned are edited from their stored
    embeddings (only the edits still missing)."""
    started, attempt = driver.start(config, "run")
    ds, ids, duplicates = read_manifest(config)
    output = config.output_location
    committed = read_committed(output, results=True)
    targets = manifest_targets(config, set(committed.tuned) - duplicates)
    missing = {i: committed.missing_edits(i, *_edits(config, row)) for i, row in targets.items()}
    unfinished = {i: targets[i] for i in targets if missing[i]}
    already = sum(1 for i in ids if i in targets and not missing[i])
    ds = tune(ds, config, len(ids), duplicates, committed)
    if unfinished:
        ds = ds.union(stored(config, committed, unfinished))
    done = frozenset(k for k in committed.edits if k[0] in unfinished)
    counts = driver.drain(edit(ds, config, committed, done), config, attempt, res.RESULTS_SCHEMA)
    return driver.finish(
        config,
        "run",
        started,
        {
            **driver.account(len(ids), counts, already),
            "resumed": counts["resumed"],
            "edits": counts["result_rows"],
            "embeddings": output.embeddings.uri,
            "images": output.images.uri,
            "results": output.results.uri,
            "errors": output.errors.uri,
        },
    )


def targets_by_id(config: RunConfig) -> dict[str, dict]:
    """id -> its ``schemas.stages.CARRIED`` values (target prompts, etas, attention words) from
    the targets table, or from the manifest."""
    source = config.targets or config.manifest
    if not source:
        raise InputError("jobs.edit needs targets: set targets (a table of id, target_prompts) or manifest")
    fs, path = Location(source, config.endpoint_url).filesystem()
    table = pq.ParquetDataset(path, filesystem=fs).read()
    rows, errors = man.validate_rows([{man.IMAGE: "-", **r} for r in table.to_pylist()])
    if errors:
        listed = "; ".join(f"row {e[err.ROW]} ({e[err.ID]}): {e[err.MESSAGE]}" for e in errors[:20])
        raise InputError(f"targets {source}: {listed}")
    return {r[man.ID]: {f.name: r.get(f.name) for f in CARRIED} for r in rows}


def _edits(config: RunConfig, row: dict) -> tuple[list[str], list[float]]:
    """A row's target prompts and etas (the config's when the row has none)."""
    return row[man.TARGET_PROMPTS], row[man.ETA] or list(config.pti.etas)


def run_edit(config: RunConfig) -> dict:
    """``jobs.edit``: stored embeddings + targets -> edits. New targets reuse old tunings; edits
    already in the output's results are not made again."""
    started, attempt = driver.start(config, "edit")
    output = config.output_location
    targets = targets_by_id(config)
    committed = read_committed(output, results=True)
    todo = {
        i: row
        for i, row in targets.items()
        if i in committed.tuned and committed.missing_edits(i, *_edits(config, row))
    }
    already = sum(1 for i in targets if i in committed.tuned and i not in todo)
    no_embeddings = [
        err.error_row(
            i, "edit", "no_embeddings", f"no stored embeddings for id {i!r} under {output.embeddings}"
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
    counts = driver.drain(ds, config, attempt, res.RESULTS_SCHEMA, no_embeddings)
    return driver.finish(
        config,
        "edit",
        started,
        {
            **driver.account(len(targets), counts, already),
            "edits": counts["result_rows"],
            "results": output.results.uri,
            "errors": output.errors.uri,
        },
    )
