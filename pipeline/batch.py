"""The batch pipeline on Ray Data: manifest -> images -> tuning (GPU actors) -> embeddings ->
fan-out edits (GPU actors) -> images and a results table.

Every row flows to the end: a row that fails at any stage carries ``error_stage``,
``error_kind`` and ``error_message`` and is skipped by later stages, so the driver can account
for every input row in the results or the errors table.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import PTIConfig
from pipeline.errors import InputError, ModelError, PTIError
from pipeline.faults import failpoint
from pipeline.resume import Committed, check_same_settings, edit_key, manifest_targets, read_committed
from pipeline.run_config import RunConfig
from pipeline.storage import (
    arrow_filesystem, default_image_prefixes, delete, is_allowed, join, key_for_id, parquet_files, storage_options, write_bytes,
)  # fmt: skip
from schemas import embeddings as emb
from schemas import manifest as man
from schemas import results as res

log = logging.getLogger(__name__)

ERROR_STAGE, ERROR_KIND, ERROR_MESSAGE = "error_stage", "error_kind", "error_message"
ERROR_FIELDS = [pa.field(ERROR_STAGE, pa.string()), pa.field(ERROR_KIND, pa.string()), pa.field(ERROR_MESSAGE, pa.string())]
PIXELS = "pixels"  # decoded RGB, uint8 [R, R, 3], as raw bytes between the read and tune stages
EDITED = "edited"  # an edit's RGB, uint8 [R, R, 3] raw bytes, between the edit and write stages

PREPARED_SCHEMA = pa.schema(
    [
        pa.field(man.ID, pa.string()),
        pa.field(man.SOURCE_PROMPT, pa.string()),
        pa.field(man.TARGET_PROMPTS, pa.list_(pa.string())),
        pa.field(man.ETA, pa.list_(pa.float64())),
        pa.field(man.GUIDANCE, pa.float64()),
        pa.field(man.SEED, pa.int64()),
        pa.field(PIXELS, pa.binary()),
        *ERROR_FIELDS,
    ]
)
EDITED_SCHEMA = pa.schema([*(f.with_nullable(True) for f in res.RESULTS_SCHEMA), pa.field(EDITED, pa.binary()), *ERROR_FIELDS])
CARRIED = (man.TARGET_PROMPTS, man.ETA)  # manifest columns stage 2 needs, carried past stage 1


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows to a table; fields a row lacks are null (column-wise, so extension types work)."""
    columns = {}
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if isinstance(f.type, pa.ExtensionType):
            columns[f.name] = pa.ExtensionArray.from_storage(f.type, pa.nulls(len(rows), f.type.storage_type)) if all(v is None for v in values) else values
        else:
            columns[f.name] = pa.array(values, type=f.type)
    return pa.Table.from_pydict(columns, schema=schema)


def _conform(table: pa.Table, schema: pa.Schema, extra: dict[str, list]) -> pa.Table:
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


def _error(row_id, stage: str, kind: str, message: str) -> dict:
    return {man.ID: row_id, ERROR_STAGE: stage, ERROR_KIND: kind, ERROR_MESSAGE: message}


def _ok(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column(ERROR_KIND).is_null().to_pylist(), dtype=bool)


def _worker() -> str:
    import ray

    context = ray.get_runtime_context()
    return context.get_actor_id() or context.get_task_id() or "driver"


# --- read: validate rows, fetch and decode images (CPU tasks) -----------------------------------


