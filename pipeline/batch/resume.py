"""Resuming a job on an output it (or another job) wrote before: what is already committed there.

Work is committed when its file is: an embeddings file per tuned batch, a results file per flush
of the driver, each written all at once (``Location.write_bytes``). A re-run reads the ids and
edit keys of those files and does only the rest, so a job killed at any point and run again ends
with the outputs of an uninterrupted run, with no row or image twice.

Ray Data's own checkpointing does not fit here: it skips input rows by id, but a row of this
pipeline fans out into many edits, of which a killed run may have committed some; and stored
embeddings must be read back (not recomputed) for rows tuned but not fully edited. So the driver
reads the committed keys itself and splits the manifest into rows to tune, rows to edit from
their stored embeddings (only the missing edits) and rows already done.

Outputs are matched by id and config: a re-run with other settings that shape the outputs is
refused (it would mix two configs in one output), and the stages refuse a model whose content
differs from the one that made the stored embeddings. Together these make "same id" mean "same
config fingerprint".
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.batch.config import RunConfig, parse_yaml
from pipeline.batch.output import Output
from pipeline.io.storage import Location
from pipeline.engine.config import EDIT_FIELDS, STORED_FIELDS
from schemas import embeddings as emb
from schemas import manifest as man
from schemas import results as res
from schemas.stages import CARRIED

JOBS = ("run", "tune", "edit")


def edit_key(row_id: str, target_index: int, target: str, eta: float) -> tuple:
    """An edit as resuming matches it to the results table's: its eta by the name of its image
    (``schemas.manifest.eta_name``), so an edit counts as made exactly when its image is."""
    return (row_id, int(target_index), target, man.eta_name(eta))


def check_same_settings(config: RunConfig, job: str) -> None:
    """Refuse to add to an output that jobs with other settings wrote (their configs lie there)."""
    for other in JOBS:
        try:
            before = RunConfig.from_dict(parse_yaml(config.output_location.config_file(other).read_bytes()))
        except FileNotFoundError:
            continue
        names = EDIT_FIELDS if "tune" not in (job, other) else STORED_FIELDS  # tuning makes no edits
        changed = [
            f"pti.{n} was {getattr(before.pti, n)!r}, now {getattr(config.pti, n)!r}"
            for n in names
            if getattr(before.pti, n) != getattr(config.pti, n)
        ]
        if "tune" not in (job, other):  # one scorer and one set of thresholds per results table
            if before.scorer != config.scorer:
                changed.append(f"scorer was {before.scorer!r}, now {config.scorer!r}")
            if before.curate != config.curate:
                changed.append(f"curate was {before.curate}, now {config.curate}")
        if changed:
            raise InputError(
                f"output {config.output} holds a {other} job's outputs made with other settings "
                f"({'; '.join(changed)}): write to a new output, or use the same settings to resume it"
            )


@dataclass
class Committed:
    """What an output already holds."""

    tuned: dict[str, str] = field(default_factory=dict)  # id -> the embeddings file holding it
    edits: set[tuple] = field(default_factory=set)  # edit_key of every results row
    model_fingerprints: set[str] = field(default_factory=set)  # of the stored embeddings
    model_families: set[str] = field(default_factory=set)  # of the stored embeddings ("sd" before SDXL)

    def check_model_family(self, config: RunConfig) -> None:
        """Refuse a model of another family than the one that wrote the stored embeddings (an SD
        1.x table edited with SDXL, or the reverse) before any work: their stacks have other shapes
        and meanings; and attention control on a family it does not run on. Reads only the model's
        index and denoiser config."""
        from pipeline.engine.checkpoints import FAMILIES, control_problem, model_family

        if not self.model_families and config.pti.control == "none":
            return
        options = Location(config.pti.model, config.endpoint_url).storage_options()
        model = model_family(config.pti.model, storage_options=options)
        if problem := control_problem(model, config.pti.control):
            raise InputError(f"model {config.pti.model!r}: {problem}")
        if self.model_families - {model}:
            names = " and ".join(f"{FAMILIES[f]} ({f})" for f in sorted(self.model_families))
            raise InputError(
                f"the embeddings under {config.output_location.embeddings} were made by {names}, but "
                f"model {config.pti.model!r} is {FAMILIES[model]} ({model}): their stacks cannot be "
                "edited or added to with it; use a model of the same family, or write to a new output"
            )

    def missing_edits(self, row_id: str, targets: list[str], etas: list[float]) -> list[tuple]:
        keys = (edit_key(row_id, t, target, eta) for t, target in enumerate(targets) for eta in etas)
        return [k for k in keys if k not in self.edits]


def read_committed(output: Output, results: bool) -> Committed:
    """The ids in the embeddings (with their files) and, if ``results``, the edits in the results."""
    import pyarrow.dataset as pads

    committed = Committed()
    files = output.embeddings.parquet_files()
    if files:
        fs, _ = output.embeddings.filesystem()
        # An explicit schema: files written before model_family existed read it as null (sd).
        schema = pa.schema(
            [(emb.ID, pa.string()), (emb.MODEL_FINGERPRINT, pa.string()), (emb.MODEL_FAMILY, pa.string())]
        )
        scan = pads.dataset(files, schema=schema, filesystem=fs, format="parquet")
        table = scan.to_table(columns=[emb.ID, emb.MODEL_FINGERPRINT, emb.MODEL_FAMILY, "__filename"])
        committed.tuned = dict(zip(table.column(emb.ID).to_pylist(), table.column("__filename").to_pylist()))
        committed.model_fingerprints = set(pc.unique(table.column(emb.MODEL_FINGERPRINT)).to_pylist())
        committed.model_families = set(table.column(emb.MODEL_FAMILY).fill_null("sd").unique().to_pylist())
    table = results and read_results(output, [res.ID, res.TARGET_INDEX, res.TARGET_PROMPT, res.ETA])
    if table:
        committed.edits = {
            edit_key(*row) for row in zip(*(table.column(c).to_pylist() for c in table.column_names))
        }
    return committed


def written_order(path: str) -> str:
    """A results file's place in time: the driver names them ``{job}-{UTC time}-{attempt}-{n}``."""
    return posixpath.basename(path).partition("-")[2]


