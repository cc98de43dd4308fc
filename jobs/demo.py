"""``make demo``: the main job (``jobs.run``) on embedded defaults, then its tunings edited again
under attention control (``jobs.edit``), side by side.

The shipped model of the rendered world (``models/shapes-sd``, trained here on the CPU), a bundled
manifest of held-out scenes with a colour edit and a shape edit each, local Ray and local files;
prints the run summary and where the outputs and a contact sheet are.
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
from pipeline.batch.jobs import run_all, run_edit
from pipeline.batch.output import Output
from pipeline.batch.report import edit_rows, labelled_sheet
from pipeline.engine.models import model_resolution
from pipeline.io.storage import Location
from pipeline.world import scenes as world

SCENES = 4


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
        pti=pti,
    )
    print_summary(run_all(config))
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


if __name__ == "__main__":
    main()