def prepare_rows(
    table: pa.Table, *, resolution: int, duplicates: set, endpoint_url: str | None, allowed: tuple[str, ...],
    max_bytes: int, max_pixels: int, skip=frozenset(),
) -> pa.Table:  # fmt: skip
    """Validate manifest rows and decode their images to ``resolution``; bad rows become errors.
    An image URI outside the ``allowed`` prefixes is refused unread. Rows whose ids are in
    ``skip`` (tuned by an earlier run) are dropped."""
    from pipeline.images import load_image

    failpoint("read")
    if skip:
        table = table.filter(pa.array([i not in skip for i in table.column(man.ID).to_pylist()], pa.bool_()))
    good, errors = man.validate_rows(table.to_pylist(), duplicates)
    out = [_error(e[man.ID], "validate", e["kind"], e["message"]) for e in errors]
    for row in good:
        image = row[man.IMAGE]
        name = f"{row[man.ID]}: {image if isinstance(image, str) else '<bytes>'}"
        if isinstance(image, str) and not is_allowed(image, allowed):
            message = f"image {name!r}: outside the allowed prefixes ({', '.join(allowed)}); list its prefix in allowed_image_prefixes to read it"
            out.append(_error(row[man.ID], "read", "not_allowed", message))
            continue
        options = storage_options(image, endpoint_url) if isinstance(image, str) else {}
        try:
            pixels = load_image(image, resolution, name=name, storage_options=options, max_bytes=max_bytes, max_pixels=max_pixels)
        except PTIError as exc:
            out.append(_error(row[man.ID], "read", getattr(exc, "kind", "bad_image"), str(exc)))
            continue
        array = (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out.append({**{k: row.get(k) for k in PREPARED_SCHEMA.names if k in row}, PIXELS: array.tobytes()})
    return _table(out, PREPARED_SCHEMA)


# --- stage 1: invert and tune (GPU actors) ---------------------------------------------------


def _out_of_memory(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def split_on_oom(run, items: list):
    """``run(items)``, and on out-of-memory ``run`` on each half, down to single items.

    Yields ``(items, result)`` per call that ran, or ``(items, exception)`` for a call that failed
    otherwise, or ran out of memory with one item: a batch too big for the device costs a retry,
    not its rows."""
    try:
        result = run(items)
    except Exception as exc:
        if len(items) == 1 or not _out_of_memory(exc):
            yield items, exc
            return
        log.warning("out of memory on a batch of %d: splitting it", len(items))
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        yield from split_on_oom(run, items[:half])
        yield from split_on_oom(run, items[half:])
        return
    yield items, result


def _load_engine(config: PTIConfig, endpoint_url: str | None, expect_model: set):
    """The stage's model; refused if the output's stored embeddings came from another one."""
    from pipeline.engine import Engine

    engine = Engine.load(config.replace(progress=False), storage_options(config.model, endpoint_url))
    if expect_model and engine.sd.fingerprint not in expect_model:
        raise ModelError(
            f"model {config.model!r} (fingerprint {engine.sd.fingerprint}) is not the one that made the stored "
            f"embeddings ({', '.join(sorted(expect_model))}): its files changed; write to a new output"
        )
    return engine


class TuneStage:
    """Holds one model; maps prepared rows to stored stage-1 rows (plus what stage 2 needs)."""

    def __init__(self, config: PTIConfig, cpus: float = 1.0, endpoint_url: str | None = None, expect_model=frozenset()):
        import torch

        self.engine = _load_engine(config, endpoint_url, expect_model)
        if self.engine.sd.device.type == "cpu":
            torch.set_num_threads(max(1, int(cpus)))  # share the node's cores with other actors
        self.engines = {(config.guidance, config.seed): self.engine}

    def _engine_for(self, guidance: float, seed: int):
        from pipeline.engine import Engine

        key = (guidance, seed)
        if key not in self.engines:  # a per-row override: same model, other settings
            self.engines[key] = Engine(self.engine.sd, self.engine.config.replace(guidance=guidance, seed=seed))
        return self.engines[key]

    def schema(self) -> pa.Schema:
        cfg, sd = self.engine.config, self.engine.sd
        h = self.engine.resolution // sd.vae_scale_factor
        base = emb.embeddings_schema(
            (sd.unet.config.in_channels, h, h),
            (cfg.steps, sd.text_encoder.config.max_position_embeddings, sd.text_encoder.config.hidden_size),
            cfg.embedding_dtype,
        )
        extra = [PREPARED_SCHEMA.field(c) for c in CARRIED] + [pa.field(res.TUNE_WORKER, pa.string())]
        return pa.schema([*(f.with_nullable(True) for f in base), *extra, *ERROR_FIELDS])

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from pipeline.stored import inversion_to_arrow

        failpoint("tune")
        schema, worker, r = self.schema(), _worker(), self.engine.resolution
        ok = _ok(table)
        rows = table.to_pylist()
        out = [{**rows[i], res.TUNE_WORKER: worker} for i in np.flatnonzero(~ok)]
        groups: dict[tuple, list[int]] = {}
        for i in np.flatnonzero(ok):
            g = rows[i][man.GUIDANCE]
            s = rows[i][man.SEED]
            groups.setdefault((self.engine.config.guidance if g is None else g, self.engine.config.seed if s is None else s), []).append(i)
        parts = []
        for (guidance, seed), members in groups.items():
            engine = self._engine_for(guidance, seed)
            ids = [rows[i][man.ID] for i in members]
            sources = [rows[i][man.SOURCE_PROMPT] for i in members]
            pixels = torch.stack([
                torch.from_numpy(np.frombuffer(rows[i][PIXELS], np.uint8).reshape(r, r, 3).copy()).permute(2, 0, 1).float() / 255
                for i in members
            ])  # fmt: skip
            tune = lambda ks: engine.invert_and_tune(pixels[ks], [sources[k] for k in ks])  # noqa: E731
            for ks, inversion in split_on_oom(tune, list(range(len(members)))):
                if isinstance(inversion, Exception):  # the call failed (one image, if out of memory): its rows are errors
                    out += [{**_error(ids[k], "tune", type(inversion).__name__, str(inversion)), res.TUNE_WORKER: worker} for k in ks]
                    continue
                finite = (torch.isfinite(inversion.cond).flatten(1).all(1) & torch.isfinite(inversion.z_T).flatten(1).all(1)).tolist()
                out += [{**_error(ids[k], "tune", "non_finite", "the model produced NaN or inf"), res.TUNE_WORKER: worker}
                        for k, ok_k in zip(ks, finite) if not ok_k]  # fmt: skip
                kept = [members[k] for k, ok_k in zip(ks, finite) if ok_k]
                stored = inversion_to_arrow(engine, inversion, [ids[k] for k in ks], [sources[k] for k in ks])
                parts.append(_conform(stored.filter(pa.array(finite, pa.bool_())), schema, {
                    **{c: [rows[i][c] for i in kept] for c in CARRIED}, res.TUNE_WORKER: [worker] * len(kept),
                }))  # fmt: skip
        return pa.concat_tables([*parts, _table(out, schema)])


def write_embeddings(table: pa.Table, *, uri: str, endpoint_url: str | None) -> pa.Table:
    """Write a batch's stage-1 rows as one Parquet file; its name comes from its ids, so a retried
    batch overwrites its own file instead of adding a copy."""
    ok = _ok(table)
    if ok.any():
        stored = table.filter(pa.array(ok)).select(list(emb.EMBEDDINGS_COLUMNS))
        name = hashlib.sha256("\n".join(sorted(stored.column(emb.ID).to_pylist())).encode()).hexdigest()[:20]
        buffer = io.BytesIO()
        pq.write_table(stored, buffer)
        write_bytes(join(uri, f"part-{name}.parquet"), buffer.getvalue(), endpoint_url)
    return table


# --- stage 2: fan out and edit (GPU actors) --------------------------------------------------


class EditStage:
    """Holds one model; maps stage-1 rows to one row per (image, target, eta) with the PNG.
    Edits in ``done`` (``resume.edit_key``s an earlier run committed) are not made again."""

    def __init__(self, config: PTIConfig, max_edits_per_call: int = 16, cpus: float = 1.0, endpoint_url: str | None = None,
                 expect_model=frozenset(), done=frozenset()):  # fmt: skip
        import torch

        self.engine = _load_engine(config, endpoint_url, expect_model)
        if self.engine.sd.device.type == "cpu":
            torch.set_num_threads(max(1, int(cpus)))
        self.max_edits, self.done = max_edits_per_call, done

    def __call__(self, table: pa.Table) -> pa.Table:
        from pipeline.stored import inversion_from_arrow

        failpoint("edit")
        worker = _worker()
        ok = _ok(table)
        out = [{**_error(r[man.ID], r[ERROR_STAGE], r[ERROR_KIND], r[ERROR_MESSAGE]), res.TUNE_WORKER: r.get(res.TUNE_WORKER)}
               for r in table.filter(pa.array(~ok)).to_pylist()]  # fmt: skip
        good = table.filter(pa.array(ok))
        if len(good):
            inversion = inversion_from_arrow(good)
            meta = good.drop_columns([emb.Z_T, emb.PROMPT_EMBEDDINGS, emb.UNCOND_EMBEDDINGS]).to_pylist()
            fan = [
                (b, t, target, float(eta))
                for b, row in enumerate(meta)
                for t, target in enumerate(row[man.TARGET_PROMPTS])
                for eta in (row[man.ETA] or self.engine.config.etas)
                if edit_key(row[emb.ID], t, target, eta) not in self.done
            ]
            def edit(chunk):
                return self.engine.edit(
                    inversion, [c[0] for c in chunk], [c[2] for c in chunk], [c[3] for c in chunk],
                    guidance=[meta[c[0]][emb.GUIDANCE] for c in chunk],
                )  # fmt: skip

            calls = (part for start in range(0, len(fan), self.max_edits) for part in split_on_oom(edit, fan[start : start + self.max_edits]))
            began = time.perf_counter()
            for chunk, pixels in calls:
                if isinstance(pixels, Exception):  # these edits fail; the batch's other edits go on
                    failed = dict.fromkeys(meta[c[0]][emb.ID] for c in chunk)
                    out += [{**_error(i, "edit", type(pixels).__name__, str(pixels)), res.EDIT_WORKER: worker} for i in failed]
                    began = time.perf_counter()
                    continue
                seconds = (time.perf_counter() - began) / len(chunk)
                for (b, t, target, eta), image in zip(chunk, pixels):
                    row = meta[b]
                    if not bool(image.isfinite().all()):  # this edit fails, not its batch
                        out.append({**_error(row[emb.ID], "edit", "non_finite", f"target {t} at eta {eta:g}: the model produced NaN or inf"),
                                    res.EDIT_WORKER: worker})  # fmt: skip
                        continue
                    out.append({
                        res.ID: row[emb.ID], res.TARGET_INDEX: t, res.TARGET_PROMPT: target, res.ETA: eta,
                        res.GUIDANCE: row[emb.GUIDANCE], res.RECONSTRUCTION_PSNR: row[emb.RECONSTRUCTION_PSNR],
                        res.RECONSTRUCTION_SSIM: row[emb.RECONSTRUCTION_SSIM], res.TUNE_SECONDS: row[emb.SECONDS],
                        res.EDIT_SECONDS: seconds, res.CONFIG_FINGERPRINT: row[emb.CONFIG_FINGERPRINT],
                        res.TUNE_WORKER: row.get(res.TUNE_WORKER), res.EDIT_WORKER: worker,
                        EDITED: (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).tobytes(),
                    })  # fmt: skip
                began = time.perf_counter()
        return _table(out, EDITED_SCHEMA)


def image_key(row_id: str, target_index: int, eta: float) -> str:
    """``images/{id}/{target_index}-{eta}.png`` with the id safely encoded."""
    return f"images/{key_for_id(row_id)}/{target_index}-{eta:g}.png"


def write_images(table: pa.Table, *, output: str, endpoint_url: str | None) -> pa.Table:
    """Encode each edit as PNG (on a CPU worker, not the GPU actor), write it under its
    deterministic key, and keep only its URI."""
    uris = []
    for row_id, t, eta, raw in zip(*(table.column(c).to_pylist() for c in (res.ID, res.TARGET_INDEX, res.ETA, EDITED))):
        if raw is None:
            uris.append(None)
            continue
        side = int(round((len(raw) // 3) ** 0.5))
        buffer = io.BytesIO()
        Image.fromarray(np.frombuffer(raw, np.uint8).reshape(side, side, 3), "RGB").save(buffer, format="PNG")
        uri = join(output, image_key(row_id, t, eta))
        write_bytes(uri, buffer.getvalue(), endpoint_url)
        uris.append(uri)
    table = table.set_column(table.schema.get_field_index(res.IMAGE_URI), res.IMAGE_URI, pa.array(uris, pa.string()))
    return table.drop_columns([EDITED])


# --- the driver --------------------------------------------------------------------------------


class RollingParquet:
    """Parquet files of at most ``rows_per_file`` rows under ``uri``, written as rows stream in,
    and at least every ``flush_seconds``, so a killed driver loses little committed work. File
    names carry ``prefix`` (the job and this attempt): a resumed run adds files, never
    overwrites an earlier attempt's."""

    def __init__(self, uri: str, schema: pa.Schema, rows_per_file: int, endpoint_url: str | None, prefix: str,
                 flush_seconds: float = float("inf")):  # fmt: skip
        self.uri, self.schema, self.limit, self.endpoint = uri, schema, rows_per_file, endpoint_url
        self.prefix, self.flush_seconds, self.flushed_at = prefix, flush_seconds, time.monotonic()
        self.pending: list[pa.Table] = []
        self.pending_rows = self.files = self.rows = 0

    def add(self, table: pa.Table) -> None:
        if len(table):
            self.pending.append(table.select(self.schema.names).cast(self.schema))
            self.pending_rows += len(table)
            self.rows += len(table)
        while self.pending_rows >= self.limit:
            self._flush(self.limit)
        if self.pending_rows and time.monotonic() - self.flushed_at >= self.flush_seconds:
            self._flush(self.pending_rows)

    def close(self) -> None:
        while self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        head, rest = table.slice(0, n), table.slice(n)
        buffer = io.BytesIO()
        pq.write_table(head, buffer)
        write_bytes(join(self.uri, f"{self.prefix}-{self.files:05d}.parquet"), buffer.getvalue(), self.endpoint)
        self.files += 1
        self.flushed_at = time.monotonic()
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        failpoint(f"driver-after-{posixpath.basename(self.uri.rstrip('/'))}")


def _init_ray(config: RunConfig) -> None:
    """Join the cluster a job was submitted to, or start a local one sized so that reads always
    have a CPU beside the actor pools (a pool that takes every CPU starves the reads: a hang)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    actors = config.tune_actors + config.edit_actors
    ray.init(num_cpus=int(actors * config.cpus_per_actor) + 2, include_dashboard=False)


def _check_gpus(config: RunConfig) -> None:
    import ray

    needed = config.gpus_per_actor * max(config.tune_actors, config.edit_actors)
    have = ray.cluster_resources().get("GPU", 0)
    if config.gpus_per_actor > 0 and have < config.gpus_per_actor:
        raise InputError(
            f"the GPU stages ask for {config.gpus_per_actor} GPU per actor but the Ray cluster has "
            f"{have:g} GPUs; add GPU workers or set gpus_per_actor=0 to run on CPUs"
        )
    if have < needed:
        log.warning("the cluster has %g GPUs for %g requested: some actors will wait", have, needed)


def _pools_fit(config: RunConfig, actors: int) -> bool:
    """Whether all of a job's actors fit in the cluster at once, with a CPU left for reads.

    When they do, pools wait for all their actors before taking work, so every actor gets some
    (otherwise the first actor up can take a small job's every block). When they don't (jobs.run
    with fewer GPUs than tune_actors + edit_actors), editing actors can only start as tuning ones
    finish, so waiting would deadlock: Ray then starts each actor as resources free up."""
    import ray

    have = ray.cluster_resources()
    gpus_fit = config.gpus_per_actor * actors <= have.get("GPU", 0)
    return gpus_fit and config.cpus_per_actor * actors < have.get("CPU", 0)


def _read_manifest(config: RunConfig):
    """The manifest as a Ray dataset, after checking its columns; its ids and the duplicated ones."""
    import ray

    if not config.manifest:
        raise InputError("no manifest given: set manifest in the config or pass --manifest")
    fs, path = arrow_filesystem(config.manifest, config.endpoint_url)
    dataset = pq.ParquetDataset(path, filesystem=fs)
    problems = man.schema_problems(dataset.schema)
    if problems:
        raise InputError(f"manifest {config.manifest}: " + "; ".join(problems))
    ids = dataset.read(columns=[man.ID]).column(man.ID).to_pylist()  # ids only: small
    columns = [c for c in dataset.schema.names if c in (man.ID, man.IMAGE, man.SOURCE_PROMPT, man.TARGET_PROMPTS, man.TARGET_PROMPT, man.ETA, man.GUIDANCE, man.SEED)]
    ds = ray.data.read_parquet(path, filesystem=fs, columns=columns)
    return ds, ids, man.duplicated_ids(ids)


def _spread(ds, rows: int, config: RunConfig):
    """Enough blocks that every actor gets work: a small manifest is one block otherwise."""
    per_block = max(1, min(config.tune_batch_size, -(-rows // (2 * config.tune_actors))))
    return ds.repartition(target_num_rows_per_block=per_block)


def _tune(ds, config: RunConfig, rows: int, duplicates: set, committed: Committed):
    from ray.data import ActorPoolStrategy

    from pipeline.models import model_resolution

    model_options = storage_options(config.pti.model, config.endpoint_url)
    resolution = config.pti.resolution or model_resolution(config.pti.model, storage_options=model_options)
    ds = _spread(ds, rows, config).map_batches(
        prepare_rows, batch_format="pyarrow",
        fn_kwargs=dict(resolution=resolution, duplicates=duplicates, endpoint_url=config.endpoint_url,
                       allowed=tuple(config.allowed_image_prefixes or default_image_prefixes(config.manifest)),
                       max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels,
                       skip=frozenset(committed.tuned) - duplicates),
    )  # fmt: skip
    ds = ds.map_batches(
        TuneStage, batch_format="pyarrow", batch_size=config.tune_batch_size,
        compute=ActorPoolStrategy(size=config.tune_actors, max_tasks_in_flight_per_actor=2), num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
        fn_constructor_kwargs=dict(config=config.pti, cpus=config.cpus_per_actor, endpoint_url=config.endpoint_url,
                                   expect_model=frozenset(committed.model_fingerprints)),
    )  # fmt: skip
    return ds.map_batches(
        write_embeddings, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(uri=config.embeddings_uri, endpoint_url=config.endpoint_url),
    )  # fmt: skip


def _stored(config: RunConfig, committed: Committed, targets: dict):
    """Stored stage-1 rows of the ids in ``targets``, with their targets: only the files that
    hold them are read."""
    import ray

    fs, _ = arrow_filesystem(config.embeddings_uri, config.endpoint_url)
    ds = ray.data.read_parquet(sorted({committed.tuned[i] for i in targets}), filesystem=fs)
    ds = ds.repartition(target_num_rows_per_block=config.edit_batch_size)
    return ds.map_batches(attach_targets, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(targets=targets))


def _edit(ds, config: RunConfig, committed: Committed, done=frozenset()):
    from ray.data import ActorPoolStrategy

    ds = ds.map_batches(
        EditStage, batch_format="pyarrow", batch_size=config.edit_batch_size,
        compute=ActorPoolStrategy(size=config.edit_actors, max_tasks_in_flight_per_actor=2), num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
        fn_constructor_kwargs=dict(
            config=config.pti, max_edits_per_call=config.max_edits_per_call, cpus=config.cpus_per_actor,
            endpoint_url=config.endpoint_url, expect_model=frozenset(committed.model_fingerprints), done=done,
        ),
    )  # fmt: skip
    return ds.map_batches(
        write_images, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(output=config.output, endpoint_url=config.endpoint_url),
    )  # fmt: skip


def _drain(ds, config: RunConfig, attempt: str, results_schema: pa.Schema | None, errors_before: list[dict] = ()) -> dict:
    """Stream the final rows to the driver (small rows: no tensors, no images) and write the
    results and errors tables; count everything for the summary."""
    def table(name, schema):
        return RollingParquet(join(config.output, name), schema, config.results_rows_per_file, config.endpoint_url,
                              prefix=attempt, flush_seconds=config.results_flush_seconds)  # fmt: skip

    errors = table("errors", man.ERRORS_SCHEMA)
    results = results_schema and table("results", results_schema)
    errors.add(pa.Table.from_pylist(list(errors_before), schema=man.ERRORS_SCHEMA))
    ok_ids, early_ids, edit_error_ids, early_errors = set(), {r[man.ID] for r in errors_before}, set(), len(errors_before)
    resumed_ids = set()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) if ds is not None else ():
        ok = _ok(batch)
        bad = batch.filter(pa.array(~ok))
        if len(bad):
            errors.add(pa.table({
                man.ID: bad.column(man.ID), "row": pa.nulls(len(bad), pa.int64()),
                "stage": bad.column(ERROR_STAGE), "kind": bad.column(ERROR_KIND), "message": bad.column(ERROR_MESSAGE),
            }))  # fmt: skip
            for row_id, stage in zip(bad.column(man.ID).to_pylist(), bad.column(ERROR_STAGE).to_pylist()):
                if stage == "edit":
                    edit_error_ids.add(row_id)
                else:
                    early_ids.add(row_id)
                    early_errors += 1
        good = batch.filter(pa.array(ok))
        ok_ids.update(good.column(man.ID).to_pylist())
        if res.TUNE_WORKER in good.column_names:  # edited from stored embeddings: not tuned by this run
            resumed_ids.update(i for i, w in zip(good.column(man.ID).to_pylist(), good.column(res.TUNE_WORKER).to_pylist()) if w is None)
        if results is not None:
            results.add(good)
    errors.close()
    if results is not None:
        results.close()
    return {
        "ok_ids": ok_ids, "early_error_rows": early_errors, "edit_only_failures": len(edit_error_ids - ok_ids - early_ids),
        "error_rows": errors.rows, "result_rows": results.rows if results else 0, "resumed": len(resumed_ids),
    }


def _account(rows_in: int, counts: dict, already_done: int) -> dict:
    """Every input row is done (now or by an earlier run) or in the errors table, exactly once
    before editing; refuse to report success when the counts do not add up."""
    done = len(counts["ok_ids"]) + already_done
    accounted = done + counts["early_error_rows"] + counts["edit_only_failures"]
    if accounted != rows_in:
        raise RuntimeError(f"accounting failed: {rows_in} rows in, {accounted} accounted for")
    return {"rows_in": rows_in, "rows_done": done, "rows_failed": rows_in - done, "error_rows": counts["error_rows"],
            "already_done": already_done}  # fmt: skip


def _finish(config: RunConfig, job: str, started: float, counts: dict) -> dict:
    summary = {"job": job, "output": config.output, "seconds": round(time.perf_counter() - started, 3), **counts}
    summary["rows_per_second"] = round((counts["rows_done"] - counts["already_done"]) / max(summary["seconds"], 1e-9), 4)
    write_bytes(join(config.output, f"summary-{job}.json"), json.dumps(summary, indent=2).encode(), config.endpoint_url)
    return summary


def _start(config: RunConfig, job: str) -> tuple[float, str]:
    """Join or start Ray, check its GPUs and that the output holds nothing made with other
    settings, drop an earlier attempt's errors (every row not done is tried again) and write the
    resolved config beside the outputs. Returns the start time and this attempt's name."""
    from ray.data import DataContext

    started = time.perf_counter()
    _init_ray(config)
    _check_gpus(config)
    check_same_settings(config, job)
    actors = {"run": config.tune_actors + config.edit_actors, "tune": config.tune_actors, "edit": config.edit_actors}[job]
    # The context is per process: set it both ways, a driver may run several jobs.
    DataContext.get_current().wait_for_min_actors_s = config.actor_start_timeout_s if _pools_fit(config, actors) else -1
    errors = join(config.output, "errors")
    delete(errors, [p for p in parquet_files(errors, config.endpoint_url) if posixpath.basename(p).startswith(f"{job}-")], config.endpoint_url)
    write_bytes(join(config.output, f"config-{job}.yaml"), config.to_yaml().encode(), config.endpoint_url)
    return started, f"{job}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def run_tune(config: RunConfig) -> dict:
    """``jobs.tune``: manifest -> embeddings (and errors). Ids already tuned are skipped."""
    started, attempt = _start(config, "tune")
    ds, ids, duplicates = _read_manifest(config)
    committed = read_committed(config, results=False)
    already = sum(1 for i in ids if i in committed.tuned and i not in duplicates)
    ds = _tune(ds, config, len(ids), duplicates, committed).select_columns([man.ID, ERROR_STAGE, ERROR_KIND, ERROR_MESSAGE])
    counts = _drain(ds, config, attempt, None)
    return _finish(config, "tune", started, {
        **_account(len(ids), counts, already), "embeddings": config.embeddings_uri, "errors": join(config.output, "errors"),
    })  # fmt: skip


def run_all(config: RunConfig) -> dict:
    """``jobs.run``: both stages in one streaming pipeline. On an output an earlier run wrote,
    rows already edited are skipped and rows already tuned are edited from their stored
    embeddings (only the edits still missing)."""
    started, attempt = _start(config, "run")
    ds, ids, duplicates = _read_manifest(config)
    committed = read_committed(config, results=True)
    targets = manifest_targets(config, set(committed.tuned) - duplicates)
    missing = {i: committed.missing_edits(i, t, eta or config.pti.etas) for i, (t, eta) in targets.items()}
    unfinished = {i: targets[i] for i in targets if missing[i]}
    already = sum(1 for i in ids if i in targets and not missing[i])
    ds = _tune(ds, config, len(ids), duplicates, committed)
    if unfinished:
        ds = ds.union(_stored(config, committed, unfinished))
    done = frozenset(k for k in committed.edits if k[0] in unfinished)
    counts = _drain(_edit(ds, config, committed, done), config, attempt, res.RESULTS_SCHEMA)
    return _finish(config, "run", started, {
        **_account(len(ids), counts, already), "resumed": counts["resumed"], "edits": counts["result_rows"],
        "embeddings": config.embeddings_uri, "images": join(config.output, "images"),
        "results": join(config.output, "results"), "errors": join(config.output, "errors"),
    })  # fmt: skip


def _targets_by_id(config: RunConfig) -> dict:
    """id -> (target_prompts, eta) from the targets table, or from the manifest."""
    source = config.targets or config.manifest
    if not source:
        raise InputError("jobs.edit needs targets: set targets (a table of id, target_prompts) or manifest")
    fs, path = arrow_filesystem(source, config.endpoint_url)
    table = pq.ParquetDataset(path, filesystem=fs).read()
    rows, errors = man.validate_rows([{man.IMAGE: "-", **r} for r in table.to_pylist()])
    if errors:
        raise InputError(f"targets {source}: " + "; ".join(f"row {e['row']} ({e[man.ID]}): {e['message']}" for e in errors[:20]))
    return {r[man.ID]: (r[man.TARGET_PROMPTS], r.get(man.ETA)) for r in rows}


def attach_targets(table: pa.Table, *, targets: dict) -> pa.Table:
    """Give stored stage-1 rows the targets to edit toward; ids without targets are dropped."""
    ids = table.column(emb.ID).to_pylist()
    keep = pa.array([i in targets for i in ids], pa.bool_())
    table = table.filter(keep).select(list(emb.EMBEDDINGS_COLUMNS))
    ids = table.column(emb.ID).to_pylist()
    table = table.append_column(PREPARED_SCHEMA.field(man.TARGET_PROMPTS), pa.array([targets[i][0] for i in ids], pa.list_(pa.string())))
    table = table.append_column(PREPARED_SCHEMA.field(man.ETA), pa.array([targets[i][1] for i in ids], pa.list_(pa.float64())))
    table = table.append_column(pa.field(res.TUNE_WORKER, pa.string()), pa.nulls(len(table), pa.string()))
    for f in ERROR_FIELDS:
        table = table.append_column(f, pa.nulls(len(table), pa.string()))
    return table


def run_edit(config: RunConfig) -> dict:
    """``jobs.edit``: stored embeddings + targets -> edits. New targets reuse old tunings; edits
    already in the output's results are not made again."""
    started, attempt = _start(config, "edit")
    targets = _targets_by_id(config)
    committed = read_committed(config, results=True)
    missing = sorted(set(targets) - set(committed.tuned))
    todo = {i: v for i, v in targets.items() if i in committed.tuned and committed.missing_edits(i, v[0], v[1] or config.pti.etas)}
    already = sum(1 for i in targets if i in committed.tuned and i not in todo)
    no_embeddings = [
        {man.ID: i, "row": None, "stage": "edit", "kind": "no_embeddings",
         "message": f"no stored embeddings for id {i!r} under {config.embeddings_uri}"}
        for i in missing
    ]  # fmt: skip
    if todo:
        done = frozenset(k for k in committed.edits if k[0] in todo)
        counts = _drain(_edit(_stored(config, committed, todo), config, committed, done), config, attempt, res.RESULTS_SCHEMA, no_embeddings)
    else:
        counts = _drain(None, config, attempt, res.RESULTS_SCHEMA, no_embeddings)
    return _finish(config, "edit", started, {
        **_account(len(targets), counts, already), "edits": counts["result_rows"],
        "results": join(config.output, "results"), "errors": join(config.output, "errors"),
    })  # fmt: skip
