"""Which scored edits a training set keeps (issue 24): a threshold per score, judged as results
stream in, so every edit's verdict and reasons sit in its results row (rejected edits are never
dropped) and the summary counts kept and rejected edits by reason.

The defaults are InstructPix2Pix's generator's (timothybrooks/instruct-pix2pix,
``dataset_creation/generate_img_dataset.py``: ``--clip-threshold 0.2`` on both image-caption
similarities, ``--clip-dir-threshold 0.2``, ``--clip-img-threshold 0.7``). A score that is not
defined for an edit (null: no source prompt for ``clip_sim_0`` and ``clip_sim_dir``) is not a
reason to reject it; an edit with no scores at all (no scorer) has no verdict (``kept`` null).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from schemas import dataset as ds
from schemas import results as res


@dataclass(frozen=True)
class CurateConfig:
    """The lowest value of each score an edit must reach to be kept; None: not checked."""

    __pydantic_config__ = {"extra": "forbid"}  # for RunConfig.from_dict's validator

    min_clip_sim_0: float | None = 0.2  # the input against its source prompt (InstructPix2Pix: 0.2)
    min_clip_sim_1: float | None = 0.2  # the edit against its target prompt (0.2)
    min_clip_sim_dir: float | None = 0.2  # the image's change against the prompts' change (0.2)
    min_clip_sim_image: float | None = 0.7  # the edit against the input (0.7)
    min_input_ssim: float | None = None  # structure kept; no published default

    def __post_init__(self):
        bad = [
            f"{f.name} must be a number in [-1, 1] or null, got {getattr(self, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) is not None and not -1 <= getattr(self, f.name) <= 1
        ]
        if bad:
            raise InputError("invalid run config: curate." + "; curate.".join(bad))

    def thresholds(self) -> dict[str, float]:
        """Score column -> its lowest kept value, for the scores that are checked."""
        values = {f.name.removeprefix("min_"): getattr(self, f.name) for f in fields(self)}
        return {name: low for name, low in values.items() if low is not None}


def judge(table: pa.Table, curate: CurateConfig) -> pa.Table:
    """Results rows with their verdict: ``kept`` (null for an edit without scores) and
    ``rejected_by`` (each score under its threshold, ``clip_sim_dir 0.13 < 0.2``; null when kept)."""
    thresholds = curate.thresholds()
    scores = {name: table.column(name).to_pylist() for name in res.SCORES}
    kept, reasons = [], []
    for k in range(len(table)):
        if all(scores[name][k] is None for name in res.SCORES):
            kept.append(None)
            reasons.append(None)
            continue
        under = [
            f"{name} {scores[name][k]:.3g} < {low:g}"
            for name, low in thresholds.items()
            if scores[name][k] is not None and scores[name][k] < low
        ]
        kept.append(not under)
        reasons.append("; ".join(under) or None)
    for name, values, type_ in ((res.KEPT, kept, pa.bool_()), (res.REJECTED_BY, reasons, pa.string())):
        column = pa.array(values, type_)
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, column)
        else:
            table = table.append_column(pa.field(name, type_), column)
    return table


def tally(table: pa.Table) -> Counter:
    """Judged results rows counted: ``kept``, ``rejected``, and each score that rejected edits."""
    counts = Counter()
    verdicts = zip(table.column(res.KEPT).to_pylist(), table.column(res.REJECTED_BY).to_pylist())
    for kept, reasons in verdicts:
        if kept is None:
            continue
        counts["kept" if kept else "rejected"] += 1
        for reason in (reasons or "").split("; "):
            if reason:
                counts[f"rejected_by_{reason.split()[0]}"] += 1
    return counts


RANKS = tuple(res.SCORES)  # the scores a training set may rank kept edits by


@dataclass(frozen=True)
class DatasetConfig:
    """``jobs.dataset``: which kept edits make the training set, and where it goes."""

    __pydantic_config__ = {"extra": "forbid"}  # for RunConfig.from_dict's validator

    output: str | None = None  # the set's folder (any fsspec URI); default {output}/dataset
    # Kept edits per (id, target_index), best first by rank_by: InstructPix2Pix keeps 4 of its
    # candidates (--max-out-samples), "one good edit per target" is 1. None: every kept edit.
    best_of: int | None = 1
    rank_by: str = res.CLIP_SIM_DIR  # InstructPix2Pix's sort; clip_sim_1 where it is null (no source)
    rows_per_file: int = 1_000  # edits per Parquet file of the set (each holds both images' PNGs)

    def __post_init__(self):
        problems = []
        if self.best_of is not None and self.best_of < 1:
            problems.append(f"best_of must be at least 1 or null (every kept edit), got {self.best_of}")
        if self.rank_by not in RANKS:
            problems.append(f"rank_by must be one of {', '.join(RANKS)}, got {self.rank_by!r}")
        if self.rows_per_file < 1:
            problems.append(f"rows_per_file must be at least 1, got {self.rows_per_file}")
        if problems:
            raise InputError("invalid run config: dataset." + "; dataset.".join(problems))


def select_best(table: pa.Table, dataset: DatasetConfig) -> pa.Table:
    """The kept edits of judged results rows, ranked within their (id, target_index) by
    ``dataset.rank_by`` (higher first; ``clip_sim_1`` where it is null; the smaller eta on a
    tie), each with its ``rank`` (1: best), at most ``dataset.best_of`` per (id, target_index).
    Sorted by id, target_index and rank."""
    kept = table.filter(pc.fill_null(table.column(res.KEPT), False))
    score = pc.coalesce(kept.column(dataset.rank_by), kept.column(res.CLIP_SIM_1))
    keys = [(res.ID, "ascending"), (res.TARGET_INDEX, "ascending"), ("_score", "descending")]
    order = pc.sort_indices(kept.append_column("_score", score), [*keys, (res.ETA, "ascending")])
    ranked = kept.take(order)
    groups = list(zip(ranked.column(res.ID).to_pylist(), ranked.column(res.TARGET_INDEX).to_pylist()))
    ranks = [1] * len(groups)
    for k in range(1, len(groups)):
        ranks[k] = ranks[k - 1] + 1 if groups[k] == groups[k - 1] else 1
    ranked = ranked.append_column(pa.field(ds.RANK, pa.int32()), pa.array(ranks, pa.int32()))
    if dataset.best_of is not None:
        ranked = ranked.filter(pc.less_equal(ranked.column(ds.RANK), dataset.best_of))
    return ranked
