"""Edit quality on the rendered world, where the truth of every edit is known.

``python -m benchmarks.edit_quality`` (the shipped model, held-out scenes) inverts each scene with
every method, edits its object's colour and its shape over a sweep of eta and guidance, plainly
and under attention control (Prompt-to-Prompt, Hertz et al. 2023, with and without local blend),
and scores each edit against the rendered truth:

- editability: the share of edits whose object now has the target colour (mean colour inside the
  object's region) or shape (its region overlaps the rendered target shape more than the source);
- fidelity: IoU of the object's region before and after (colour edits keep the shape), PSNR of the
  background away from the objects, PSNR/SSIM and object IoU of the eta = 0 reconstruction;
- the model's ceiling, first: its VAE's round trip of the scenes;
- local blend: the share of the latent each edit keeps as its own (the rest is the source's) and
  the share of the object's latent cells inside it;
- cost: UNet evaluations and seconds per edit, UNet calls and seconds per image of stage 1.

Stage 1 runs once per (method, guidance); every control of stage 2 edits from that inversion, all
edits of one scene in one call, so that controlled edits share their scene's source branch
(``2T (n + 1)`` evaluations for ``n`` edits, against ``2T n`` plain).

Every control is measured at each ``--blend``, ``--cross-replace-steps`` and ``--self-replace-steps``
named, so the step fractions sweep as a run of their own (--out elsewhere):
``--methods pti --etas 0.8 --controls auto --blend off --cross-replace-steps 0.4 0.6 0.8 1.0
--self-replace-steps 0.2 0.4 0.6``.

Writes ``quality.md`` (tables) and ``quality-examples.png`` (a contact sheet) to ``--out`` (default
``docs/quality/<model folder>``), and ``quality.json`` with every number. ``docs/quality.md``
compares the models by hand. Text adherence (what the model draws from fresh noise) and the plot of
editability against fidelity left after commit e43f36c, which still writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import add_set_option, markdown_table, measured_by, pti_settings, write_page
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine, Inversion
from pipeline.engine.models import load_stable_diffusion
from pipeline.io.images import to_tensor, to_uint8
from pipeline.io.sheets import contact_sheet
from pipeline.world import scenes as world

SHIPPED_MODEL = "models/shapes-sd"
KINDS = ("colour", "shape")
EXAMPLE_SCENES = 4
# The quality bar, for colour edits: share reaching the target colour, object IoU, background PSNR.
BAR = {"editability": 0.9, "object_iou": 0.85, "background_psnr": 30.0}


# --- what is measured ------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """Stage 2's attention control of an edit: ``none`` is the paper's plain interpolation, any
    other is ``PTIConfig.control`` with its local blend and step fractions."""

    control: str = "none"
    local_blend: bool = False
    cross_replace_steps: float | None = None
    self_replace_steps: float | None = None

    @property
    def plain(self) -> bool:
        return self.control == "none"

    def label(self) -> str:
        return self.control + (" + blend" if self.local_blend else "")

    def config(self, base: PTIConfig) -> PTIConfig:
        if self.plain:
            return base.replace(control="none")
        return base.replace(
            control=self.control,
            local_blend=self.local_blend,
            cross_replace_steps=self.cross_replace_steps,
            self_replace_steps=self.self_replace_steps,
        )

    def columns(self) -> dict:
        return {
            "control": self.control,
            "local_blend": None if self.plain else self.local_blend,
            "cross_replace_steps": self.cross_replace_steps,
            "self_replace_steps": self.self_replace_steps,
        }


def controls_of(controls: list[str], blends: list[str], crosses: list[float], selfs: list[float]) -> list:
    """Every control to measure: ``none`` once, each other control at every blend and step fraction."""
    out = []
    for control in dict.fromkeys(controls):
        if control == "none":
            out.append(Control())
        else:
            out += [Control(control, b == "on", x, s) for b in blends for x in crosses for s in selfs]
    return out


@dataclass
class World:
    """The held-out scenes: pixels, captions (the source prompts) and the truth of each edit."""

    scenes: list
    pixels: torch.Tensor
    sources: list[str]
    truths: list[dict]

    @classmethod
    def held_out(cls, count: int, resolution: int) -> "World":
        scenes = world.held_out_scenes(count, resolution)
        pixels = torch.stack([to_tensor(Image.fromarray(s.render())) for s in scenes])
        truths = [world.edit_targets(s, n) for n, s in enumerate(scenes)]
        return cls(scenes, pixels, [s.caption() for s in scenes], truths)

    def __len__(self) -> int:
        return len(self.scenes)


# --- the model's ceiling and stage 1 ---------------------------------------------------------


def scene_fidelity(pixels: torch.Tensor, scenes: World) -> tuple[float, float]:
    """Mean object IoU and background PSNR of images that should be the scenes themselves."""
    images = [to_uint8(p) for p in pixels]
    iou = [
        world.iou(world.object_region(i, s.background), s.masks()[0]) for i, s in zip(images, scenes.scenes)
    ]
    background = [world.background_psnr(i, s.render(), s.masks()) for i, s in zip(images, scenes.scenes)]
    return float(np.mean(iou)), float(np.mean(background))


def model_ceiling(engine: Engine, scenes: World) -> dict:
    """What no edit can beat: the VAE's round trip of each scene (encode, decode), scored as an
    edit that changes nothing. Stage 1's reconstructions (per method) come on top of it."""
    iou, background = scene_fidelity(engine.decode_latents(engine.encode_images(scenes.pixels)), scenes)
    return {"vae_object_iou": iou, "vae_background_psnr": background}


