"""The Ray stages of the batch pipeline after the read (``pipeline.batch.manifests``): tune (GPU
actors) -> write embeddings -> edit (GPU actors) -> write images.

Thin adapters between Arrow blocks and the engine. A row that fails at any stage carries the
error columns of ``schemas.errors`` and is skipped by later stages, so the driver can account for
every input row in the results or the errors table.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch import metrics
from pipeline.batch.actors import as_pixels, load_engine, pixels_of, split_on_failure, stored_inputs
from pipeline.batch.output import Output
from pipeline.batch.resume import edit_key
from pipeline.batch.rows import conform, failure, good_rows, row_by_row, table_of, worker_id
from pipeline.engine.config import PTIConfig
from pipeline.engine.plan import AttentionPlan
from pipeline.errors import InputError
from pipeline.faults import failpoint
from pipeline.io.images import encode_png, to_uint8
from pipeline.io.storage import Location
from schemas import embeddings as emb
from schemas import errors as err
from schemas import manifest as man
from schemas import results as res
from schemas.stages import CARRIED, EDITED, EDITED_SCHEMA, PIXELS

log = logging.getLogger(__name__)


# --- stage 1: invert and tune (GPU actors) ---------------------------------------------------


def _image_column(raw: list[bytes], side: int) -> pa.Array:
    """Decoded input images (raw uint8 RGB rows) as the embeddings table's ``image`` column."""
    type_ = emb.image_type(side)
    values = pa.array(np.frombuffer(b"".join(raw), np.uint8))  # one row is side * side * 3 values
    return pa.ExtensionArray.from_storage(type_, pa.FixedSizeListArray.from_arrays(values, side * side * 3))


def _edit_name(target_index: int, eta: float) -> str:
    """An edit of a row, as its error messages name it."""
    return f"target {target_index} at eta {eta:g}"


def _non_finite(engine, inversion, n: int) -> str:
    """What the errors table says of image ``n`` of a stage-1 batch that stayed non-finite."""
    dtype = str(engine.sd.dtype).removeprefix("torch.")
    again = " and again when retried in float32" if bool(inversion.retried[n]) else ""
    return f"the model produced NaN or inf in stage 1 in {dtype}{again}"


