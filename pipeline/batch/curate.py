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

from pipeline.errors import InputError
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
