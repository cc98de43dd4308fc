"""``make demo``: the main job (``jobs.run``) on embedded defaults, its kept edits as a training
set (``jobs.dataset``), then its tunings edited again under attention control (``jobs.edit``),
side by side.

The shipped model of the rendered world (``models/shapes-sd``) and the world's CLIP that scores
its edits (``models/shapes-clip``), both trained here on the CPU; a bundled manifest of held-out
scenes with a colour edit and a shape edit each, local Ray and local files. Prints the summaries and
where the outputs, the training set and a contact sheet are.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.common import print_summary
from pipeline.batch.config import RunConfig
from pipeline.batch.curate import CurateConfig
from pipeline.batch.dataset import run_dataset
from pipeline.batch.jobs import run_all, run_edit
from pipeline.batch.output import Output
from pipeline.batch.report import edit_rows, labelled_sheet
from pipeline.engine.checkpoints import model_resolution
from pipeline.io.storage import Location
from pipeline.world import scenes as world

SCENES = 4
SCORER = "models/shapes-clip"  # the world's CLIP (pipeline/world/clip.py): scores mean something here
# Thresholds for that CLIP, fitted against the world's truth (docs/quality/curation.md): a CLIP's
# cosines have its own scale, and InstructPix2Pix's (fitted to ViT-L/14) keep this one's wrong edits.
WORLD_CLIP_CURATE = CurateConfig(
    min_clip_sim_0=None, min_clip_sim_1=0.85, min_clip_sim_dir=0.75, min_clip_sim_image=None
)


def write_manifest(folder: Path, resolution: int) -> Path:
    """Held-out scenes at the model's resolution, each with its colour and shape edit as targets;
    the last has no source prompt (PTI needs none)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, scene in enumerate(world.held_out_scenes(SCENES, resolution)):
        path = folder / "images" / f"scene-{n}.png"
        Image.fromarray(scene.render()).save(path)
        targets = [t.caption() for t in world.edit_targets(scene, n).values()]
        source = scene.caption() if n < SCENES - 1 else None
        rows.append(
            {"id": f"scene-{n}", "image": str(path), "source_prompt": source, "target_prompts": targets}
        )
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return folder / "manifest.parquet"


def write_contact_sheet(output: Path, controlled: Path, manifest: Path) -> Path:
    """One row per image: the input, its plain edits in results order, then its controlled ones,
    each captioned as plain or controlled with its eta and prompt."""
    rows: dict[str, list] = {}
    for kind, folder in (("plain", output), ("controlled", controlled)):
        edits = Output.at(str(folder))
        done = edits.results.read_columns(["id"])
        ids = sorted(set(done["id"].to_pylist())) if done is not None else []
        for row_id, row in zip(ids, edit_rows(edits, Location(str(manifest)))):  # both in id order
            captioned = [(pixels, f"{kind}, {caption}") for pixels, caption in row[1:]]
            rows[row_id] = rows[row_id] + captioned if row_id in rows else [row[0], *captioned]
    path = output / "demo_contact_sheet.png"  # beside jobs.run's own contact_sheet.png (plain edits)
    labelled_sheet(list(rows.values())).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/shapes-sd")
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--scorer", default=SCORER, help="the CLIP that scores every edit")
    args = parser.parse_args(argv)
    output = Path(args.out)
    if (output / "config-run.yaml").is_file() and (output / "inputs").is_dir():
        # An earlier demo's output: start afresh, so the demo always shows a whole run (a re-run
        # on the same output would resume it and do nothing).
        shutil.rmtree(output)
    manifest = write_manifest(output / "inputs", model_resolution(args.model))
    pti = dict(model=args.model, progress=False)
    config = RunConfig(
        manifest=str(manifest),
        output=str(output),
        gpus_per_actor=0,
        tune_actors=1,
        edit_actors=1,
        scorer=args.scorer,
        curate=WORLD_CLIP_CURATE if args.scorer == SCORER else CurateConfig(),
        pti=pti,
    )
    print_summary(run_all(config))
    # The kept edits (InstructPix2Pix's thresholds on the world CLIP's scores), the best of each
    # (scene, target), as a dataset that datasets.load_dataset reads.
    dataset = run_dataset(config)
    print_summary(dataset)
    # The same tunings edited again under attention control (Prompt-to-Prompt), beside the plain
    # edits: a stage-2 choice, so jobs.edit reuses the stored embeddings.
    controlled = output / "controlled"
    control = dict(control="auto", local_blend=True)
    edit = replace(
        config,
        output=str(controlled),
        embeddings=str(output / "embeddings"),
        max_failed_fraction=0.5,  # scene-3's failure below is on purpose
        pti={**pti, **control},
    )
    print_summary(run_edit(edit))
    print(
        "scene-3 has no source prompt: PTI tunes it without one, but word alignment needs one, so its "
        "controlled edits are an error row (controlled/errors/)"
    )
    sheet = write_contact_sheet(output, controlled, manifest)
    print(f"contact sheet (a row per scene: input, plain edits, controlled edits, captioned): {sheet}")
    print(
        f"training set: {dataset['rows']} kept edits under {dataset['dataset']}; read it with "
        f"datasets.load_dataset({dataset['dataset']!r}, split='train') (README, A training set)"
    )


if __name__ == "__main__":
    main()