class TuneStage:
    """Holds one model; maps prepared rows to stored stage-1 rows (plus what stage 2 needs)."""

    def __init__(self, config: PTIConfig, model: Location, cpus: float = 1.0, expect_model=frozenset()):
        self.engine = load_engine(config, model, expect_model, cpus)
        self.engines = {config.guidance: self.engine}

    def _engine_for(self, guidance: float):
        """The engine of a row's guidance: the same model, tuned at another weight. (A row's seed
        shapes nothing, as the config's does not: both stages are deterministic.)"""
        from pipeline.engine.engine import Engine

        if guidance not in self.engines:
            self.engines[guidance] = Engine(self.engine.sd, self.engine.config.replace(guidance=guidance))
        return self.engines[guidance]

    def schema(self) -> pa.Schema:
        cfg, sd = self.engine.config, self.engine.sd
        h = self.engine.resolution // sd.vae_scale_factor
        base = emb.embeddings_schema(
            (sd.unet.config.in_channels, h, h),
            (cfg.steps, *sd.token_embedding_shape),
            cfg.embedding_dtype,
            sd.pooled_dim,
            sd.family,
        )
        extra = [
            pa.field(emb.IMAGE, emb.image_type(self.engine.resolution)),
            *CARRIED,
            pa.field(res.TUNE_WORKER, pa.string()),
        ]
        return pa.schema([*(f.with_nullable(True) for f in base), *extra, *err.ERROR_FIELDS])

    @row_by_row(err.TUNE, lambda self: self.schema())
    @metrics.timed_batches(err.TUNE)
    def __call__(self, table: pa.Table) -> pa.Table:
        from pipeline.engine.stored import inversion_to_arrow

        failpoint(err.TUNE)
        schema, worker, cfg = self.schema(), worker_id(), self.engine.config
        ok = good_rows(table)
        rows = table.to_pylist()
        out = [{**rows[i], res.TUNE_WORKER: worker} for i in np.flatnonzero(~ok)]

        def error(row: dict, kind: str, message: str) -> dict:
            return {**err.error_of(row, err.TUNE, kind, message), res.TUNE_WORKER: worker}

        groups: dict[float, list[int]] = {}  # rows by the guidance they are tuned at
        for i in np.flatnonzero(ok):
            guidance = rows[i][man.GUIDANCE]
            groups.setdefault(cfg.guidance if guidance is None else guidance, []).append(i)
        parts = []
        for guidance, members in groups.items():
            ids = [rows[i][man.ID] for i in members]
            sources = [rows[i][man.SOURCE_PROMPT] for i in members]
            pixels = pixels_of([rows[i][PIXELS] for i in members], self.engine.resolution)

            def tune(ks, guidance=guidance):
                engine = self._engine_for(guidance)
                return engine, engine.invert_and_tune(pixels[ks], [sources[k] for k in ks])

            for ks, ran in split_on_failure(tune, list(range(len(members)))):
                if isinstance(ran, Exception):  # one image's failure (after the retries of split_on_failure)
                    kind, message = failure(ran)
                    out += [error(rows[members[k]], kind, message) for k in ks]
                    continue
                engine, inversion = ran
                # Non-finite after the engine's float32 retry (Engine.invert_and_tune): these fail alone.
                finite = inversion.finite.tolist()
                out += [
                    error(rows[members[k]], "non_finite", _non_finite(engine, inversion, n))
                    for n, (k, ok_k) in enumerate(zip(ks, finite))
                    if not ok_k
                ]
                kept = [members[k] for k, ok_k in zip(ks, finite) if ok_k]
                stored = inversion_to_arrow(engine, inversion, [ids[k] for k in ks], [sources[k] for k in ks])
                carried = {f.name: [rows[i][f.name] for i in kept] for f in CARRIED}
                extra = {
                    emb.IMAGE: _image_column([rows[i][PIXELS] for i in kept], self.engine.resolution),
                    **carried,
                    err.ROW: [rows[i].get(err.ROW) for i in kept],
                    res.TUNE_WORKER: [worker] * len(kept),
                }
                parts.append(conform(stored.filter(pa.array(finite, pa.bool_())), schema, extra))
        return pa.concat_tables([*parts, table_of(out, schema)])


def write_embeddings(table: pa.Table, *, folder: Location) -> pa.Table:
    """Write a batch's stage-1 rows as one Parquet file; its name comes from its ids, so a retried
    batch overwrites its own file instead of adding a copy."""
    ok = good_rows(table)
    if ok.any():
        stored = table.filter(pa.array(ok)).select(emb.present(table.column_names))
        name = hashlib.sha256("\n".join(sorted(stored.column(emb.ID).to_pylist())).encode()).hexdigest()[:20]
        buffer = io.BytesIO()
        pq.write_table(stored, buffer)
        (folder / f"part-{name}.parquet").write_bytes(buffer.getvalue())
    return table


def attach_targets(table: pa.Table, *, targets: dict) -> pa.Table:
    """Give stored stage-1 rows the targets to edit toward; ids without targets are dropped."""
    ids = table.column(emb.ID).to_pylist()
    table = table.filter(pa.array([i in targets for i in ids], pa.bool_())).select(
        emb.present(table.column_names)
    )
    if emb.MODEL_FAMILY not in table.column_names:  # written before SDXL support: SD 1.x/2.x
        table = table.append_column(pa.field(emb.MODEL_FAMILY, pa.string()), pa.array(["sd"] * len(table)))
    ids = table.column(emb.ID).to_pylist()
    for f in CARRIED:
        table = table.append_column(f, pa.array([targets[i].get(f.name) for i in ids], f.type))
    table = table.append_column(pa.field(res.TUNE_WORKER, pa.string()), pa.nulls(len(table), pa.string()))
    for f in err.ERROR_FIELDS:
        table = table.append_column(f, pa.nulls(len(table), f.type))
    return table


# --- stage 2: fan out and edit (GPU actors) --------------------------------------------------


class Edit(NamedTuple):
    """One edit of a stage-2 batch."""

    image: int  # the image's row in the batch
    target_index: int
    target: str
    eta: float
    plan: AttentionPlan | None = None  # attention control, when the config asks for it


