"""Does the curation filter keep right edits and drop wrong ones? Measured on the rendered world,
where the truth of every edit is known (issue 24).

    python -m benchmarks.curation              # models/shapes-sd edits, models/shapes-clip scores

Held-out scenes (``world.held_out_scenes``) are inverted with PTI on the world's SD, and each
scene's colour edit and shape edit (``world.edit_targets``) is made at every eta. Each edit is:

- **right or wrong by the world's truth** (``world.score_edit``): right when it reaches the
  target (the object's colour, or a region closer to the target shape than to the source's) and
  keeps the rest: a colour edit keeps the object's outline (IoU >= ``KEEP_IOU``), a shape edit its
  colour, and both keep the background (PSNR >= ``KEEP_BACKGROUND_DB`` away from the objects);
- **scored** by the world's CLIP through the pipeline's own ``edit_scores``, on the edit as
  written (uint8) against the input and the captions, as the editing actor scores it;
- **judged** by ``curate.judge`` and **selected** by ``curate.select_best`` (one per scene and
  target), the code the jobs run.

Reported: each score's power to tell right from wrong alone (ROC AUC: the chance that a random
right edit outscores a random wrong one; 0.5 is chance); the filter's precision (right among kept)
and recall (kept among right) at InstructPix2Pix's thresholds and at thresholds fitted on the
first half of the scenes and measured on the second; and best-of-one selection: how often the
edit picked for an (image, target) is right, against how often the target has any right edit.

Writes ``docs/quality/curation.md`` and ``curation.json`` (every edit's scores and truth).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from benchmarks.common import add_set_option, markdown_table, measured_by, pti_settings
from benchmarks.edit_quality import KINDS, World, stage_one
from pipeline.batch.curate import CurateConfig, DatasetConfig, judge, select_best
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.engine.models import load_stable_diffusion
from pipeline.engine.scoring import edit_scores, load_scorer
from pipeline.io.images import to_uint8
from pipeline.world import scenes as world
from schemas import results as res

KEEP_IOU = 0.5  # a colour edit keeps the object's outline
KEEP_BACKGROUND_DB = 25.0  # and every edit the background (PSNR away from the objects)
THRESHOLDS = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
GRID = np.round(np.arange(-0.2, 0.951, 0.05), 2)  # candidate thresholds for the fit


def is_right(edit: np.ndarray, scene, truth, kind: str) -> bool:
    """The world's verdict on one edit (module docstring)."""
    scored = world.score_edit(edit, scene, truth, kind)
    kept = scored["object_iou"] >= KEEP_IOU if kind == "colour" else scored["colour_kept"]
    return bool(scored["success"] and kept and scored["background_psnr"] >= KEEP_BACKGROUND_DB)


def make_edits(args) -> tuple[list[dict], dict]:
    """Every (scene, kind, eta) edit: its truth and scores, one dict each; and the run's costs."""
    sd = load_stable_diffusion(args.model, device="cpu")
    scorer = load_scorer(args.scorer, device="cpu")
    scenes = World.held_out(args.images, sd.resolution)
    engine = Engine(sd, args.config)
    started = time.perf_counter()
    inversion, _ = stage_one(engine, scenes)
    stage_one_seconds = time.perf_counter() - started
    grid = [(b, kind, eta) for b in range(len(scenes)) for kind in KINDS for eta in args.etas]
    rows, started = [], time.perf_counter()
    for first in range(0, len(grid), args.max_rows):
        chunk = grid[first : first + args.max_rows]
        targets = [scenes.truths[b][kind].caption() for b, kind, _ in chunk]
        pixels = engine.edit(inversion, [b for b, _, _ in chunk], targets, [eta for _, _, eta in chunk])
        edits = [to_uint8(p) for p in pixels]  # as written: what is scored and judged
        written = torch.from_numpy(np.stack(edits)).permute(0, 3, 1, 2).float() / 255
        images = sorted({b for b, _, _ in chunk})
        scores = edit_scores(
            scorer,
            written,
            targets,
            inputs=scenes.pixels[images],
            image_of=[images.index(b) for b, _, _ in chunk],
            sources=[scenes.sources[b] for b in images],
        )
        for k, (b, kind, eta) in enumerate(chunk):
            rows.append(
                {
                    res.ID: f"scene-{b:03d}",
                    res.TARGET_INDEX: KINDS.index(kind),
                    res.ETA: eta,
                    "kind": kind,
                    "right": is_right(edits[k], scenes.scenes[b], scenes.truths[b][kind], kind),
                    **{name: scores[name][k] for name in res.SCORES},
                }
            )
    costs = {
        "stage_one_seconds_per_image": stage_one_seconds / len(scenes),
        "edit_and_score_seconds_per_edit": (time.perf_counter() - started) / len(grid),
    }
    return rows, costs


