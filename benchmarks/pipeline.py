"""What the Ray pipeline costs beyond the engine.

    python -m benchmarks.pipeline                       # jobs.run against the engine alone

The same rows (scikit-image photographs), model and config, first through the engine
alone in one process (decode, stage 1 in batches of ``tune_batch_size``, stage 2, PNG encoding),
then through ``jobs.run`` (``run_all``) on a local Ray with one tuning and one editing actor. The
job runs on ``rows`` and on twice as many: the difference is its cost per row at scale, the rest
is its fixed cost per job (actor start-up, model loads). Ray's own start is timed apart.

The driver's memory as the manifest grows (flat from 100 to 10,000 rows: it streams) was measured
with ``--driver-memory``, which left after commit e43f36c (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import (
    add_set_option,
    append_record,
    markdown_table,
    model_folder,
    pti_settings,
    write_rows,
)

TARGETS = ["a photo of a cat", "a watercolor painting of a dog"]


def write_manifest(folder: Path, rows: int) -> str:
    """``rows`` rows over scikit-image's three photographs (96 px PNG files), all with ``TARGETS``."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, photo in (
        ("astronaut", data.astronaut()),
        ("chelsea", data.chelsea()),
        ("coffee", data.coffee()),
    ):
        paths.append(folder / f"{name}.png")
        Image.fromarray(photo).resize((96, 96)).save(paths[-1])
    table = pa.table(
        {
            "id": [f"row-{i:06d}" for i in range(rows)],
            "image": [str(paths[i % 3]) for i in range(rows)],
            "target_prompts": [TARGETS] * rows,
        }
    )
    path = folder / f"manifest-{rows}.parquet"
    pq.write_table(table, path)
    return str(path)


def engine_alone(config, manifest: str) -> dict:
    """The pipeline's work for these rows in one process, with no Ray: seconds per row."""
    import torch

    from pipeline.engine.engine import Engine
    from pipeline.io.images import load_image, to_pil

    started = time.perf_counter()
    engine = Engine.load(config.pti)
    loaded = time.perf_counter()
    rows = pq.read_table(manifest).to_pylist()
    for first in range(0, len(rows), config.tune_batch_size):
        batch = rows[first : first + config.tune_batch_size]
        pixels = torch.stack([load_image(r["image"], engine.resolution) for r in batch])
        inversion = engine.invert_and_tune(pixels, [None] * len(batch))
        for group in range(0, len(batch), config.edit_batch_size):  # as the editing actors take them
            fan = [
                (b, target, eta)
                for b in range(group, min(group + config.edit_batch_size, len(batch)))
                for target in batch[b]["target_prompts"]
                for eta in config.pti.etas
            ]
            for start in range(0, len(fan), config.max_edits_per_call):
                for image in engine.edit(
                    inversion, *map(list, zip(*fan[start : start + config.max_edits_per_call]))
                ):
                    to_pil(image).save(io.BytesIO(), format="PNG")
    seconds = time.perf_counter() - loaded
    steps = {"steps": engine.config.steps, "inner_steps": engine.config.inner_steps}
    return {"load_s": loaded - started, "seconds": seconds, "s_per_row": seconds / len(rows), **steps}


