"""Stage 1's cost against its quality on the rendered world: which (T, K, lr, early stop, inversion
guidance) buy the reconstruction and the edits for the fewest UNet evaluations.

``python -m benchmarks.stage_one --images 8 --out docs`` runs PTI's stage 1 (ALGORITHM.md, 1a and
1b) over held-out scenes for each setting of ``--settings`` (PTIConfig fields over the defaults,
``steps=25,inner_steps=5``, each read as the jobs' ``--set pti.steps=25``) at each ``--guidance``,
and measures per image:

- cost: UNet evaluations (the rows the UNet evaluated, so early-stopped images cost less than
  the bound ``T + T (1 + K + 1)``), batched UNet calls and seconds;
- reconstruction: latent PSNR of the eta = 0 reconstruction's ``z_0`` against the VAE encoding of
  the input ``z*_0`` (peak: the encoding's range per image), and pixel PSNR of its decoding;
- edits: one colour edit per scene at ``--eta``, plain (``control none``) and under attention
  control (``auto``), scored against the rendered truth (editability, object IoU, background PSNR).

Writes ``stage-one.md`` (tables), ``stage-one.png`` (latent PSNR against evaluations, the Pareto
frontier marked) and ``stage-one.json`` to ``--out``, after every setting, so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table, model_folder, pti_settings, write_page
from benchmarks.edit_quality import SHIPPED_MODEL, Control, World, edit_scenes, score_grid_point
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.engine.models import load_stable_diffusion

# T in {50, 25, 20} by K in {10, 5, 2} (T = 50, K = 10 is the default, ''), K = 3 at T = 50 (its
# bound under half the default's), then early stop, lr and inversion guidance around the cheap points.
GRID = (
    *(f"steps={t},inner_steps={k}" for t in (50, 25, 20) for k in (10, 5, 2) if (t, k) != (50, 10)),
    "steps=50,inner_steps=3",
    "steps=50,inner_steps=10,stop_eps=1e-4",
    "steps=50,inner_steps=10,stop_eps=1e-3",
    "steps=25,inner_steps=5,stop_eps=1e-4",
    "steps=25,inner_steps=5,lr=2e-2",
    "steps=50,inner_steps=10,inversion_guidance=1",
)
EDIT_SCORES = {"editability": "editability", "object_iou": "object IoU", "background_psnr": "bg PSNR"}
CONTROLS = (
    Control(),
    Control("auto", False, PTIConfig.cross_replace_steps, PTIConfig.self_replace_steps),
)


def latent_psnr(z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of latents ``[B, 4, h, w]`` against ``z0``, the peak being each
    image's range in ``z0`` (latents have no fixed range; differences between settings do not
    depend on the peak, which is the same image's in every setting)."""
    peak = (z0.flatten(1).amax(1) - z0.flatten(1).amin(1)).double()
    mse = (z.double() - z0.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / mse)