def roc_auc(scores: list[float], right: list[bool]) -> float | None:
    """P(a right edit's score > a wrong one's), ties counting half (torchmetrics' AUROC); None
    without both kinds."""
    from torchmetrics.functional.classification import binary_auroc

    if all(right) or not any(right):
        return None
    return float(binary_auroc(torch.tensor(scores, dtype=torch.float64), torch.tensor(right).long()))


def filter_quality(rows: list[dict], curate: CurateConfig) -> dict:
    """Kept, precision and recall of ``curate`` on these edits; and best-of-one selection."""
    table = judge(pa.Table.from_pylist(rows), curate)
    kept = table.column(res.KEPT).to_pylist()
    right = [r["right"] for r in rows]
    hits = sum(k and r for k, r in zip(kept, right))
    chosen = select_best(table, DatasetConfig(best_of=1))  # the rows' own "right" rides along
    targets = {(r[res.ID], r[res.TARGET_INDEX]) for r in rows}
    reachable = {(r[res.ID], r[res.TARGET_INDEX]) for r in rows if r["right"]}
    return {
        "edits": len(rows),
        "right": sum(right),
        "base_rate": sum(right) / len(rows),
        "kept": sum(kept),
        "precision": hits / sum(kept) if sum(kept) else None,
        "recall": hits / sum(right) if sum(right) else None,  # the share of right edits kept
        "wrong_kept": (sum(kept) - hits) / (len(rows) - sum(right)) if len(rows) > sum(right) else None,
        "targets": len(targets),
        "targets_with_a_right_edit": len(reachable),
        "targets_selected": len(chosen),
        "selected_right": sum(chosen.column("right").to_pylist()),
    }


def f1(quality: dict) -> float:
    p, r = quality["precision"] or 0.0, quality["recall"] or 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def fit_thresholds(rows: list[dict]) -> CurateConfig:
    """The thresholds on clip_sim_1 and clip_sim_dir (the others off) that maximise F1 on
    ``rows``: the two scores that say whether an edit shows its target and changed as asked."""
    best, best_f1 = CurateConfig(), -1.0
    for low_1, low_dir in itertools.product(GRID, GRID):
        curate = CurateConfig(
            min_clip_sim_0=None,
            min_clip_sim_1=float(low_1),
            min_clip_sim_dir=float(low_dir),
            min_clip_sim_image=None,
        )
        score = f1(filter_quality(rows, curate))
        if score > best_f1:
            best, best_f1 = curate, score
    return best


