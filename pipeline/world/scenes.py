"""A rendered world of coloured shapes on plain backgrounds, with its ground truth.

The shipped tiny model is trained on it (``jobs.train_tiny``), and the edit-quality benchmark
scores edits in it exactly: a scene knows its objects' masks and attributes, so "a red circle" ->
"a blue circle" can be checked for the colour, the shape, the place and the background.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128)}
SIZES = {"small": 0.28, "big": 0.44}  # the object's width, as a fraction of the image side
WORDS = ("a", "and", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS, *SIZES)
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    x: float  # centre, as a fraction of the image side
    y: float
    scale: float = 1.0  # the width is SIZES[size] * scale: sizes vary within "small" and "big"

    @property
    def width(self) -> float:
        return SIZES[self.size] * self.scale

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    resolution: int = 64

    def caption(self) -> str:
        return " and ".join(t.phrase() for t in self.things) + f" on a {self.background} background"

    def edited(self, thing: int = 0, **changes) -> Scene:
        """The truth of an edit: the same scene with one object's attributes changed."""
        things = list(self.things)
        things[thing] = replace(things[thing], **changes)
        return replace(self, things=tuple(things))

    def render(self) -> np.ndarray:
        """``[H, W, 3]`` uint8."""
        big = self.resolution * SUPERSAMPLE
        canvas = Image.new("RGB", (big, big), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(canvas)
        for thing in self.things:
            _draw(draw, thing, big, COLOURS[thing.colour])
        return np.asarray(canvas.resize((self.resolution,) * 2, Image.Resampling.BOX))

    def masks(self) -> np.ndarray:
        """``[objects, H, W]`` bool: the pixels each object covers at least half of (a later
        object hides an earlier one where they overlap)."""
        big = self.resolution * SUPERSAMPLE
        masks = []
        for thing in self.things:
            canvas = Image.new("L", (big, big), 0)
            _draw(ImageDraw.Draw(canvas), thing, big, 255)
            masks.append(np.asarray(canvas.resize((self.resolution,) * 2, Image.Resampling.BOX)) > 127)
        for i in range(len(masks)):
            for later in masks[i + 1 :]:
                masks[i] = masks[i] & ~later
        return np.stack(masks)


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, side: int, fill) -> None:
    half = thing.width * side / 2
    cx, cy = thing.x * side, thing.y * side
    box = (cx - half, cy - half, cx + half, cy + half)
    if thing.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif thing.shape == "square":
        draw.rectangle(box, fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {thing.shape!r}: one of {', '.join(SHAPES)}")


def random_scene(
    rng: np.random.Generator, resolution: int = 64, objects: int = 1, size_jitter: float = 0.0
) -> Scene:
    """A scene of ``objects`` shapes that lie wholly inside the image and do not overlap; each
    object's width is its size's, times a uniform factor in ``1 +- size_jitter`` (drawn only when
    ``size_jitter`` is set, so scenes without it are the ones earlier versions drew)."""
    background = str(rng.choice(list(BACKGROUNDS)))
    things: list[Thing] = []
    while len(things) < objects:
        if len(things) and rng.random() < 0.05:
            things = []  # the first objects may leave no room: start again rather than loop forever
        size = str(rng.choice(list(SIZES)))
        scale = float(rng.uniform(1 - size_jitter, 1 + size_jitter)) if size_jitter else 1.0
        margin = SIZES[size] * scale / 2 + 0.04
        x, y = rng.uniform(margin, 1 - margin, size=2)
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        thing = Thing(shape, colour, size, float(x), float(y), scale)
        if all(_apart(thing, other) for other in things):
            things.append(thing)
    return Scene(tuple(things), background, resolution)


def _apart(a: Thing, b: Thing) -> bool:
    reach = (a.width + b.width) / 2 + 0.02
    return abs(a.x - b.x) > reach or abs(a.y - b.y) > reach


# --- scoring an edit against the truth -----------------------------------------------------------


def nearest_colour(rgb: np.ndarray) -> str:
    """The world's colour nearest to an RGB triple (0-255)."""
    names = list(COLOURS)
    distances = [np.linalg.norm(np.asarray(COLOURS[n], float) - rgb) for n in names]
    return names[int(np.argmin(distances))]


def mean_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean RGB inside a mask, after shrinking it a pixel so edges do not blend in."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(mask)
    return image[inner if inner.any() else mask].astype(float).mean(axis=0)


def object_region(image: np.ndarray, background: str) -> np.ndarray:
    """The pixels of an image more than half covered by an object: each pixel is read as a blend
    of the background and the world colour that explains it best, and kept where the blend is
    mostly that colour."""
    bg = np.asarray(BACKGROUNDS[background], float)
    offset = image.astype(float)[..., None, :] - bg  # [H, W, 1, 3]
    towards = np.asarray(list(COLOURS.values()), float) - bg  # [colours, 3]
    cover = np.clip((offset * towards).sum(-1) / (towards**2).sum(-1), 0, 1)  # [H, W, colours]
    residual = np.linalg.norm(offset - cover[..., None] * towards, axis=-1)
    best = residual.argmin(axis=-1)[..., None]
    return (
        np.take_along_axis(cover, best, axis=-1)[..., 0] >= 0.5 - 1 / 255
    )  # as masks(), less 8-bit rounding


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def background_psnr(image: np.ndarray, reference: np.ndarray, masks: np.ndarray, margin: int = 2) -> float:
    """PSNR (dB) over the pixels at least ``margin`` pixels away from every object, capped at 100
    (identical) so that averages over edits stay finite."""
    from scipy.ndimage import binary_dilation

    outside = ~binary_dilation(masks.any(axis=0), iterations=margin)
    error = ((image.astype(float) - reference.astype(float))[outside] ** 2).mean()
    return float(min(10 * np.log10(255.0**2 / max(error, 1e-10)), 100.0))


HELD_OUT_SEED = 1_000_003  # training renders from seed 0: these scenes are new to the model


def held_out_scenes(count: int, resolution: int) -> list[Scene]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    return [random_scene(rng, resolution) for _ in range(count)]


def edit_targets(scene: Scene, n: int) -> dict[str, Scene]:
    """The colour edit and the shape edit of a scene's object, each to another value in turn."""
    thing = scene.things[0]
    colours = [c for c in COLOURS if c != thing.colour]
    shapes = [s for s in SHAPES if s != thing.shape]
    return {
        "colour": scene.edited(colour=colours[n % len(colours)]),
        "shape": scene.edited(shape=shapes[n % len(shapes)]),
    }


def score_edit(edit: np.ndarray, scene: Scene, truth: Scene, kind: str) -> dict:
    """One edit against the truth (``edit`` ``[H, W, 3]`` uint8)."""
    source_mask, target_mask = scene.masks()[0], truth.masks()[0]
    region = object_region(edit, scene.background)
    both = np.stack([source_mask, target_mask])
    scores = {"background_psnr": background_psnr(edit, scene.render(), both)}
    if kind == "colour":
        scores["success"] = nearest_colour(mean_colour(edit, source_mask)) == truth.things[0].colour
        scores["object_iou"] = iou(region, source_mask)
    else:
        scores["success"] = iou(region, target_mask) > iou(region, source_mask)
        scores["object_iou"] = iou(region, target_mask)
        kept = mean_colour(edit, region) if region.any() else np.zeros(3)
        scores["colour_kept"] = nearest_colour(kept) == scene.things[0].colour
    return scores