class EditStage:
    """Holds one model (and a scorer, if given); maps stage-1 rows to one row per (image, target,
    eta) with its pixels and scores. Edits in ``done`` (``resume.edit_key``s an earlier run
    committed) are not made again."""

    def __init__(
        self,
        config: PTIConfig,
        model: Location,
        max_edits_per_call: int = 16,
        cpus: float = 1.0,
        expect_model=frozenset(),
        done=frozenset(),
        scorer: Location | None = None,
    ):
        self.engine = load_engine(config, model, expect_model, cpus)
        self.max_edits, self.done = max_edits_per_call, done
        self.scorer = None
        if scorer is not None:  # on the engine's device: the edits are scored where they are made
            from pipeline.engine.scoring import load_scorer

            device = str(self.engine.sd.device)
            self.scorer = load_scorer(scorer.uri, device, config.dtype, scorer.storage_options())

    def _scores(self, chunk: list[Edit], written: list[np.ndarray], inputs, meta: list[dict]) -> list[dict]:
        """Each edit's scores (``schemas.results.SCORES``; none without a scorer), from the images
        as written (uint8) and the batch's stored inputs (None: an older table without them)."""
        if self.scorer is None or not chunk:
            return [{} for _ in chunk]
        from pipeline.engine.scoring import edit_scores

        edited = as_pixels(np.stack(written))
        images = sorted({e.image for e in chunk})
        scores = edit_scores(
            self.scorer,
            edited,
            [e.target for e in chunk],
            inputs=None if inputs is None else inputs[images],
            image_of=[images.index(e.image) for e in chunk],
            sources=[meta[b][emb.SOURCE_PROMPT] for b in images],
        )
        return [{name: values[k] for name, values in scores.items()} for k in range(len(chunk))]

    def _fan_out(self, meta: list[dict]) -> tuple[list[Edit], list[dict]]:
        """Every edit of the batch's images still to make, with its attention plan; and an error
        for each target whose control cannot be planned (e.g. word alignment without a source
        prompt): that edit fails, the row's others go on."""
        edits, errors = [], []
        for b, row in enumerate(meta):
            for t, target in enumerate(row[man.TARGET_PROMPTS]):
                todo = [e for e in row[man.ETA] if edit_key(row[emb.ID], t, target, e) not in self.done]
                if not todo:
                    continue
                try:
                    plan = self.engine.attention_plan(
                        row[emb.SOURCE_PROMPT],
                        target,
                        row.get(man.BLEND_WORDS),
                        dict(row.get(man.REWEIGHT) or []),
                        name=f"row {row[emb.ID]!r}, target {t}",
                    )
                except Exception as exc:  # noqa: BLE001 (this target's edits fail, not the row's others)
                    kind, message = ("bad_control", str(exc)) if isinstance(exc, InputError) else failure(exc)
                    errors.append(err.error_of(row, err.EDIT, kind, message))
                    continue
                edits += [Edit(b, t, target, float(eta), plan) for eta in todo]
        return edits, errors

    @row_by_row(err.EDIT, lambda self: EDITED_SCHEMA)
    @metrics.timed_batches(err.EDIT)
    def __call__(self, table: pa.Table) -> pa.Table:
        from pipeline.engine.stored import inversion_from_arrow

        failpoint(err.EDIT)
        worker = worker_id()
        ok = good_rows(table)
        out = [  # the earlier stages' errors, as they came
            {
                **err.error_of(r, r[err.STAGE], r[err.KIND], r[err.MESSAGE]),
                res.TUNE_WORKER: r.get(res.TUNE_WORKER),
            }
            for r in table.filter(pa.array(~ok)).to_pylist()
        ]

        def error(e: Edit, kind: str, message: str) -> dict:  # one edit's
            where = _edit_name(e.target_index, e.eta)
            return {
                **err.error_of(meta[e.image], err.EDIT, kind, f"{where}: {message}"),
                res.EDIT_WORKER: worker,
            }

        good = table.filter(pa.array(ok))
        if not len(good):
            return table_of(out, EDITED_SCHEMA)
        inversion = inversion_from_arrow(good)
        inputs = stored_inputs(good)
        meta = good.drop_columns([c for c in emb.TENSOR_COLUMNS if c in good.column_names]).to_pylist()
        fan, refused = self._fan_out(meta)
        out += [{**e, res.EDIT_WORKER: worker} for e in refused]

        def edit(chunk: list[Edit]):
            """The chunk's edits as written (uint8; None where the model made NaN or inf), with
            their scores: retried on parts by split_on_failure, scoring included."""
            images = [e.image for e in chunk]
            guidance = [meta[b][emb.GUIDANCE] for b in images]
            targets, etas, plans = [e.target for e in chunk], [e.eta for e in chunk], [e.plan for e in chunk]
            pixels = self.engine.edit(inversion, images, targets, etas, guidance=guidance, plans=plans)
            written = [to_uint8(image) if bool(image.isfinite().all()) else None for image in pixels]
            made = [k for k, image in enumerate(written) if image is not None]
            scores = self._scores([chunk[k] for k in made], [written[k] for k in made], inputs, meta)
            by_edit = dict(zip(made, scores))
            return [(image, by_edit.get(k)) for k, image in enumerate(written)]

        chunks = (fan[start : start + self.max_edits] for start in range(0, len(fan), self.max_edits))
        began = time.perf_counter()
        for chunk, made in (part for c in chunks for part in split_on_failure(edit, c)):
            if isinstance(made, Exception):  # this edit fails (alone: split_on_failure); the others go on
                (e,) = chunk
                out.append(error(e, *failure(made)))
                began = time.perf_counter()
                continue
            seconds = (time.perf_counter() - began) / len(chunk)
            for e, (image, scores) in zip(chunk, made):
                row = meta[e.image]
                bad = {n: v for n, v in (scores or {}).items() if v is not None and not math.isfinite(v)}
                if image is None or bad:  # this edit fails, not its batch
                    what = f"its scores are not finite: {bad}" if bad else "the model produced NaN or inf"
                    out.append(error(e, "non_finite", what))
                    continue
                out.append(
                    {
                        res.ID: row[emb.ID],
                        res.TARGET_INDEX: e.target_index,
                        res.TARGET_PROMPT: e.target,
                        res.INSTRUCTION: man.instruction(row, e.target_index),
                        res.ETA: e.eta,
                        res.GUIDANCE: row[emb.GUIDANCE],
                        res.RECONSTRUCTION_PSNR: row[emb.RECONSTRUCTION_PSNR],
                        res.RECONSTRUCTION_SSIM: row[emb.RECONSTRUCTION_SSIM],
                        res.TUNE_SECONDS: row[emb.SECONDS],
                        res.EDIT_SECONDS: seconds,
                        res.CONFIG_FINGERPRINT: row[emb.CONFIG_FINGERPRINT],
                        res.TUNE_WORKER: row.get(res.TUNE_WORKER),
                        res.EDIT_WORKER: worker,
                        **scores,
                        EDITED: image.tobytes(),
                    }
                )
            began = time.perf_counter()
        return table_of(out, EDITED_SCHEMA)


