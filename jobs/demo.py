"""``make demo``: the main job (``jobs.run``) on embedded defaults.

The shipped model of the rendered world (``models/shapes-sd``, trained here on the CPU), a bundled
manifest of held-out scenes with a colour edit and a shape edit each, local Ray and local files;
prints the run summary and where the outputs and a contact sheet are.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.common import print_summary
from pipeline.world import scenes as world
from pipeline.batch.jobs import run_all
from pipeline.io.images import contact_sheet
from pipeline.batch.output import Output
from pipeline.batch.report import edit_rows
from pipeline.io.storage import Location
from pipeline.batch.config import RunConfig

SCENES = 4


def write_manifest(folder: Path) -> Path:
    """Held-out scenes, each with its colour and shape edit as targets; the last has no source
    prompt (PTI needs none)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, scene in enumerate(world.held_out_scenes(SCENES, 64)):
        path = folder / "images" / f"scene-{n}.png"
        Image.fromarray(scene.render()).save(path)
        targets = [t.caption() for t in world.edit_targets(scene, n).values()]
        source = scene.caption() if n < SCENES - 1 else None
        rows.append(
            {"id": f"scene-{n}", "image": str(path), "source_prompt": source, "target_prompts": targets}
        )
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return folder / "manifest.parquet"


def write_contact_sheet(output: Path, manifest: Path) -> Path:
    """One row per image: the input, then its edits in results order."""
    path = output / "contact_sheet.png"
    contact_sheet(edit_rows(Output.at(str(output)), Location(str(manifest)))).save(path)
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
    manifest = write_manifest(output / "inputs")
    config = RunConfig(
        manifest=str(manifest),
        output=str(output),
        gpus_per_actor=0,
        tune_actors=1,
        edit_actors=1,
        pti=dict(model=args.model, progress=False),
    )
    summary = run_all(config)
    print_summary(summary)
    print(f"contact sheet: {write_contact_sheet(output, manifest)}")


if __name__ == "__main__":
    main()