def stage_one(engine: Engine, scenes: World) -> tuple[Inversion, dict]:
    """Invert and tune every scene; the columns every row of this (method, guidance) shares."""
    started = time.perf_counter()
    inversion = engine.invert_and_tune(scenes.pixels, scenes.sources)
    seconds = time.perf_counter() - started
    reconstruction_iou, reconstruction_background = scene_fidelity(inversion.reconstruction, scenes)
    # Every batched UNet call evaluates each image once: calls per batch are evaluations per image.
    return inversion, {
        "method": engine.config.method,
        "guidance": engine.config.guidance,
        "reconstruction_psnr": float(inversion.psnr.mean()),
        "reconstruction_ssim": float(inversion.ssim.mean()),
        "reconstruction_object_iou": reconstruction_iou,
        "reconstruction_background_psnr": reconstruction_background,
        "stage1_seconds_per_image": seconds / len(scenes),
        "stage1_unet_calls_per_image": engine.eps.calls,
    }


# --- stage 2 ---------------------------------------------------------------------------------


def blend_coverage(mask: torch.Tensor, scene, truth) -> dict:
    """One edit's blend mask ``[1, h, w]`` (True: the edit's own latent): its share of the latent,
    and the share of the latent cells that the source or target object touches inside it."""
    h, w = mask.shape[-2:]
    objects = np.concatenate([scene.masks(), truth.masks()[:1]]).any(0)
    side = objects.shape[0] // h
    cells = torch.from_numpy(objects.reshape(h, side, w, side).any(axis=(1, 3)))
    own = mask[0].cpu()
    return {
        "blend_mask_fraction": float(own.float().mean()),
        "blend_object_cover": float(own[cells].float().mean()),
        "object_latent_fraction": float(cells.float().mean()),
    }


def edit_scenes(
    engine: Engine, inversion: Inversion, scenes: World, images: list[int], grid: list[tuple], planners: dict
) -> tuple[torch.Tensor, torch.Tensor | None, float, int]:
    """Every edit of ``grid`` ((kind, eta, control) triples) for each of ``images``, in one call:
    pixels in (image, grid) order, blend masks (or None), seconds and UNet evaluations."""
    edits = [(b, kind, eta, c) for b in images for kind, eta, c in grid]
    targets = [scenes.truths[b][kind].caption() for b, kind, _, _ in edits]
    plans = [
        planners[c].attention_plan(scenes.sources[b], t) if c in planners else None
        for (b, _, _, c), t in zip(edits, targets)
    ]
    evaluations, started, last = engine.eps.evaluations, time.perf_counter(), {}
    rows, etas = [e[0] for e in edits], [e[2] for e in edits]
    pixels = engine.edit(inversion, rows, targets, etas, plans=plans, callback=last.update)  # the last step's
    seconds = time.perf_counter() - started
    return pixels, last.get("blend_masks"), seconds, engine.eps.evaluations - evaluations