def measure(rows: list[dict]) -> dict:
    half = sorted({r[res.ID] for r in rows})[: len({r[res.ID] for r in rows}) // 2]
    fit_rows = [r for r in rows if r[res.ID] in half]
    test_rows = [r for r in rows if r[res.ID] not in half]
    fitted = fit_thresholds(fit_rows)
    right = [r["right"] for r in rows]
    return {
        "auc": {
            name: roc_auc([r[name] for r in rows], right) for name in res.SCORES if rows[0][name] is not None
        },
        "instructpix2pix": filter_quality(rows, CurateConfig()),
        "instructpix2pix_test_half": filter_quality(test_rows, CurateConfig()),
        "fitted": {"thresholds": fitted.thresholds(), **filter_quality(test_rows, fitted)},
        "by_kind": {
            kind: filter_quality([r for r in rows if r["kind"] == kind], CurateConfig()) for kind in KINDS
        },
    }


QUALITY_COLUMNS = {
    "thresholds": "thresholds",
    "edits": "edits",
    "base_rate": "right (base rate)",
    "kept": "kept",
    "precision": "precision",
    "recall": "recall",
    "wrong_kept": "wrong kept",
    "selected_right": "selected right",
    "targets_selected": "targets with a kept edit",
    "targets_with_a_right_edit": "targets with a right edit",
    "targets": "targets",
}


def write_markdown(result: dict, args, path: Path) -> None:
    m = result["measured"]
    lines = [
        "# Curation on the rendered world: does the filter keep right edits?",
        "",
        measured_by("benchmarks.curation", args.argv) + f": model `{args.model}`, "
        f"scorer `{args.scorer}`, {args.images} held-out scenes, colour and shape edits at etas "
        f"{', '.join(f'{e:g}' for e in args.etas)}, PTI T={args.config.steps}, "
        f"K={args.config.inner_steps}, w={args.config.guidance:g}. "
        f"{result['costs']['stage_one_seconds_per_image']:.1f} s per image of stage 1, "
        f"{result['costs']['edit_and_score_seconds_per_edit']:.2f} s per edit with its scores.",
        "",
        f"Right: the world's truth (`benchmarks/curation.py`): the target colour or shape reached, the "
        f"object's outline (IoU >= {KEEP_IOU}) or colour kept, the background at >= "
        f"{KEEP_BACKGROUND_DB:g} dB. InstructPix2Pix's thresholds: "
        + ", ".join(f"`min_{k}` {v:g}" for k, v in CurateConfig().thresholds().items())
        + ".",
        "",
        "Each score alone (ROC AUC: the chance that a right edit outscores a wrong one; 0.5 is chance):",
        "",
        markdown_table(
            [{"score": f"`{k}`", "auc": v} for k, v in m["auc"].items()], {"score": "score", "auc": "AUC"}
        ),
        "",
        "The filter (precision: right among kept, against the base rate, the precision of keeping "
        "everything; recall: the share of right edits kept; wrong kept: the share of wrong edits "
        "kept) and best-of-one selection per (scene, target) (`curate.select_best`: how many of the "
        "targets with a kept edit get a right one, and how many targets have a right edit at all):",
        "",
        markdown_table(
            [
                {"thresholds": "InstructPix2Pix's, all scenes", **m["instructpix2pix"]},
                *(
                    {"thresholds": f"InstructPix2Pix's, {kind} edits", **q}
                    for kind, q in m["by_kind"].items()
                ),
                {"thresholds": "InstructPix2Pix's, second half", **m["instructpix2pix_test_half"]},
                {**m["fitted"], "thresholds": "fitted on the first half, second half"},
            ],
            QUALITY_COLUMNS,
        ),
        "",
        "Fitted thresholds: "
        + ", ".join(f"`min_{k}` {v:g}" for k, v in m["fitted"]["thresholds"].items())
        + " (the others off).",
        "",
    ]
    path.write_text("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="models/shapes-sd")
    parser.add_argument("--scorer", default="models/shapes-clip")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--etas", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8, 1.0])
    add_set_option(parser)
    parser.add_argument("--max-rows", type=int, default=64, help="edits per engine call")
    parser.add_argument("--out", type=Path, default=Path("docs/quality"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.config = PTIConfig(model=args.model, progress=False, **pti_settings(args.set))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    rows, costs = make_edits(args)
    result = {"measured": measure(rows), "costs": costs, "edits": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curation.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args, args.out / "curation.md")
    print((args.out / "curation.md").read_text())
    return result


if __name__ == "__main__":
    main()
