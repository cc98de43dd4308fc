"""One GPU check (issue 15): what the engine and the pipeline cost on one GPU, and whether half
precision holds, in one command that ends in under 9 minutes on an H100 or H200 (docs/gpu.md).

    bash benchmarks/gpu_check.sh OUTDIR            # on the GPU machine
    bash benchmarks/gpu_check.sh OUTDIR --tiny     # the same parts on the CPU at tiny sizes (~1 minute)

Parts, in this order, each in its own process under its own time budget: a part that runs over is
stopped and says so, and the parts after it still run. OUTDIR's tables are rewritten as each ends.

- ``sweep``: stage 1 and stage 2 of SD 1.5's architecture (random weights) at 512x512, T=50, K=10,
  early stop off, in bfloat16 and float16 at batch 1, 2, 4, 8: seconds per image and per edit, UNet
  evaluations, TFLOP/s against the bf16 matmul peak measured first, peak memory. The first
  ``timed_steps`` of the 50 steps are timed and scaled to 50 (``benchmarks.engine.first_steps``); the
  last case runs all 50 at batch 1 to check that scaling.
- ``sdxl``: stage 1 and stage 2 of SDXL's architecture (random weights) at 1024x1024 in bfloat16 at
  batch 1, timed as the sweep's cases: what an SDXL night costs, measured (docs/scaling.md).
- ``sd3``: the same for SD3.5 Medium's architecture (the flow family, docs/flow-matching.md) in
  bfloat16 (float16 overflows in these transformers).
- ``numerics``: the shipped model (``models/shapes-sd``) in float32, bfloat16 and float16 side by side:
  reconstruction PSNR, one colour edit per scene against float32's, non-finite values.
- ``pipeline``: ``jobs.run`` on local manifests of 16 and 32 rows (tiny model, both actors on the one
  GPU) against the engine alone (``benchmarks.pipeline``). Without Ray it is skipped, saying so.
- ``levers``: the baseline and channels-last at batch 8 in bfloat16; ``cuda_graphs`` and ``compile``
  (its compile time: its warm-up's time over the baseline's), each in its own process (CUDA only).
- ``train``: the sharp world model (``jobs.train_tiny --recipe sharp-sd``) trained in bfloat16 on
  the GPU for what is left of its budget: steps per second of each phase, and the model itself in
  ``OUTDIR/sharp-sd`` when it finishes (issue 17: one GPU visit can also train it).

Writes ``gpu_check.md`` (the tables), ``gpu_check.json`` (every number) and ``rows.jsonl`` (each case
as it finishes) to OUTDIR; ``gpu_check.sh`` adds ``gpu_check.log``. Neither this module nor the
engine parts import Ray: only the pipeline part does, inside its own process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from benchmarks import common

# Sizes and budgets (seconds). GPU: sized for an H100 from SD 1.5's UNet at about 0.1 s a forward
# at batch 8 in bf16 (about 0.2 s with the backward pass), so a step of stage 1 (2 forwards, K = 10
# with backward) takes about 2.3 s at batch 8: 4 steps per case (a warm-up and 3 timed) over the 15
# images of batches 1 to 8 in two dtypes, and the 50-step check at batch 1, come to about 100 s.
# Expected: sweep 100, numerics 30, sdxl 30 (a stage-1 step of SDXL at 1024 px is about 160 TFLOP:
# under a second), sd3 40 (SD3.5 Medium: about 310 TFLOP a step, and T5-XXL to build), pipeline 70,
# levers 35, cuda_graphs 25, train what its budget allows, then compile whatever is left. A part
# gets the least of its own budget and what is left of the run's; the run's 480 s and installing
# the wheels stay under 9 minutes (a device call may take 10).
PROFILES = {
    "gpu": {
        "device": "cuda",
        "budget_s": 480,
        "sweep": dict(
            model="sd15",
            dtypes=["bfloat16", "float16"],
            batches=[1, 2, 4, 8],
            steps=50,
            inner_steps=10,
            timed_steps=3,
            edits=1,
            check_batch=1,
            peak_dtype="bfloat16",
            peak_sizes=None,
        ),
        "numerics": dict(
            model="models/shapes-sd",
            dtypes=["float32", "bfloat16", "float16"],
            scenes=4,
            steps=50,
            inner_steps=10,
            lr=0.01,
            eta=0.8,
        ),
        "pipeline": dict(
            model="tiny",
            sizes=[16, 32],
            steps=20,
            inner_steps=5,
            tune_batch_size=4,
            edit_batch_size=2,
            gpus_per_actor=0.5,  # both actor pools on the one GPU
        ),
        "levers": dict(batch=8, dtype="bfloat16"),
        "sdxl": dict(model="sdxl", dtypes=["bfloat16"], batch=1),
        "sd3": dict(model="sd35-medium", dtypes=["bfloat16"], batch=1),  # bfloat16: fp16 overflows
        "train": dict(recipe="sharp-sd", dtype="bfloat16", changes={}),
        "budgets": dict(
            sweep=140,
            numerics=50,
            sdxl=60,
            sd3=60,
            pipeline=100,
            levers=60,
            cuda_graphs=40,
            train=150,
            compile=150,
        ),
    },
    "tiny": {
        "device": "cpu",
        "budget_s": 900,
        # One torch thread: on cores shared with other work two threads stall on each other (the
        # tiny run took 1 minute with one, 3 to 4 with two, on 2 cores shared with other tests).
        "threads": 1,
        "sweep": dict(
            model="tiny",
            dtypes=["float32"],  # the CPU runs float32 only
            batches=[1, 2],
            steps=4,
            inner_steps=2,
            timed_steps=2,
            edits=1,
            check_batch=1,
            peak_dtype="float32",
            peak_sizes=[256, 512],
        ),
        "numerics": dict(
            model="models/shapes-sd",
            dtypes=["float32", "bfloat16", "float16"],
            scenes=2,
            steps=6,
            inner_steps=2,
            lr=0.01,
            eta=0.8,
        ),
        "pipeline": dict(
            model="tiny",
            sizes=[4],
            steps=2,
            inner_steps=1,
            tune_batch_size=4,
            edit_batch_size=2,
            gpus_per_actor=0.0,
        ),
        "levers": dict(batch=2, dtype="float32"),
        "train": dict(
            recipe="sharp-sd",
            dtype="float32",
            changes=dict(
                resolution=64,
                scenes=32,
                vae_steps=4,
                vae_batch=4,
                unet_steps=4,
                unet_batch=4,
                checkpoint_every=2,
            ),
        ),
        "sdxl": dict(model="tiny-sdxl", dtypes=["float32"], batch=1),
        "sd3": dict(model="tiny-sd3", dtypes=["float32"], batch=1),
        # About a minute in all on 2 idle cores; the budgets allow for cores shared with other work.
        "budgets": dict(
            sweep=240,
            numerics=180,
            sdxl=120,
            sd3=120,
            pipeline=300,
            levers=240,
            cuda_graphs=60,
            train=120,
            compile=60,
        ),
    },
}
PART_LEVERS = {
    "levers": ["baseline", "channels_last"],
    "cuda_graphs": ["cuda_graphs"],
    "compile": ["compile"],
}
ORDER = ("sweep", "numerics", "sdxl", "sd3", "pipeline", "levers", "cuda_graphs", "train", "compile")
CUDA_PARTS = {"cuda_graphs", "compile"}
MIN_PART_S = 10  # a part given less than this is not started


# --- rows: each part's results, one JSON line per case as it finishes -------------------------


class Rows:
    """Appends a part's rows to ``rows.jsonl`` as they finish, so a part stopped at its budget keeps
    what it finished."""

    def __init__(self, path: Path, part: str):
        self.path, self.part = path, part

    def __call__(self, row: dict) -> None:
        row = {"part": self.part, **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)


def read_rows(path: Path) -> list[dict]:
    """Every whole row written so far (a part killed mid-write leaves a partial last line)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def left(deadline: float) -> float:
    return deadline - time.time()