def stage_two(
    engine: Engine, inversion: Inversion, scenes: World, controls: list, etas: list[float], max_rows: int
) -> tuple[list[dict], dict]:
    """Every (kind, eta, control) edit of every scene, scored: one row per (kind, eta, control), and
    the first scenes' edits for the contact sheet. ``controls`` are all plain or all controlled.
    All edits of a scene run in one call (so controlled ones share one source branch), as many
    scenes per call as fit ``max_rows``."""
    grid = [(kind, eta, c) for c in controls for kind in KINDS for eta in etas]
    controlled = not controls[0].plain
    planners = {c: Engine(engine.sd, c.config(engine.config)) for c in controls if not c.plain}
    per_call = max(1, max_rows // (len(grid) + controlled))
    pixels, masks, seconds, evaluations = [], [], 0.0, 0
    for first in range(0, len(scenes), per_call):
        images = list(range(first, min(first + per_call, len(scenes))))
        p, m, s, e = edit_scenes(engine, inversion, scenes, images, grid, planners)
        pixels.append(p.view(len(images), len(grid), *p.shape[1:]))
        masks.append(None if m is None else m.view(len(images), len(grid), *m.shape[1:]))
        seconds, evaluations = seconds + s, evaluations + e
    pixels = torch.cat(pixels)
    masks = None if masks[0] is None else torch.cat(masks)
    cost = {
        "edits_per_image": len(grid),
        "edit_unet_evaluations_per_edit": evaluations / pixels.shape[0] / len(grid),
        "edit_seconds_per_edit": seconds / pixels.shape[0] / len(grid),
    }
    rows = [
        score_grid_point(pixels[:, g], None if masks is None else masks[:, g], scenes, kind, c)
        | {"kind": kind, "eta": eta, **c.columns(), **cost}
        for g, (kind, eta, c) in enumerate(grid)
    ]
    examples = {(kind, eta, c): pixels[:EXAMPLE_SCENES, g] for g, (kind, eta, c) in enumerate(grid)}
    return rows, examples


def score_grid_point(pixels: torch.Tensor, masks, scenes: World, kind: str, control: Control) -> dict:
    """The scores of one (kind, eta, control) over every scene, averaged."""
    scored = [
        world.score_edit(to_uint8(p), s, t[kind], kind)
        for p, s, t in zip(pixels, scenes.scenes, scenes.truths)
    ]
    row = {
        "editability": float(np.mean([s["success"] for s in scored])),
        "object_iou": float(np.mean([s["object_iou"] for s in scored])),
        "background_psnr": float(np.mean([s["background_psnr"] for s in scored])),
        "colour_kept": float(np.mean([s["colour_kept"] for s in scored])) if kind == "shape" else None,
    }
    if control.local_blend and masks is not None:
        cover = [blend_coverage(m, s, t[kind]) for m, s, t in zip(masks, scenes.scenes, scenes.truths)]
        row |= {k: float(np.mean([c[k] for c in cover])) for k in cover[0]}
    return row


# --- the run ---------------------------------------------------------------------------------


def run(args) -> dict:
    """Stage 1 per (guidance, method), then every control of stage 2 from that inversion."""
    sd = load_stable_diffusion(args.model, device="cpu")
    scenes = World.held_out(args.images, sd.resolution)
    controls = controls_of(args.controls, args.blend, args.cross_replace_steps, args.self_replace_steps)
    rows, examples, reconstructions = [], {}, {}
    ceiling = model_ceiling(Engine(sd, args.config), scenes)
    for guidance in args.guidance:
        for method in args.methods:
            engine = Engine(sd, args.config.replace(method=method, guidance=guidance))
            inversion, base = stage_one(engine, scenes)
            reconstructions[(guidance, method)] = inversion.reconstruction[:EXAMPLE_SCENES]
            for group in ([c for c in controls if c.plain], [c for c in controls if not c.plain]):
                if group:
                    found, shown = stage_two(engine, inversion, scenes, group, args.etas, args.max_rows)
                    rows += [base | r for r in found]
                    examples |= {(guidance, method, *key): v for key, v in shown.items()}
            print(f"w={guidance:g} {method}: done", file=sys.stderr, flush=True)
    return {
        "rows": rows,
        "examples": examples,
        "reconstructions": reconstructions,
        "pixels": scenes.pixels[:EXAMPLE_SCENES],
        "controls": controls,
        "ceiling": ceiling,
    }


# --- what is written -------------------------------------------------------------------------


def first_of_each_label(controls: list[Control]) -> list[Control]:
    """One control per label (``none``, ``auto``, ``auto + blend``): the first step fractions."""
    shown: dict[str, Control] = {}
    for c in controls:
        shown.setdefault(c.label(), c)
    return list(shown.values())


def write_examples(result: dict, guidance: float, eta: float, path: Path) -> None:
    """A row per example scene and edit kind: the input, then for each method its reconstruction
    (eta 0) and its edit under each control (the first step fractions measured)."""
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    shown = first_of_each_label(result["controls"])
    sheet = []
    for kind in KINDS:
        for i, source in enumerate(result["pixels"]):
            row = [source]
            for m in methods:
                row.append(result["reconstructions"][(guidance, m)][i])
                row += [result["examples"][(guidance, m, kind, eta, c)][i] for c in shown]
            sheet.append(row)
    contact_sheet(sheet).save(path)


EDIT_COLUMNS = {
    "method": "method",
    "guidance": "w",
    "control": "control",
    "blend": "blend",
    "cross_replace_steps": "cross",
    "self_replace_steps": "self",
    "kind": "edit",
    "eta": "eta",
    "editability": "editability",
    "object_iou": "object IoU",
    "background_psnr": "background PSNR (dB)",
    "colour_kept": "colour kept",
    "blend_mask_fraction": "blend mask share",
    "blend_object_cover": "object cells in mask",
    "edit_unet_evaluations_per_edit": "UNet evals per edit",
    "edit_seconds_per_edit": "s per edit",
}
STAGE_ONE_COLUMNS = {
    "method": "method",
    "guidance": "w",
    "reconstruction_psnr": "reconstruction PSNR",
    "reconstruction_ssim": "reconstruction SSIM",
    "reconstruction_object_iou": "reconstruction object IoU",
    "reconstruction_background_psnr": "reconstruction background PSNR",
    "stage1_unet_calls_per_image": "stage-1 UNet calls per image",
    "stage1_seconds_per_image": "stage-1 s/image",
}


def edit_table(rows: list[dict], columns: dict = EDIT_COLUMNS) -> str:
    """The edits' rows as a table, local blend shown as on or off (blank for plain edits)."""
    blends = [
        {"blend": None if r["control"] == "none" else ("on" if r["local_blend"] else "off")} for r in rows
    ]
    return markdown_table([r | b for r, b in zip(rows, blends)], columns)


def ceiling_lines(ceiling: dict, rows: list[dict]) -> list[str]:
    """The model's own ceiling, first: its VAE's round trip and each method's reconstruction."""
    best = max(rows, key=lambda r: r["reconstruction_object_iou"])
    return [
        "The model's ceiling: its VAE's round trip of the held-out scenes keeps the object at IoU "
        f"{ceiling['vae_object_iou']:.3f} and the background at {ceiling['vae_background_psnr']:.1f} dB; "
        f"the best reconstruction (eta 0, {best['method']}, w={best['guidance']:g}) at IoU "
        f"{best['reconstruction_object_iou']:.3f} and {best['reconstruction_background_psnr']:.1f} dB "
        "(every method's in the stage-1 table). No edit keeps more of the scene than these.",
    ]


def closest_to_bar(rows: list[dict]) -> list[dict]:
    """Per (method, w, control): the colour edit setting that meets the editability of the bar with
    the highest object IoU, else the most editable one; and whether it meets the whole bar."""
    best = {}
    for r in (r for r in rows if r["kind"] == "colour"):
        key = (r["method"], r["guidance"], r["control"], r["local_blend"])
        key += (r["cross_replace_steps"], r["self_replace_steps"])
        reached = r["editability"] >= BAR["editability"]
        rank = (reached, r["object_iou"] if reached else 0)
        if key not in best or rank > best[key][0]:
            best[key] = (rank, r)
    return [r | {"met": "yes" if all(r[k] >= v for k, v in BAR.items()) else "no"} for _, r in best.values()]


def write_markdown(result: dict, args, path: Path) -> None:
    rows = result["rows"]
    lines = [
        "# Edit quality on the rendered world",
        "",
        measured_by("benchmarks.edit_quality", args.argv) + f", model `{args.model}`, "
        f"{args.images} held-out scenes, T={args.config.steps}, K={args.config.inner_steps}, "
        f"lr={args.config.lr}, blend threshold {args.config.blend_threshold:g}.",
        "",
        "Editability: share of edits whose object has the target colour / shape. Object IoU: the "
        "object's region after the edit against the truth (the source shape for colour edits). "
        "Background PSNR: away from the objects, against the input. Control: none is the paper's "
        "plain interpolation; auto is Prompt-to-Prompt (word swap for these prompts) with local blend "
        "off or on, cross / self the fractions of steps whose cross- / self-attention is the source's. "
        "Blend mask share: of the latent, the part the edit keeps as its own (the rest is the source "
        "branch's); object cells in mask: the share of the latent cells the source or target object "
        "touches that are inside it. UNet evaluations per edit: all edits of a scene run in one call, "
        "plain 2T each, controlled 2T (n + 1) / n for n edits per scene.",
        "",
        *ceiling_lines(result["ceiling"], rows),
        "",
        f"Closest to the quality bar (colour edits: target colour in >= {BAR['editability']:.0%}, object "
        f"IoU >= {BAR['object_iou']}, background PSNR >= {BAR['background_psnr']:g} dB): per method, w and "
        "control, the eta that reaches the editability with the best object IoU (else the most editable).",
        "",
        edit_table(closest_to_bar(rows), EDIT_COLUMNS | {"met": "bar met"}),
        "",
        "All settings:",
        "",
        edit_table(rows),
        "",
        markdown_table(list({(r["method"], r["guidance"]): r for r in rows}.values()), STAGE_ONE_COLUMNS),
        "",
    ]
    lines += [
        f"Examples (w={args.guidance[0]:g}, eta={args.example_eta:g}); rows: colour edits, then shape "
        "edits; columns: the input, then for each of "
        f"{', '.join(dict.fromkeys(r['method'] for r in rows))}: its reconstruction (eta 0) and its edit "
        f"with control {', '.join(c.label() for c in first_of_each_label(result['controls']))}.",
        "",
        "![examples](quality-examples.png)",
        "",
    ]
    write_page(path, "\n".join(lines))


def write_results(result: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    numbers = {"ceiling": result["ceiling"], "rows": result["rows"]}
    (args.out / "quality.json").write_text(json.dumps(numbers, indent=2) + "\n")
    write_examples(result, args.guidance[0], args.example_eta, args.out / "quality-examples.png")
    write_markdown(result, args, args.out / "quality.md")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=SHIPPED_MODEL)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--methods", nargs="+", default=["pti", "ddim", "nti", "npi"])
    parser.add_argument("--etas", nargs="+", type=float, default=[0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--guidance", nargs="+", type=float, default=[7.5])
    add_set_option(parser)
    parser.add_argument("--controls", nargs="+", default=["none", "auto"], help="PTIConfig.control values")
    parser.add_argument(
        "--blend", nargs="+", choices=["off", "on"], default=["off", "on"], help="local blend"
    )
    parser.add_argument(
        "--cross-replace-steps", nargs="+", type=float, default=[PTIConfig.cross_replace_steps]
    )
    parser.add_argument("--self-replace-steps", nargs="+", type=float, default=[PTIConfig.self_replace_steps])
    parser.add_argument("--example-eta", type=float, default=0.8)
    parser.add_argument("--max-rows", type=int, default=256, help="edits and source branches per UNet call")
    parser.add_argument("--out", type=Path, help="default: docs/quality/<the model folder's name>")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.config = PTIConfig(model=args.model, progress=False, **pti_settings(args.set))
    args.out = args.out or Path("docs/quality") / Path(args.model).name
    if args.example_eta not in args.etas:
        parser.error(f"--example-eta {args.example_eta:g} is not one of --etas")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    result = run(args)
    write_results(result, args)
    print((args.out / "quality.md").read_text())
    return result


if __name__ == "__main__":
    main()