def read_results(output: Output, columns: list[str]) -> pa.Table | None:
    """Columns of an output's results table, one row per edit (``schemas.results.KEY``), or None
    if it has none. A results table an older version wrote may hold an edit twice: the row the
    latest attempt wrote is kept, as its image is the one on disk. A column that files an older
    version wrote lack (scores, instructions) reads as null there."""
    files = sorted(output.results.parquet_files(), key=written_order)
    if not files:
        return None
    fs, _ = output.results.filesystem()
    key = list(res.KEY)
    dataset = pq.ParquetDataset(files, filesystem=fs, schema=res.RESULTS_SCHEMA)
    table = dataset.read(columns=list(dict.fromkeys([*key, *columns])))
    return one_per_key(table, key, "max").select(columns)


def one_per_key(table: pa.Table, key: list[str], which: str = "max") -> pa.Table:
    """One row per value of ``key``: the last of its rows in table order (``which`` ``max``) or
    the first (``min``), in table order."""
    order = table.select(key).append_column("_order", pa.array(np.arange(len(table))))
    kept = order.group_by(key, use_threads=False).aggregate([("_order", which)])
    return table.take(np.sort(kept.column(f"_order_{which}").to_numpy()))


def manifest_targets(config: RunConfig, ids: set[str]) -> dict[str, dict]:
    """id -> what stage 2 needs of the manifest rows with these ids (few: only those that were
    tuned before), read without their images: the ``schemas.stages.CARRIED`` columns. Only rows
    that pass the manifest's checks: the read stage, which checks every row, reports the others."""
    import pyarrow.dataset as pads

    if not ids:
        return {}
    fs, _ = config.manifest_location.filesystem()
    files, _ = config.manifest_location.parquet_input()  # checked by the job before
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    columns = [c for c in TARGET_COLUMNS if c in dataset.schema.names]
    table = dataset.to_table(
        columns=columns, filter=pc.field(man.ID).isin(pa.array(sorted(ids), pa.string()))
    )
    good, _ = checked_targets(table.to_pylist(), config.pti.etas)
    return good


# What a job that edits reads of a manifest or targets table: never the images.
TARGET_COLUMNS = (man.ID, man.TARGET_PROMPT, *(f.name for f in CARRIED))


def checked_targets(rows: list[dict], etas: tuple[float, ...]) -> tuple[dict[str, dict], list[dict]]:
    """Rows of a table of targets (a manifest read without its images) checked as manifest rows
    are: id -> its ``schemas.stages.CARRIED`` values for each good row (``etas`` where it has
    none), and an error row for each bad one."""
    rows = [{man.IMAGE: "-", **r} for r in rows]  # images are not read
    good, errors = man.validate_rows(rows, etas=etas)
    return {r[man.ID]: {f.name: r.get(f.name) for f in CARRIED} for r in good}, errors