def measure(sd, scenes: World, config: PTIConfig, eta: float, max_rows: int) -> dict:
    """Stage 1 of every scene under ``config``, its cost and reconstruction, and one colour edit per
    scene at ``eta``, plain and controlled."""
    engine = Engine(sd, config)
    z0 = engine.encode_images(scenes.pixels)
    started = time.perf_counter()
    inversion = engine.invert_and_tune(scenes.pixels, scenes.sources)
    seconds = time.perf_counter() - started
    n = len(scenes)
    row = {
        "evaluations_per_image": engine.eps.evaluations / n,
        "evaluation_bound": config.unet_evaluations()["stage_one"],
        "calls": engine.eps.calls,
        "seconds_per_image": seconds / n,
        "inner_steps_per_timestep": float(inversion.inner_steps.float().mean()),
        "latent_psnr": float(latent_psnr(inversion.reconstruction_latent.cpu(), z0.cpu()).mean()),
        "pixel_psnr": float(inversion.psnr.mean()),
        "pixel_ssim": float(inversion.ssim.mean()),
    }
    for control in CONTROLS:
        grid = [("colour", eta, control)]
        planners = {} if control.plain else {control: Engine(sd, control.config(config))}
        per_call = max(1, max_rows // 2)
        pixels = [
            edit_scenes(engine, inversion, scenes, list(range(a, min(a + per_call, n))), grid, planners)[0]
            for a in range(0, n, per_call)
        ]
        scores = score_grid_point(torch.cat(pixels), None, scenes, "colour", control)
        row |= {f"{control.control}_{k}": scores[k] for k in EDIT_SCORES}
    return row


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats: as few evaluations and as high a latent PSNR, one strictly."""

    def beats(a, b):
        cheaper = a["evaluations_per_image"] <= b["evaluations_per_image"]
        better = a["latent_psnr"] >= b["latent_psnr"]
        strictly = (
            a["evaluations_per_image"] < b["evaluations_per_image"] or a["latent_psnr"] > b["latent_psnr"]
        )
        return cheaper and better and strictly

    return [b for b in rows if not any(beats(a, b) for a in rows)]


def run(args, sd, scenes: World, done: list[dict]) -> list[dict]:
    rows = list(done)
    for guidance in args.guidance:
        for text in args.settings:
            overrides = pti_settings(text.split(","))
            config = PTIConfig(model=args.model, guidance=guidance, progress=False, **overrides)
            row = {"setting": text or "default", "overrides": overrides, "guidance": guidance}
            row |= measure(sd, scenes, config, args.eta, args.max_rows)
            rows.append(row)
            print(
                f"w={guidance:g} {row['setting']}: {row['evaluations_per_image']:.0f} evals/image, "
                f"latent PSNR {row['latent_psnr']:.2f} dB, {row['seconds_per_image']:.2f} s/image",
                file=sys.stderr,
                flush=True,
            )
            write_results(rows, args)
    return rows


# --- what is written -------------------------------------------------------------------------


def write_plot(rows: list[dict], path: Path) -> None:
    """Latent PSNR against evaluations per image, a panel per guidance, the frontier joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guidances = list(dict.fromkeys(r["guidance"] for r in rows))
    fig, axes = plt.subplots(1, len(guidances), figsize=(6.5 * len(guidances), 4.8), squeeze=False)
    for ax, guidance in zip(axes[0], guidances):
        at = [r for r in rows if r["guidance"] == guidance]
        front = sorted(pareto(at), key=lambda r: r["evaluations_per_image"])
        ax.scatter([r["evaluations_per_image"] for r in at], [r["latent_psnr"] for r in at], s=14, c="C0")
        ax.plot(
            [r["evaluations_per_image"] for r in front],
            [r["latent_psnr"] for r in front],
            "o-",
            color="C3",
            markersize=5,
            label="Pareto frontier",
        )
        for r in at:
            ax.annotate(
                r["setting"].replace("steps=", "T").replace("inner_T", "K"),
                (r["evaluations_per_image"], r["latent_psnr"]),
                fontsize=5,
            )
        default = next((r for r in at if not r["overrides"]), None)
        if default is not None:
            ax.axvline(
                default["evaluations_per_image"] / 2, color="grey", linestyle=":", label="half the default"
            )
            ax.axhline(default["latent_psnr"] - 0.5, color="grey", linestyle="--", label="default - 0.5 dB")
        ax.set_xlabel("stage-1 UNet evaluations per image")
        ax.set_ylabel("reconstruction latent PSNR (dB)")
        ax.set_title(f"PTI stage 1, w={guidance:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = {
    "guidance": "w",
    "setting": "setting",
    "evaluations_per_image": "evals/image",
    "evaluation_bound": "bound T(K+3)",
    "seconds_per_image": "s/image",
    "latent_psnr": "latent PSNR (dB)",
    "pixel_psnr": "pixel PSNR (dB)",
    **{f"{c}_{k}": f"edit {c}: {h}" for c in ("none", "auto") for k, h in EDIT_SCORES.items()},
    "frontier": "frontier",
}


def table(rows: list[dict]) -> str:
    """Every setting, cheapest first per guidance, those on the Pareto frontier marked."""
    front = {
        id(r) for g in {r["guidance"] for r in rows} for r in pareto([r for r in rows if r["guidance"] == g])
    }
    ordered = sorted(rows, key=lambda r: (r["guidance"], r["evaluations_per_image"]))
    return markdown_table([r | {"frontier": "yes" if id(r) in front else ""} for r in ordered], COLUMNS)


def write_markdown(rows: list[dict], args, path: Path) -> None:
    lines = [
        "# Stage 1: cost against quality",
        "",
        "Measured by " + ", then ".join(f"`{c}`" for c in args.commands) + f" on {machine()}; model "
        f"`{args.model}`, {args.images} held-out scenes, method pti, one colour edit per scene at "
        f"eta {args.eta:g}. Settings are PTIConfig fields over the defaults (T=50, K=10, lr=1e-2 "
        "decaying to half, early stop at 1e-5 + j * 2e-5, inversion guidance 0).",
        "",
        "Evals/image: UNet rows evaluated per image (early-stopped images cost less than the bound "
        "T + T (1 + K + 1)). Latent PSNR: the eta = 0 reconstruction's z_0 against the VAE encoding "
        "of the input, peak the encoding's range per image. Edits: share reaching the target colour, "
        "object IoU with the truth, background PSNR against the input; none: the paper's plain "
        "interpolation, auto: Prompt-to-Prompt (cross 0.8, self 0.4, no local blend).",
        "",
        table(rows),
        "",
        "![latent PSNR against evaluations](stage-one.png)",
        "",
    ]
    write_page(path, "\n".join(lines))


def write_results(rows: list[dict], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"commands": args.commands, "machine": machine(), "rows": rows}
    (args.out / "stage-one.json").write_text(json.dumps(record, indent=2) + "\n")
    write_plot(rows, args.out / "stage-one.png")
    write_markdown(rows, args, args.out / "stage-one.md")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=SHIPPED_MODEL, help="a checkpoint folder, or tiny")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--guidance", nargs="+", type=float, default=[3.0])
    parser.add_argument(
        "--settings", nargs="+", default=["", *GRID], help="FIELD=VALUE,... over the defaults; '' the default"
    )
    parser.add_argument("--eta", type=float, default=0.8)
    parser.add_argument("--max-rows", type=int, default=64, help="edits and source branches per UNet call")
    parser.add_argument("--keep", action="store_true", help="add to --out's stage-one.json, not replace it")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    sd = load_stable_diffusion(model_folder(args.model), device="cpu")
    scenes = World.held_out(args.images, sd.resolution)
    saved = args.out / "stage-one.json"
    done = json.loads(saved.read_text()) if args.keep and saved.exists() else {"commands": [], "rows": []}
    args.commands = [*done["commands"], "python -m benchmarks.stage_one " + " ".join(args.argv)]
    rows = run(args, sd, scenes, done["rows"])
    print((args.out / "stage-one.md").read_text())
    return rows


if __name__ == "__main__":
    main()