# --- the parts (each runs in its own process) --------------------------------------------------


def engine_case(settings: dict, dtype: str, batch: int, lever: str = "baseline", **extra) -> dict:
    """A ``benchmarks.engine.run_case`` case of the sweep's model and sizes, early stop off (the full
    cost: ALGORITHM.md's counts)."""
    sweep = settings["sweep"]
    case = dict(
        model=sweep["model"],
        lever=lever,
        steps=sweep["steps"],
        inner_steps=sweep["inner_steps"],
        timed_steps=sweep["timed_steps"],
        lr=0.01,
        edits=sweep["edits"],
        batch=batch,
        device=settings["device"],
        dtype=dtype,
        no_early_stop=True,
        flops=False,
    )
    return {**case, **extra}


def device_row(settings: dict) -> dict:
    """The machine, the versions, and the matmul peak that utilisation is measured against."""
    import torch

    from benchmarks.common import machine
    from benchmarks.engine import matmul_peak_tflops

    sweep = settings["sweep"]
    peak = matmul_peak_tflops(settings["device"], sweep["peak_dtype"], sweep["peak_sizes"])
    gpu = torch.cuda.get_device_name() if settings["device"] == "cuda" else None
    return {
        "kind": "device",
        "machine": machine(),
        "gpu": gpu,
        "peak_tflops": peak,
        "peak_dtype": sweep["peak_dtype"],
    }


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_timed_case(emit, case: dict, sd=None, kind: str = "case") -> dict | None:
    """One engine case; a failure (out of memory, a lever that does not fit) is a row, not the end."""
    from benchmarks.engine import run_case

    started = time.perf_counter()
    try:
        row = {"kind": kind, **run_case(case, sd), "wall_s": time.perf_counter() - started}
    except Exception as exc:  # noqa: BLE001 - recorded, and the part goes on
        emit({"kind": "error", "case": case_name(case), "error": f"{type(exc).__name__}: {exc}"[:2000]})
        traceback.print_exc()
        return None
    finally:
        free_device_memory()
    emit(row)
    return row


