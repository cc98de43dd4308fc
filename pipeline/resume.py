"""Resuming a job on an output it (or another job) wrote before: what is already committed there.

Work is committed when its file is: an embeddings file per tuned batch, a results file per flush
of the driver, each written all at once (``storage.write_bytes``). A re-run reads the ids and
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

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from pipeline.errors import InputError
from pipeline.run_config import RunConfig
from pipeline.storage import arrow_filesystem, join, parquet_files, read_object, read_columns
from schemas import embeddings as emb
from schemas import manifest as man
from schemas import results as res

# The PTI settings that shape stage 1's outputs (those of PTIConfig.stage_one_fingerprint and the
# stored precision), and those that also shape the edits. Device and progress bars do not.
STAGE_ONE_SETTINGS = ("method", "steps", "guidance", "inversion_guidance", "inner_steps", "lr", "early_stop",
                      "stop_eps", "stop_slack", "resolution", "seed", "dtype", "embedding_dtype")  # fmt: skip
EDIT_SETTINGS = (*STAGE_ONE_SETTINGS, "etas")
JOBS = ("run", "tune", "edit")


def eta_key(eta: float) -> float:
    """An eta as the results table stores it (float32), for matching."""
    return round(float(np.float32(eta)), 5)


def edit_key(row_id: str, target_index: int, target: str, eta: float) -> tuple:
    return (row_id, int(target_index), target, eta_key(eta))


def check_same_settings(config: RunConfig, job: str) -> None:
    """Refuse to add to an output that jobs with other settings wrote (their configs lie there)."""
    for other in JOBS:
        uri = join(config.output, f"config-{other}.yaml")
        try:
            before = RunConfig.from_dict(yaml.safe_load(read_object(uri, config.endpoint_url)))
        except FileNotFoundError:
            continue
        names = EDIT_SETTINGS if "tune" not in (job, other) else STAGE_ONE_SETTINGS
        changed = [f"pti.{n} was {getattr(before.pti, n)!r}, now {getattr(config.pti, n)!r}"
                   for n in names if getattr(before.pti, n) != getattr(config.pti, n)]  # fmt: skip
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

    def missing_edits(self, row_id: str, targets: list[str], etas: list[float]) -> list[tuple]:
        return [k for t, target in enumerate(targets) for eta in etas
                if (k := edit_key(row_id, t, target, eta)) not in self.edits]  # fmt: skip


def read_committed(config: RunConfig, results: bool) -> Committed:
    """The ids in the embeddings (with their files) and, if ``results``, the edits in the results."""
    import pyarrow.dataset as pads

    committed = Committed()
    files = parquet_files(config.embeddings_uri, config.endpoint_url)
    if files:
        fs, _ = arrow_filesystem(config.embeddings_uri, config.endpoint_url)
        scan = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=[emb.ID, emb.MODEL_FINGERPRINT, "__filename"])
        committed.tuned = dict(zip(scan.column(emb.ID).to_pylist(), scan.column("__filename").to_pylist()))
        committed.model_fingerprints = set(pc.unique(scan.column(emb.MODEL_FINGERPRINT)).to_pylist())
    table = results and read_columns(join(config.output, "results"), [res.ID, res.TARGET_INDEX, res.TARGET_PROMPT, res.ETA], config.endpoint_url)
    if table:
        committed.edits = {edit_key(*row) for row in zip(*(table.column(c).to_pylist() for c in table.column_names))}
    return committed


def manifest_targets(config: RunConfig, ids: set[str]) -> dict[str, tuple[list[str], list[float]]]:
    """id -> (target prompts, etas) of the manifest rows with these ids (few: only those that
    were tuned before), read without their images."""
    import pyarrow.dataset as pads

    if not ids:
        return {}
    fs, path = arrow_filesystem(config.manifest, config.endpoint_url)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    columns = [c for c in (man.ID, man.TARGET_PROMPTS, man.TARGET_PROMPT, man.ETA) if c in dataset.schema.names]
    table = dataset.to_table(columns=columns, filter=pc.field(man.ID).isin(pa.array(sorted(ids), pa.string())))
    out = {}
    for row in table.to_pylist():
        targets = row.get(man.TARGET_PROMPTS)
        if targets is None:
            targets = [row[man.TARGET_PROMPT]] if row.get(man.TARGET_PROMPT) is not None else []
        out[row[man.ID]] = (targets, row.get(man.ETA) or list(config.pti.etas))
    return out
