"""Edit quality on the rendered world, where the truth of every edit is known.

``python -m benchmarks.edit_quality`` (the shipped model, held-out scenes) inverts each scene with
every method, edits its object's colour and its shape over a sweep of eta and guidance, and
scores each edit against the rendered truth:

- editability: the share of edits whose object now has the target colour (mean colour inside the
  object's region) or shape (its region overlaps the rendered target shape more than the source);
- fidelity: IoU of the object's region before and after (colour edits keep the shape), PSNR of the
  background away from the objects, PSNR/SSIM of the eta = 0 reconstruction;
- cost: UNet calls and seconds per image.

Writes ``quality.md`` (tables), ``quality.png`` (editability against fidelity) and
``quality-examples.png`` (a contact sheet) to ``--out``, and ``quality.json`` with every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.world import scenes as world
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.io.images import contact_sheet, to_pil, to_tensor
from pipeline.engine.models import load_stable_diffusion

SHIPPED_MODEL = "models/shapes-sd"
NOTES_MARKER = "<!-- findings: kept across runs -->"


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return np.asarray(to_pil(pixels))


def run(
    model: str,
    images: int,
    methods: list[str],
    etas: list[float],
    guidances: list[float],
    steps: int,
    inner_steps: int,
    lr: float,
) -> dict:
    sd = load_stable_diffusion(model, device="cpu")
    scenes = world.held_out_scenes(images, sd.resolution)
    pixels = torch.stack([to_tensor(Image.fromarray(s.render())) for s in scenes])
    sources = [s.caption() for s in scenes]
    targets = [world.edit_targets(s, n) for n, s in enumerate(scenes)]
    rows, examples = [], {}
    for guidance in guidances:
        for method in methods:
            config = PTIConfig(
                model=model,
                method=method,
                steps=steps,
                guidance=guidance,
                inner_steps=inner_steps,
                lr=lr,
                progress=False,
            )
            engine = Engine(sd, config)
            started = time.perf_counter()
            inversion = engine.invert_and_tune(pixels, sources)
            # Every batched UNet call evaluates each image once: calls per batch are evaluations per image.
            stage_one = {"seconds": (time.perf_counter() - started) / images, "unet_calls": engine.eps.calls}
            base = {
                "method": method,
                "guidance": guidance,
                "reconstruction_psnr": float(inversion.psnr.mean()),
                "reconstruction_ssim": float(inversion.ssim.mean()),
                "stage1_seconds_per_image": stage_one["seconds"],
                "stage1_unet_calls_per_image": stage_one["unet_calls"],
            }
            for kind in ("colour", "shape"):
                prompts = [t[kind].caption() for t in targets]
                for eta in etas:
                    calls, started = engine.eps.calls, time.perf_counter()
                    edited = engine.edit(inversion, list(range(images)), prompts, [eta] * images)
                    seconds = (time.perf_counter() - started) / images
                    edits = [to_uint8(e) for e in edited]
                    scored = [
                        world.score_edit(e, s, t[kind], kind) for e, s, t in zip(edits, scenes, targets)
                    ]
                    rows.append(
                        {
                            **base,
                            "kind": kind,
                            "eta": eta,
                            "editability": float(np.mean([s["success"] for s in scored])),
                            "object_iou": float(np.mean([s["object_iou"] for s in scored])),
                            "background_psnr": float(np.mean([s["background_psnr"] for s in scored])),
                            "colour_kept": float(np.mean([s["colour_kept"] for s in scored]))
                            if kind == "shape"
                            else None,
                            "edit_seconds_per_image": seconds,
                            "edit_unet_calls": engine.eps.calls - calls,
                        }
                    )
                    examples[(guidance, method, kind, eta)] = edited[:4]
    return {"rows": rows, "examples": examples, "pixels": pixels[:4]}


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("colour", "shape")):
        for method, guidance in dict.fromkeys((r["method"], r["guidance"]) for r in rows):
            line = [
                r for r in rows if r["method"] == method and r["guidance"] == guidance and r["kind"] == kind
            ]
            ax.plot(
                [r["object_iou"] for r in line],
                [r["editability"] for r in line],
                marker="o",
                label=f"{method} w={guidance:g}",
            )
            for r in line:
                ax.annotate(f"{r['eta']:g}", (r["object_iou"], r["editability"]), fontsize=6)
        ax.set_xlabel("object IoU with the truth (fidelity)")
        ax.set_ylabel("editability")
        ax.set_title(f"{kind} edits (labels: eta)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_examples(result: dict, guidance: float, eta: float, path: Path) -> None:
    """A row per held-out scene and edit kind: input, then each method's edit."""
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    sheet = []
    for kind in ("colour", "shape"):
        for i, source in enumerate(result["pixels"]):
            sheet.append([source, *(result["examples"][(guidance, m, kind, eta)][i] for m in methods)])
    contact_sheet(sheet).save(path)