def case_name(case: dict) -> str:
    return f"{case['lever']}, batch {case['batch']}, {case['dtype']}"


def sweep_part(settings: dict, emit, deadline: float) -> None:
    """Stage 1 and 2 by dtype and batch, on one model per dtype; then all the steps at one batch."""
    from benchmarks.engine import load_model

    emit(device_row(settings))
    sweep = settings["sweep"]
    per_image = None  # wall seconds per image of the last case: predicts the next one
    first = {}
    for dtype in sweep["dtypes"]:
        sd = load_model(sweep["model"], settings["device"], dtype)
        for batch in sweep["batches"]:
            case = engine_case(settings, dtype, batch, flops=not first)
            if per_image and per_image * batch > left(deadline):
                emit(
                    {
                        "kind": "skipped",
                        "case": case_name(case),
                        "reason": over_budget(per_image * batch, deadline),
                    }
                )
                continue
            row = run_timed_case(emit, case, sd)
            if row is None:
                break  # out of memory or broken: larger batches of this dtype would be too
            per_image = row["wall_s"] / batch
            first.setdefault(dtype, row)
        del sd
        free_device_memory()
    check_all_steps(settings, emit, deadline, first)
    # The engine runs where Ray and s3fs are not installed: it must not have loaded them.
    emit(
        {
            "kind": "imports",
            "ray_or_s3fs": sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "s3fs")),
        }
    )


def model_part(part: str):
    """A part that times another family's model (``sdxl``: SDXL base; ``sd3``: SD3.5 Medium):
    its stage 1 and stage 2 at the sweep's sizes, one case per dtype."""

    def run(settings: dict, emit, deadline: float) -> None:
        from benchmarks.engine import load_model

        model = settings[part]
        for dtype in model["dtypes"]:
            sd = load_model(model["model"], settings["device"], dtype)
            run_timed_case(emit, engine_case(settings, dtype, model["batch"], model=model["model"]), sd)
            del sd
            free_device_memory()

    return run


def check_all_steps(settings: dict, emit, deadline: float, first: dict) -> None:
    """All ``steps`` steps at the check's batch, to set against the scaled first steps."""
    from benchmarks.engine import load_model

    sweep = settings["sweep"]
    dtype, batch = sweep["dtypes"][0], sweep["check_batch"]
    case = engine_case(settings, dtype, batch, timed_steps=None)
    if dtype not in first:
        emit({"kind": "skipped", "case": "all steps", "reason": f"no scaled {dtype} case to check"})
        return
    predicted = 1.5 * first[dtype]["stage1_s_per_image"] * batch  # with the warm-up and stage 2
    if predicted > left(deadline):
        emit({"kind": "skipped", "case": "all steps", "reason": over_budget(predicted, deadline)})
        return
    run_timed_case(emit, case, load_model(sweep["model"], settings["device"], dtype), kind="check")


def over_budget(predicted: float, deadline: float) -> str:
    return f"predicted {predicted:.0f} s, {max(left(deadline), 0):.0f} s left in the part's budget"


def levers_part(settings: dict, emit, deadline: float, levers: list[str]) -> None:
    """Each lever on a freshly loaded model (a lever may change the model it is given)."""
    from benchmarks.engine import LEVERS

    batch, dtype = settings["levers"]["batch"], settings["levers"]["dtype"]
    for lever in levers:
        run_timed_case(emit, engine_case(settings, dtype, batch, lever=lever, what=LEVERS[lever][0]))