def measure_overhead(
    model: str,
    sizes: tuple[int, ...],
    pti: dict,
    tune_batch_size: int,
    edit_batch_size: int,
    gpus_per_actor: float = 0.0,
) -> dict:
    """``jobs.run`` (``run_all``, one tuning and one editing actor on ``gpus_per_actor`` GPUs each)
    on a manifest of each of ``sizes`` rows, and the engine alone on the largest. Two sizes give
    the job's cost per row at scale (their difference) and its fixed cost per job; one gives the
    end-to-end rate only. Returns the table's rows and its setting."""
    from pipeline.batch.cluster import init_ray
    from pipeline.batch.config import RunConfig
    from pipeline.batch.jobs import run_all

    work = Path(tempfile.mkdtemp(prefix="pti-bench-"))
    folder = model_folder(model)
    manifests = {n: write_manifest(work / "inputs", n) for n in sizes}
    largest = max(sizes)

    def config(rows: int, output: str) -> RunConfig:
        return RunConfig(
            manifest=manifests[rows],
            output=output,
            gpus_per_actor=gpus_per_actor,
            tune_actors=1,
            edit_actors=1,
            tune_batch_size=tune_batch_size,
            edit_batch_size=edit_batch_size,
            pti={"etas": [0.8], **pti, "model": folder, "progress": False},
        )

    alone = engine_alone(config(largest, ""), manifests[largest])
    print(json.dumps({"engine_alone": alone}), flush=True)
    started = time.perf_counter()
    init_ray(config(largest, ""))
    ray_start = time.perf_counter() - started
    job = {}
    for rows in sizes:
        started = time.perf_counter()
        summary = run_all(config(rows, str(work / f"out-{rows}")))
        job[rows] = time.perf_counter() - started
        assert summary["rows_done"] == rows and summary["edits"] == rows * len(TARGETS), summary
        print(json.dumps({"rows": rows, "seconds": job[rows]}), flush=True)
    table = [
        {
            "what": "engine alone",
            "s_per_row": alone["s_per_row"],
            "rows_per_s": 1 / alone["s_per_row"],
            "fixed": alone["load_s"],
            "overhead": None,
        }
    ]
    if len(sizes) == 2:
        small = min(sizes)
        per_row = (job[largest] - job[small]) / (largest - small)
        table.append(
            {
                "what": "jobs.run, per row at scale",
                "s_per_row": per_row,
                "rows_per_s": 1 / per_row,
                "fixed": job[small] - small * per_row,
                "overhead": f"{per_row / alone['s_per_row'] - 1:+.1%}",
            }
        )
    table.append(
        {
            "what": f"jobs.run end to end, {largest} rows",
            "s_per_row": job[largest] / largest,
            "rows_per_s": largest / job[largest],
            "fixed": None,
            "overhead": f"{job[largest] / (alone['seconds'] + alone['load_s']) - 1:+.1%}",
        }
    )
    where = f"on {gpus_per_actor:g} GPU each" if gpus_per_actor else "on CPUs"
    steps, inner_steps = alone["steps"], alone["inner_steps"]
    setting = (
        f"model `{model}`, T={steps}, K={inner_steps}, {len(TARGETS)} edits per row, "
        f"tune_batch_size {tune_batch_size}, edit_batch_size {edit_batch_size}, one tuning and one "
        f"editing actor {where}; {' and '.join(map(str, sizes))} rows; "
        f"Ray's own start {ray_start:.1f} s (not counted)"
    )
    return {"table": table, "setting": setting, "engine_alone": alone, "jobs": job, "ray_start_s": ray_start}


OVERHEAD_COLUMNS = {
    "what": "",
    "s_per_row": "s/row",
    "rows_per_s": "rows/s",
    "fixed": "fixed s (load, start-up)",
    "overhead": "against the engine alone",
}


def overhead(args) -> str:
    sizes = (args.rows, 2 * args.rows)
    pti = pti_settings(args.set)
    batches = (args.tune_batch_size, args.edit_batch_size, args.gpus_per_actor)
    measured = measure_overhead(args.model, sizes, pti, *batches)
    write_rows(args.jsonl, [{"setting": measured["setting"], **row} for row in measured["table"]])
    return f"{measured['setting']}.\n\n{markdown_table(measured['table'], OVERHEAD_COLUMNS)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny (built here) or a checkpoint folder")
    parser.add_argument("--rows", type=int, default=16)
    add_set_option(parser, default=("steps=20", "inner_steps=5"))
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--jsonl", help="also append the overhead table's rows to this file as JSON lines")
    parser.add_argument("--tune-batch-size", type=int, default=4)
    parser.add_argument("--edit-batch-size", type=int, default=2)
    parser.add_argument("--no-record", dest="record", action="store_false")
    args = parser.parse_args(argv)
    body = overhead(args)
    print(f"\n{body}")
    if args.record:
        append_record("benchmarks.pipeline", "Pipeline overhead", body)


if __name__ == "__main__":
    main()
