"""One GPU check (issue 15): what the engine and the pipeline cost on one GPU, and whether half
precision holds, in one command that ends in under 9 minutes on an H100 or H200 (docs/gpu.md).

    bash benchmarks/gpu_check.sh OUTDIR            # on the GPU machine
    bash benchmarks/gpu_check.sh OUTDIR --tiny     # the same parts on the CPU at tiny sizes (~2 minutes)

Each part is a command of the other benchmarks (``PROFILES``), run in its own process group under
its own time budget: a part that runs over is stopped with everything it started and says so, its
finished cases kept, and the parts after it still run. Each part's rows (one JSON line per case as it
ends) go to ``OUTDIR/rows/PART.jsonl``; ``gpu_check.md`` (the tables, by one renderer) and
``gpu_check.json`` (every row) are rewritten as each part ends; ``gpu_check.sh`` adds the log.

What each part measures, and where its figures are recorded: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common


def engine(argv: str, tiny: bool = False) -> list[str]:
    """``benchmarks.engine`` with early stop off (the full cost: ALGORITHM.md's counts), one edit per
    image; on the CPU at T=4, K=2."""
    sizes = (
        "--device cpu --dtype float32 --set pti.steps=4 pti.inner_steps=2" if tiny else "--device cuda --set"
    )
    return [
        "-m",
        "benchmarks.engine",
        "--no-record",
        "--edits",
        "1",
        *f"{argv} {sizes} pti.early_stop=false".split(),
    ]


def command(argv: str) -> list[str]:
    return ["-m", *argv.split()]


SD15 = "--model sd15 --dtype bfloat16 --batches 8 --timed-steps 3 --levers"
TRAIN = "jobs.train_tiny --recipe sharp-sd --quiet"
TINY_TRAIN = (
    "--resolution 64 --scenes 32 --vae-steps 4 --vae-batch 4 --unet-steps 4 --unet-batch 4 --threads 1"
)

# Each part: (its budget in seconds, its command). GPU: sized for an H100 from SD 1.5's UNet at
# about 0.1 s a forward at batch 8 in bf16 (0.2 s with the backward pass), so a step of stage 1
# (2 forwards, K = 10 with backward) takes about 2.3 s at batch 8; SDXL at 1024 px is about 160
# TFLOP a step of stage 1, SD3.5 Medium about 310 (and T5-XXL to build). A part gets the least of
# its own budget and what is left of the run's; the run's 480 s and installing the wheels stay
# under 9 minutes (a device call may take 10).
PROFILES = {
    "gpu": {
        "budget_s": 480,
        "parts": {
            "sweep": (110, engine("--model sd15 --dtype bfloat16 float16 --timed-steps 3")),
            "check": (40, engine("--model sd15 --dtype bfloat16 --batches 1")),
            "numerics": (50, command("benchmarks.numerics --no-record --device cuda")),
            "sdxl": (60, engine("--model sdxl --dtype bfloat16 --batches 1 --timed-steps 3")),
            "sd3": (60, engine("--model sd35-medium --dtype bfloat16 --batches 1 --timed-steps 3")),
            "pipeline": (100, command("benchmarks.pipeline --no-record --gpus-per-actor 0.5")),
            "levers": (75, engine(f"{SD15} channels_last pti.control=auto")),
            "cuda_graphs": (40, engine(f"{SD15} cuda_graphs")),
            "train": (150, command(f"{TRAIN} --device cuda --dtype bfloat16")),
            "compile": (150, engine(f"{SD15} compile")),
        },
    },
    "tiny": {  # about two minutes on 2 idle cores; the budgets allow for cores shared with other work
        "budget_s": 900,
        # One torch thread: on cores shared with other work two threads stall on each other.
        "env": {"OMP_NUM_THREADS": "1"},
        "parts": {
            "sweep": (240, engine("--model tiny --batches 1 2 --timed-steps 2", tiny=True)),
            "check": (120, engine("--model tiny --batches 1", tiny=True)),
            "numerics": (
                180,
                command("benchmarks.numerics --no-record --scenes 2 --set pti.steps=6 pti.inner_steps=2"),
            ),
            "sdxl": (120, engine("--model tiny-sdxl --batches 1", tiny=True)),
            "sd3": (120, engine("--model tiny-sd3 --batches 1", tiny=True)),
            "pipeline": (
                300,
                command("benchmarks.pipeline --no-record --rows 2 --set steps=2 inner_steps=1"),
            ),
            "levers": (
                240,
                engine("--model tiny --batches 2 --levers channels_last pti.control=auto", tiny=True),
            ),
            "cuda_graphs": (60, engine("--model tiny --batches 2 --levers cuda_graphs", tiny=True)),
            "train": (120, command(f"{TRAIN} --device cpu --dtype float32 {TINY_TRAIN}")),
            "compile": (60, engine("--model tiny --batches 2 --levers compile", tiny=True)),
        },
    },
}
CUDA_PARTS = {"cuda_graphs", "compile"}
MIN_PART_S = 10  # a part given less than this is not started


def command_of(part: str, argv: list[str], out: Path, budget: float) -> list[str]:
    """A part's command with where its rows go: ``--jsonl`` for the benchmarks; the trained model's
    folder, its checkpoints (outside OUTDIR: tens of MB a device call need not bring back) and its
    stop 20 s before the budget for ``train``."""
    if part != "train":
        return [*argv, "--jsonl", str(out / "rows" / f"{part}.jsonl")]
    checkpoints = tempfile.mkdtemp(prefix="pti-train-")
    return [
        *argv,
        "--out",
        str(out / "sharp-sd"),
        "--checkpoints",
        checkpoints,
        "--max-seconds",
        f"{max(budget - 20, 1):.0f}",
    ]


def run_part(part: str, command: list[str], budget: float, env: dict | None = None) -> dict:
    """Run one part in its own process group (``common.run_child``), stopped with every process it
    started at ``budget`` seconds; skipped if less than ``MIN_PART_S`` is left."""
    if budget < MIN_PART_S:
        return {
            "status": "skipped",
            "reason": f"{max(budget, 0):.0f} s left of the run's budget",
            "budget_s": budget,
        }
    done = common.run_child(command, budget, {**os.environ, **(env or {})})
    if part == "train" and done.get("reason") == "exit status 3":  # jobs.train_tiny's "stopped in time"
        done = {**done, "status": "stopped", "reason": "at its --max-seconds; the state is kept"}
    return {k: done[k] for k in ("status", "reason", "seconds") if k in done} | {"budget_s": budget}


def run(profile: str, out: Path, budget: float | None, parts: list[str]) -> dict:
    settings = PROFILES[profile]
    budget = budget or settings["budget_s"]
    (out / "rows").mkdir(parents=True, exist_ok=True)
    for stale in (out / "rows").glob("*.jsonl"):
        stale.unlink()
    report = {
        "profile": profile,
        "command": " ".join(["python -m benchmarks.gpu_check", *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": budget,
        "parts": {},
    }
    started = time.time()
    write_report(out, report)  # a run cut off in its first part still leaves its settings
    for part, (own, argv) in settings["parts"].items():
        if part not in parts:
            status = {"status": "skipped", "reason": "not asked for (--parts)"}
        elif part in CUDA_PARTS and profile != "gpu":
            status = {"status": "skipped", "reason": "CUDA only"}
        elif part == "pipeline" and importlib.util.find_spec("ray") is None:
            status = {"status": "skipped", "reason": "Ray is not installed: carry it as wheels (docs/gpu.md)"}
        else:
            print(f"gpu_check: {part} ...", flush=True)
            give = min(own, started + budget - time.time())
            status = run_part(part, command_of(part, argv, out, give), give, settings.get("env"))
        report["parts"][part] = {**status, "command": " ".join(argv)}
        print(f"gpu_check: {part}: {status}", flush=True)
        report["seconds"] = time.time() - started
        write_report(out, report)
    return report


# --- the tables: one renderer over every part's rows -------------------------------------------


def engine_columns(*extra: str) -> dict:
    """``benchmarks.engine``'s columns that a GPU reading needs, with ``extra`` after the case's."""
    from benchmarks.engine import COLUMNS

    names = {"timed_steps": "timed steps", "against_baseline": "stage 1 against baseline", **COLUMNS}
    keep = ("dtype", "batch", "lever", *extra, "stage1_s_per_image", "stage1_evals_per_image")
    keep += ("stage1_tflops", "stage1_of_peak", "stage2_s_per_edit", "stage2_evals_per_edit")
    keep += ("stage2_tflops", "warmup_s", "stage1_peak_mb", "stage2_peak_mb")
    return {k: names[k] for k in keep}


def train_rows(out: Path) -> list[dict]:
    """The trained model's record (``training.json``): its steps per second and final losses."""
    record = out / "sharp-sd" / "training.json"
    if not record.exists():
        return []
    trained = json.loads(record.read_text())
    row = {"recipe": "sharp-sd", "dtype": trained["config"]["dtype"], "seconds": trained["seconds"]}
    for phase, loss in (("vae", "vae_mse_last_100"), ("unet", "unet_loss_last_100")):
        steps = trained["config"][f"{phase}_steps"]
        row |= {
            f"{phase}_steps": steps,
            f"{phase}_steps_per_s": steps / trained[f"{phase}_seconds"],
            f"{phase}_loss": trained[loss],
        }
    return [row]


TRAIN_COLUMNS = {
    "recipe": "recipe",
    "dtype": "dtype",
    "vae_steps": "VAE steps",
    "vae_steps_per_s": "VAE steps/s",
    "vae_loss": "VAE MSE (last 100)",
    "unet_steps": "UNet steps",
    "unet_steps_per_s": "UNet steps/s",
    "unet_loss": "UNet loss (last 100)",
    "seconds": "s",
}


def sections() -> list[tuple[str, tuple[str, ...], dict, str]]:
    """Each table: its heading, the parts whose rows it shows, its columns, what it measured."""
    from benchmarks.numerics import COLUMNS as NUMERICS
    from benchmarks.pipeline import OVERHEAD_COLUMNS

    timing = "The first steps timed and scaled to T (encoding and decoding not scaled)"
    return [
        ("Stage 1 and stage 2 by dtype and batch", ("sweep", "check"), engine_columns("timed_steps"), timing),
        (
            "Levers",
            ("levers", "cuda_graphs", "compile"),
            engine_columns("against_baseline"),
            "Each in its own process",
        ),
        ("Numerics", ("numerics",), NUMERICS, "The shipped model; the CPU runs float32 only"),
        (
            "SDXL",
            ("sdxl",),
            engine_columns(),
            "Priced in docs/scaling.md: 8.36 PFLOP an image, 0.687 an edit",
        ),
        ("SD3.5", ("sd3",), engine_columns(), "Priced in docs/scaling.md: 16.1 PFLOP an image, 1.14 an edit"),
        ("Pipeline on one device", ("pipeline",), OVERHEAD_COLUMNS, "`jobs.run` against the engine alone"),
        (
            "Training the sharp world model",
            ("train",),
            TRAIN_COLUMNS,
            "A finished model is in OUTDIR/sharp-sd",
        ),
    ]


def notes(report: dict, rows: dict, parts: tuple[str, ...]) -> list[str]:
    """Each part's command, how it ended if not done, and the rows that failed or were skipped."""
    lines = []
    for part in parts:
        status = report["parts"].get(part, {"status": "not run yet"})
        ended = "" if status["status"] == "done" else f": **{status['status']}** ({status.get('reason', '')})"
        lines.append(
            f"- `{part}`{ended}" + (f", `python {status['command']}`" if "command" in status else "")
        )
        lines += [
            f"  - {r.get('lever', r.get('dtype'))}: {r.get('error') or r['skipped']}"
            for r in rows.get(part, [])
            if "error" in r or "skipped" in r
        ]
    return lines


def scaling_check(rows: dict) -> str:
    """All the steps at batch 1 against the same case scaled from its first steps."""
    full = next((r for r in rows.get("check", []) if "error" not in r), None)
    scaled = next(
        (
            r
            for r in rows.get("sweep", [])
            if full and (r["batch"], r["dtype"]) == (full["batch"], full["dtype"])
        ),
        None,
    )
    if not (full and scaled):
        return "Scaling check: not run."
    one, two = (full[k] / scaled[k] for k in ("stage1_s_per_image", "stage2_s_per_edit"))
    return (
        f"Scaling check: all {full['steps']} steps at batch {full['batch']} ({full['dtype']}) took "
        f"x{one:.2f} (stage 1) and x{two:.2f} (stage 2) the scaled figures."
    )


def write_report(out: Path, report: dict) -> None:
    """``gpu_check.md`` and ``gpu_check.json`` from every row so far, each written whole."""
    rows = {p.stem: common.read_rows(p) for p in sorted((out / "rows").glob("*.jsonl"))}
    rows["train"] = train_rows(out)
    base = next((r for r in rows.get("levers", []) if r.get("lever") == "baseline"), None)
    for r in (r for part in ("levers", "cuda_graphs", "compile") for r in rows.get(part, [])):
        if base and "stage1_s_per_image" in r:
            r["against_baseline"] = f"x{r['stage1_s_per_image'] / base['stage1_s_per_image']:.2f}"
    device = next((r for part in rows.values() for r in part if "machine" in r), {})
    lines = [
        "# GPU check",
        "",
        f"`{report['command']}`, {report['started']}, profile `{report['profile']}`, "
        f"{report.get('seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        f"Machine: {device.get('machine', 'not recorded')}; measured matmul peak (the roof for 'of peak'): "
        + (f"{device['peak_tflops']:.4g} TFLOP/s." if device else "not measured."),
    ]
    for title, parts, columns, what in sections():
        shown = [r for p in parts for r in rows.get(p, []) if "error" not in r and "skipped" not in r]
        table = common.markdown_table(shown, columns) if shown else "Nothing finished."
        lines += ["", f"## {title}", "", f"{what}.", "", table, "", *notes(report, rows, parts)]
        if "check" in parts:
            lines += ["", scaling_check(rows)]
    data = {**report, "rows": rows}
    for name, content in (
        ("gpu_check.md", "\n".join(lines) + "\n"),
        ("gpu_check.json", json.dumps(data, indent=1, default=str)),
    ):
        partial = out / f".{name}.tmp"
        partial.write_text(content)
        partial.replace(out / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="the folder for the tables (gpu_check.sh passes it)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model at tiny sizes on the CPU")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: the profile's)")
    every = list(PROFILES["gpu"]["parts"])
    parser.add_argument("--parts", nargs="+", choices=every, default=every, help="only these parts")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so run_child stops the part it runs
    out = Path(args.out)
    report = run("tiny" if args.tiny else "gpu", out, args.budget, args.parts)
    print((out / "gpu_check.md").read_text())
    failed = [name for name, status in report["parts"].items() if status["status"] in ("failed", "stopped")]
    if failed:  # the tables still hold what every part finished
        sys.exit(f"gpu_check: parts that failed or ran over their budget: {', '.join(failed)}")


if __name__ == "__main__":
    main()