def numerics_part(settings: dict, emit, deadline: float) -> None:
    """The shipped model's reconstructions and one colour edit per held-out scene, per dtype."""
    numerics = settings["numerics"]
    reference = None  # float32's reconstructions and edits
    for dtype in numerics["dtypes"]:
        if settings["device"] == "cpu" and dtype != "float32":
            emit(
                {
                    "kind": "skipped",
                    "dtype": dtype,
                    "reason": "half precision needs CUDA; the CPU runs float32",
                }
            )
            continue
        if reference is not None and reference["seconds"] > left(deadline):
            emit({"kind": "skipped", "dtype": dtype, "reason": over_budget(reference["seconds"], deadline)})
            continue
        row, images = shipped_model_in(settings, dtype, reference)
        emit(row)
        if dtype == "float32":
            reference = {**images, "seconds": row["seconds"]}


def shipped_model_in(settings: dict, dtype: str, reference: dict | None) -> tuple[dict, dict]:
    """Stage 1 and one edit of each held-out scene in ``dtype``: quality, agreement with float32,
    and every non-finite value in what stage 1 and 2 return."""
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.engine.config import PTIConfig
    from pipeline.engine.engine import Engine
    from pipeline.engine.metrics import psnr
    from pipeline.engine.models import load_stable_diffusion
    from pipeline.io.images import to_tensor, to_uint8
    from pipeline.world import scenes as world

    numerics = settings["numerics"]
    started = time.perf_counter()
    sd = load_stable_diffusion(numerics["model"], settings["device"], dtype)
    config = PTIConfig(
        model=numerics["model"],
        steps=numerics["steps"],
        inner_steps=numerics["inner_steps"],
        lr=numerics["lr"],
        progress=False,
    )
    engine = Engine(sd, config)
    scenes = world.held_out_scenes(numerics["scenes"], engine.resolution)
    truths = [world.edit_targets(s, n)["colour"] for n, s in enumerate(scenes)]
    pixels = torch.stack([to_tensor(Image.fromarray(s.render())) for s in scenes])
    inversion = engine.invert_and_tune(pixels, [s.caption() for s in scenes])
    edits = engine.edit(
        inversion, list(range(len(scenes))), [t.caption() for t in truths], [numerics["eta"]] * len(scenes)
    )
    returned = [inversion.z_T, inversion.cond, inversion.reconstruction, inversion.final_loss, edits]
    scores = [
        world.score_edit(to_uint8(e.nan_to_num()), s, t, "colour") for e, s, t in zip(edits, scenes, truths)
    ]
    row = {
        "kind": "dtype",
        "dtype": dtype,
        "scenes": len(scenes),
        "reconstruction_psnr": float(inversion.psnr.mean()),
        "reconstruction_psnr_min": float(inversion.psnr.min()),
        "reconstruction_ssim": float(inversion.ssim.mean()),
        "final_loss": float(inversion.final_loss.mean()),
        "edits_right": float(np.mean([s["success"] for s in scores])),
        "nonfinite": sum(int((~torch.isfinite(v.float())).sum()) for v in returned),
        "values_checked": sum(v.numel() for v in returned),
        "seconds": time.perf_counter() - started,
    }
    if reference is not None:
        row["reconstruction_vs_float32_psnr"] = float(
            psnr(inversion.reconstruction, reference["reconstruction"]).mean()
        )
        row["edit_vs_float32_psnr"] = float(psnr(edits, reference["edits"]).mean())
    return row, {"reconstruction": inversion.reconstruction, "edits": edits}


def pipeline_part(settings: dict, emit, deadline: float) -> None:
    """``jobs.run`` against the engine alone, or a line saying why not (no Ray on this machine)."""
    try:
        import ray
    except ImportError as exc:
        emit({"kind": "skipped", "reason": f"import ray failed ({exc}): carry Ray as wheels (docs/gpu.md)"})
        return
    from benchmarks.pipeline import measure_overhead

    pipeline = settings["pipeline"]
    try:
        measured = measure_overhead(
            pipeline["model"],
            tuple(pipeline["sizes"]),
            pipeline["steps"],
            pipeline["inner_steps"],
            pipeline["tune_batch_size"],
            pipeline["edit_batch_size"],
            pipeline["gpus_per_actor"],
        )
    finally:
        ray.shutdown()
    emit({"kind": "pipeline", **measured})