def write_images(table: pa.Table, *, output: Output) -> pa.Table:
    """Encode each edit as PNG (on a CPU worker, not the GPU actor), write it under its
    deterministic key, and keep only its URI. An edit that cannot be encoded becomes that edit's
    error (stage ``write``); a store that refuses a write is the output's, and ends the job."""
    rows = table.select([res.ID, res.TARGET_INDEX, res.ETA, EDITED, *(f.name for f in err.ERROR_FIELDS)])
    rows = rows.to_pylist()
    for row in rows:
        raw, row[res.IMAGE_URI] = row.pop(EDITED), None
        if raw is None:
            continue
        try:
            side = int(round((len(raw) // 3) ** 0.5))
            png = encode_png(np.frombuffer(raw, np.uint8).reshape(side, side, 3))
        except Exception as exc:  # noqa: BLE001 (this edit's failure, not its batch's)
            kind, message = failure(exc)
            where = _edit_name(row[res.TARGET_INDEX], row[res.ETA])
            row |= {err.STAGE: err.WRITE, err.KIND: kind, err.MESSAGE: f"{where}: {message}"}
            continue
        location = output.image(row[res.ID], row[res.TARGET_INDEX], row[res.ETA])
        location.write_bytes(png)
        row[res.IMAGE_URI] = location.uri
    for name in (res.IMAGE_URI, *(f.name for f in err.ERROR_FIELDS if f.name != err.ROW)):
        column = pa.array([r[name] for r in rows], table.schema.field(name).type)
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table.drop_columns([EDITED])