def write_markdown(result: dict, args, path: Path) -> None:
    rows = result["rows"]
    lines = [
        "# Edit quality on the rendered world",
        "",
        f"Measured by `python -m benchmarks.edit_quality {' '.join(args.argv)}` on {platform.machine()} "
        f"({torch.get_num_threads()} CPU threads, torch {torch.__version__}), model `{args.model}`, "
        f"{args.images} held-out scenes, T={args.steps}, K={args.inner_steps}, lr={args.lr}.",
        "",
        "Editability: share of edits whose object has the target colour / shape. Object IoU: the "
        "object's region after the edit against the truth (the source shape for colour edits). "
        "Background PSNR: away from the objects, against the input.",
        "",
        "| method | w | edit | eta | editability | object IoU | background PSNR (dB) | colour kept "
        "| UNet calls per edit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        kept = "" if r["colour_kept"] is None else f"{r['colour_kept']:.2f}"
        lines.append(
            f"| {r['method']} | {r['guidance']:g} | {r['kind']} | {r['eta']:g} | {r['editability']:.2f} | "
            f"{r['object_iou']:.3f} | {r['background_psnr']:.1f} | {kept} | {r['edit_unet_calls']} |"
        )
    lines += [
        "",
        "| method | w | reconstruction PSNR | reconstruction SSIM | stage-1 UNet calls per image "
        "| stage-1 s/image |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, guidance in dict.fromkeys((r["method"], r["guidance"]) for r in rows):
        r = next(r for r in rows if r["method"] == method and r["guidance"] == guidance)
        lines.append(
            f"| {method} | {guidance:g} | {r['reconstruction_psnr']:.2f} | {r['reconstruction_ssim']:.3f} | "
            f"{r['stage1_unet_calls_per_image']:.0f} | {r['stage1_seconds_per_image']:.2f} |"
        )
    lines += [
        "",
        "![editability against fidelity](quality.png)",
        "",
        f"Examples (w={args.guidance[0]:g}, eta={args.example_eta:g}); rows: colour edits, then shape "
        f"edits; columns: input, then {', '.join(dict.fromkeys(r['method'] for r in rows))}.",
        "",
        "![examples](quality-examples.png)",
        "",
    ]
    # Findings written by hand below the marker survive a re-run.
    kept = (
        path.read_text().split(NOTES_MARKER, 1)[1]
        if path.exists() and NOTES_MARKER in path.read_text()
        else "\n"
    )
    path.write_text("\n".join(lines) + "\n" + NOTES_MARKER + kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=SHIPPED_MODEL)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--methods", nargs="+", default=["pti", "ddim", "nti", "npi"])
    parser.add_argument("--etas", nargs="+", type=float, default=[0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--guidance", nargs="+", type=float, default=[7.5])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=PTIConfig.lr)
    parser.add_argument("--example-eta", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.example_eta not in args.etas:
        parser.error(f"--example-eta {args.example_eta:g} is not one of --etas")
    torch.manual_seed(0)
    result = run(
        args.model, args.images, args.methods, args.etas, args.guidance, args.steps, args.inner_steps, args.lr
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result["rows"], indent=2) + "\n")
    write_plot(result["rows"], args.out / "quality.png")
    write_examples(result, args.guidance[0], args.example_eta, args.out / "quality-examples.png")
    write_markdown(result, args, args.out / "quality.md")
    print((args.out / "quality.md").read_text())


if __name__ == "__main__":
    main()