def train_part(settings: dict, emit, deadline: float) -> None:
    """The sharp world model's training until 20 s before the deadline (then it stops at its next
    checkpoint): how far it got and how fast; the model goes to ``OUTDIR/<recipe>`` if it finished.
    Its checkpoints stay out of OUTDIR (tens of MB that a device call need not bring back)."""
    import tempfile

    from pipeline.world.training import RECIPES, Checkpoints, Stopped, train_world_model

    train = settings["train"]
    config = RECIPES[train["recipe"]].replace(
        device=settings["device"], dtype=train["dtype"], **train["changes"]
    )
    if settings.get("threads"):
        config = config.replace(threads=settings["threads"])
    checkpoints = Path(tempfile.mkdtemp(prefix="pti-train-"))
    model = emit.path.parent / train["recipe"]
    try:
        train_world_model(model, config, False, checkpoints, max_seconds=max(left(deadline) - 20, 0))
        done = True
    except Stopped:
        done = False
    state = Checkpoints(checkpoints, config).load()
    row = {"kind": "train", "recipe": train["recipe"], "dtype": config.dtype, "done": done}
    for phase in ("vae", "unet"):
        saved = state.get(phase, {})
        steps, seconds = len(saved.get("losses", [])), saved.get("seconds", 0.0)
        row |= {
            f"{phase}_steps": f"{steps}/{getattr(config, f'{phase}_steps')}",
            f"{phase}_steps_per_s": steps / seconds if seconds else None,
            f"{phase}_loss": float(sum(saved["losses"][-50:]) / len(saved["losses"][-50:]))
            if steps
            else None,
        }
    emit({**row, "seconds": state["seconds"], "model": str(model) if done else None})


def run_child(part: str, settings: dict, rows_path: Path, deadline: float) -> None:
    emit = Rows(rows_path, part)
    try:
        if part in PART_LEVERS:
            levers_part(settings, emit, deadline, PART_LEVERS[part])
        else:
            parts = {
                "sdxl": model_part("sdxl"),
                "sd3": model_part("sd3"),
                "sweep": sweep_part,
                "numerics": numerics_part,
                "pipeline": pipeline_part,
                "train": train_part,
            }
            parts[part](settings, emit, deadline)
    except BaseException as exc:
        emit({"kind": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise


# --- the run: each part in a child process under its budget ----------------------------------


def run_part(
    part: str, settings: dict, rows_path: Path, budget: float, command: list[str] | None = None
) -> dict:
    """Run one part in its own process (``common.run_child``), stopped with every process it started
    at ``budget`` seconds. ``command`` (Python's arguments) replaces the part's own (tests)."""
    if budget < MIN_PART_S:
        return {
            "status": "skipped",
            "reason": f"{max(budget, 0):.0f} s left of the run's budget",
            "budget_s": budget,
        }
    deadline = time.time() + budget
    command = command or [
        "-m",
        "benchmarks.gpu_check",
        "--part",
        part,
        "--settings",
        json.dumps(settings),
        "--rows",
        str(rows_path),
        "--deadline",
        str(deadline),
    ]
    env = dict(os.environ)
    if settings.get("threads"):  # Ray's workers inherit it too
        env["OMP_NUM_THREADS"] = str(settings["threads"])
    done = common.run_child(command, budget, env)
    return {k: done[k] for k in ("status", "reason", "seconds") if k in done} | {"budget_s": budget}


def run(profile: str, out: Path, budget: float | None, parts: list[str]) -> dict:
    settings = PROFILES[profile]
    budget = budget or settings["budget_s"]
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    report = {
        "profile": profile,
        "command": " ".join(["python -m benchmarks.gpu_check", *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": budget,
        "settings": settings,
        "parts": {},
    }
    started = time.time()
    write_report(out, report, [])  # a run cut off in its first part still leaves its settings
    for part in ORDER:
        if part not in parts:
            report["parts"][part] = {"status": "skipped", "reason": "not asked for (--parts)"}
        elif part in CUDA_PARTS and settings["device"] != "cuda":
            report["parts"][part] = {"status": "skipped", "reason": "CUDA only"}
        else:
            print(f"gpu_check: {part} ...", flush=True)
            own = settings["budgets"][part]
            report["parts"][part] = run_part(
                part, settings, rows_path, min(own, started + budget - time.time())
            )
            print(f"gpu_check: {part}: {report['parts'][part]}", flush=True)
        report["seconds"] = time.time() - started
        write_report(out, report, read_rows(rows_path))
    return report


# --- the tables --------------------------------------------------------------------------------


def by_kind(rows: list[dict], part: str, kind: str) -> list[dict]:
    return [r for r in rows if r["part"] == part and r.get("kind") == kind]


def notes(report: dict, rows: list[dict], part: str) -> list[str]:
    """What a part skipped or what failed, one line each, and how the part ended if not done; each
    block after a blank line (a list of its own, not the table's)."""
    lines = []
    for r in rows:
        if r["part"] == part and r.get("kind") in ("skipped", "error"):
            what = r.get("case") or r.get("dtype") or part
            lines.append(f"- {r['kind']}: {what}: {r.get('reason') or r.get('error')}")
    status = report["parts"].get(part, {"status": "not run yet"})
    ended = []
    if status["status"] != "done":
        reason = f" ({status['reason']})" if status.get("reason") else ""
        ended = [f"Part `{part}`: {status['status']}{reason}."]
    return ([""] + lines if lines else []) + ([""] + ended if ended else [])


def ratio(value: float | None, base: float | None) -> str | None:
    return f"x{value / base:.2f}" if value and base else None


def sweep_rows(rows: list[dict], peak: float | None) -> list[dict]:
    """Per case: times at all T steps, and TFLOP/s from the first case's FLOPs per image."""
    cases = by_kind(rows, "sweep", "case")
    counted = next((c for c in cases if "tune_tflop_per_image" in c), None)
    table = []
    for c in cases:
        row = dict(c)
        row["images_per_s"] = 1 / c["stage1_s_per_image"]
        if counted:
            stage_one = counted["vae_tflop_per_image"] + counted["invert_tflop_per_image"]
            row["stage1_tflops"] = (stage_one + counted["tune_tflop_per_image"]) / c["stage1_s_per_image"]
            row["stage2_tflops"] = counted["edit_tflop_per_edit"] / c["stage2_s_per_edit"]
            if peak:
                row["stage1_of_peak"] = f"{row['stage1_tflops'] / peak:.1%}"
                row["stage2_of_peak"] = f"{row['stage2_tflops'] / peak:.1%}"
        table.append(row)
    return table


SWEEP_COLUMNS = {
    "dtype": "dtype",
    "batch": "batch",
    "stage1_s_per_image": "stage 1 s/image",
    "images_per_s": "stage 1 images/s",
    "stage1_evals_per_image": "UNet evals/image",
    "stage1_tflops": "stage 1 TFLOP/s",
    "stage1_of_peak": "of peak",
    "stage2_s_per_edit": "stage 2 s/edit",
    "stage2_evals_per_edit": "UNet evals/edit",
    "stage2_tflops": "stage 2 TFLOP/s",
    "stage2_of_peak": "of peak",
    "warmup_s": "warm-up s",
    "stage1_peak_mb": "stage 1 peak MiB",
    "stage2_peak_mb": "stage 2 peak MiB",
}


def sweep_section(report: dict, rows: list[dict], device: dict) -> tuple[str, dict]:
    from benchmarks.common import markdown_table

    sweep = report["settings"]["sweep"]
    table = sweep_rows(rows, device.get("peak_tflops"))
    cuda = report["settings"]["device"] == "cuda"
    memory = "torch.cuda.max_memory_allocated" if cuda else "the process's peak resident set"
    lines = [
        "## Stage 1 and stage 2 by dtype and batch",
        "",
        f"Model `{sweep['model']}` (random weights), T={sweep['steps']}, K={sweep['inner_steps']}, "
        f"early stop off, {sweep['edits']} edit per image; the first {sweep['timed_steps']} steps timed "
        f"and scaled to {sweep['steps']} (encoding and decoding not scaled); peak memory: {memory}.",
        "",
        markdown_table(table, SWEEP_COLUMNS) if table else "No case finished.",
    ]
    counted = next((c for c in table if "tune_tflop_per_image" in c), None)
    if counted:
        stage_one = sum(counted[f"{p}_tflop_per_image"] for p in ("vae", "invert", "tune"))
        forward = counted["invert_tflop_per_image"] / sweep["steps"]  # inversion: one forward per step
        lines += [
            "",
            f"Counted FLOPs: stage 1 {stage_one:.4g} TFLOP per image, an edit "
            f"{counted['edit_tflop_per_edit']:.4g} TFLOP, a UNet forward {forward:.4g} TFLOP per image "
            "(docs/scaling.md: 0.803 at 512x512).",
        ]
    check = check_result(rows, table)
    lines += ["", check["line"]] if check else []
    lines += notes(report, rows, "sweep")
    return "\n".join(lines), {"rows": table, "check": check}


def check_result(rows: list[dict], table: list[dict]) -> dict | None:
    """All the steps against the same case scaled from its first steps."""
    checks = by_kind(rows, "sweep", "check")
    if not checks:
        return None
    full = checks[0]
    scaled = next((r for r in table if r["batch"] == full["batch"] and r["dtype"] == full["dtype"]), None)
    if scaled is None:
        return None
    one, two = (
        full["stage1_s_per_image"] / scaled["stage1_s_per_image"],
        full["stage2_s_per_edit"] / scaled["stage2_s_per_edit"],
    )
    line = (
        f"Scaling check: all {full['steps']} steps at batch {full['batch']} ({full['dtype']}) took "
        f"{full['stage1_s_per_image']:.3g} s per image in stage 1 and "
        f"{full['stage2_s_per_edit']:.3g} s per edit, "
        f"x{one:.2f} and x{two:.2f} the scaled figures; {full['stage1_evals_per_image']:g} and "
        f"{full['stage2_evals_per_edit']:g} UNet evaluations, as scaled {scaled['stage1_evals_per_image']:g} "
        f"and {scaled['stage2_evals_per_edit']:g}."
    )
    return {"full": full, "stage1_ratio": one, "stage2_ratio": two, "line": line}


LEVER_COLUMNS = {
    "lever": "lever",
    "stage1_s_per_image": "stage 1 s/image",
    "stage1_vs_baseline": "against baseline",
    "stage2_s_per_edit": "stage 2 s/edit",
    "stage2_vs_baseline": "against baseline",
    "warmup_s": "warm-up s",
    "compile_s": "compile (capture) s",
    "stage1_peak_mb": "stage 1 peak MiB",
    "stage2_peak_mb": "stage 2 peak MiB",
}


def levers_section(report: dict, rows: list[dict]) -> tuple[str, dict]:
    from benchmarks.common import markdown_table

    cases = [c for part in PART_LEVERS for c in by_kind(rows, part, "case")]
    base = next((c for c in cases if c["lever"] == "baseline"), {})
    table = []
    for c in cases:
        row = dict(c)
        row["stage1_vs_baseline"] = ratio(c["stage1_s_per_image"], base.get("stage1_s_per_image"))
        row["stage2_vs_baseline"] = ratio(c["stage2_s_per_edit"], base.get("stage2_s_per_edit"))
        if c["lever"] in CUDA_PARTS and base:
            row["compile_s"] = c["warmup_s"] - base["warmup_s"]  # the warm-up compiles (or captures)
        table.append(row)
    levers = report["settings"]["levers"]
    lines = [
        "## Levers",
        "",
        f"Each against the baseline in the same run, batch {levers['batch']}, {levers['dtype']}, the sweep's "
        "sizes; each case on a freshly loaded model.",
        "",
        markdown_table(table, LEVER_COLUMNS) if table else "No lever finished.",
        "",
        *[f"- `{c['lever']}`: {c['what']}" for c in table],
    ]
    for part in PART_LEVERS:
        lines += notes(report, rows, part)
    return "\n".join(lines), {"rows": table}


NUMERICS_COLUMNS = {
    "dtype": "dtype",
    "reconstruction_psnr": "reconstruction PSNR dB",
    "reconstruction_psnr_min": "worst scene dB",
    "reconstruction_ssim": "SSIM",
    "reconstruction_vs_float32_psnr": "reconstruction against float32's, dB",
    "edit_vs_float32_psnr": "edit against float32's, dB",
    "edits_right": "colour edits right",
    "nonfinite": "non-finite values",
    "values_checked": "of values",
    "seconds": "s",
}


def table_section(
    title: str, prose: str, table: list[dict], columns: dict, missing: str, notes: list[str]
) -> tuple[str, dict]:
    """A part's section of one table: heading, what was measured, the table (or ``missing``), notes."""
    from benchmarks.common import markdown_table

    lines = [f"## {title}", "", prose, "", markdown_table(table, columns) if table else missing, *notes]
    return "\n".join(lines), {"rows": table}


def numerics_section(report: dict, rows: list[dict]) -> tuple[str, dict]:
    numerics = report["settings"]["numerics"]
    prose = (
        f"Model `{numerics['model']}`, {numerics['scenes']} held-out scenes, T={numerics['steps']}, "
        f"K={numerics['inner_steps']}, lr={numerics['lr']}; one colour edit per scene at eta "
        f"{numerics['eta']}. Non-finite values: in z_T, the tuned embeddings, the reconstructions, the "
        "final losses and the edits."
    )
    table = by_kind(rows, "numerics", "dtype")
    return table_section(
        "Numerics", prose, table, NUMERICS_COLUMNS, "No dtype finished.", notes(report, rows, "numerics")
    )


def pipeline_section(report: dict, rows: list[dict]) -> tuple[str, dict]:
    from benchmarks.common import markdown_table
    from benchmarks.pipeline import OVERHEAD_COLUMNS

    measured = next(iter(by_kind(rows, "pipeline", "pipeline")), None)
    lines = ["## Pipeline on one device", ""]
    if measured:
        lines += [f"{measured['setting']}.", "", markdown_table(measured["table"], OVERHEAD_COLUMNS)]
    lines += notes(report, rows, "pipeline")
    return "\n".join(lines), measured or {}


TRAIN_COLUMNS = {
    "recipe": "recipe",
    "dtype": "dtype",
    "done": "finished",
    "vae_steps": "VAE steps",
    "vae_steps_per_s": "VAE steps/s",
    "vae_loss": "VAE MSE (last 50)",
    "unet_steps": "UNet steps",
    "unet_steps_per_s": "UNet steps/s",
    "unet_loss": "UNet loss (last 50)",
    "seconds": "s",
}


def train_section(report: dict, rows: list[dict]) -> tuple[str, dict]:
    prose = (
        "`jobs.train_tiny` on this device for what was left of the part's budget (issue 17); a "
        "finished model is in `OUTDIR/sharp-sd`."
    )
    table = by_kind(rows, "train", "train")
    missing = "The training did not report."
    return table_section(
        "Training the sharp world model", prose, table, TRAIN_COLUMNS, missing, notes(report, rows, "train")
    )


# What docs/scaling.md counted for each family's night, to set the timings against.
COUNTED = {
    "sdxl": ("SDXL", "an SDXL night", "8.36 PFLOP per image in stage 1, 0.687 per edit"),
    "sd3": ("SD3.5", "an SD3.5 Medium night", "16.1 PFLOP per image in stage 1, 1.14 per edit"),
}


def model_section(report: dict, rows: list[dict], part: str) -> tuple[str, dict]:
    model, sweep = report["settings"][part], report["settings"]["sweep"]
    table = [dict(c, images_per_s=1 / c["stage1_s_per_image"]) for c in by_kind(rows, part, "case")]
    title, night, counted = COUNTED[part]
    prose = (
        f"Model `{model['model']}` (random weights) at {table[0]['resolution'] if table else '?'} px, "
        f"the sweep's T={sweep['steps']}, K={sweep['inner_steps']} and timing; docs/scaling.md "
        f"prices {night} from counted FLOPs ({counted})."
    )
    return table_section(title, prose, table, SWEEP_COLUMNS, "No case finished.", notes(report, rows, part))


def parts_section(report: dict) -> str:
    from benchmarks.common import markdown_table

    table = [{"part": name, **status} for name, status in report["parts"].items()]
    columns = {"part": "part", "status": "status", "seconds": "s", "budget_s": "budget s", "reason": ""}
    return "## Parts\n\n" + markdown_table(table, columns)


def write_report(out: Path, report: dict, rows: list[dict]) -> None:
    """``gpu_check.md`` and ``gpu_check.json`` from every row so far, each written whole."""
    device = next(iter(by_kind(rows, "sweep", "device")), {})
    sections, tables = [], {}
    for name, build in (
        ("sweep", lambda: sweep_section(report, rows, device)),
        ("levers", lambda: levers_section(report, rows)),
        ("numerics", lambda: numerics_section(report, rows)),
        ("sdxl", lambda: model_section(report, rows, "sdxl")),
        ("sd3", lambda: model_section(report, rows, "sd3")),
        ("pipeline", lambda: pipeline_section(report, rows)),
        ("train", lambda: train_section(report, rows)),
    ):
        text, tables[name] = build()
        sections.append(text.rstrip())
    peak = device.get("peak_tflops")
    header = [
        "# GPU check",
        "",
        f"`{report['command']}`, {report['started']}, profile `{report['profile']}`, "
        f"{report.get('seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        f"Machine: {device.get('machine', 'not recorded (the sweep part did not start)')}",
        "",
        f"Measured {device.get('peak_dtype', '')} matmul peak: "
        + (f"{peak:.4g} TFLOP/s (the roof for 'of peak')." if peak else "not measured."),
    ]
    text = "\n\n".join(["\n".join(header), *sections, parts_section(report)]) + "\n"
    data = {**report, "device": device, "tables": tables, "rows": rows}
    for name, content in (
        ("gpu_check.md", text),
        ("gpu_check.json", json.dumps(data, indent=1, default=str)),
    ):
        partial = out / f".{name}.tmp"
        partial.write_text(content)
        partial.replace(out / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="the folder for the tables (gpu_check.sh passes it)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model at tiny sizes on the CPU")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: the profile's)")
    parser.add_argument("--parts", nargs="+", choices=ORDER, default=list(ORDER), help="only these parts")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # one part, in a child process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        run_child(args.part, json.loads(args.settings), Path(args.rows), args.deadline)
        return
    if not args.out:
        parser.error("--out OUTDIR is required")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so run_part stops the part it runs
    out = Path(args.out)
    report = run("tiny" if args.tiny else "gpu", out, args.budget, args.parts)
    print((out / "gpu_check.md").read_text())
    failed = [name for name, status in report["parts"].items() if status["status"] in ("failed", "stopped")]
    if failed:  # the tables still hold what every part finished
        sys.exit(f"gpu_check: parts that failed or ran over their budget: {', '.join(failed)}")


if __name__ == "__main__":
    main()
