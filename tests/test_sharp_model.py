"""The sharp world model (``models/sharp-sd``, issue 17): 128 px scenes, 16x16 latents. It loads in
the diffusers layout with its recipe, knows the world's words one token each, reconstructs the
object, and PTI with attention control edits a colour while keeping the object and background.

Thresholds come from ``docs/quality/sharp-sd/quality.md`` (the benchmark on 12 held-out scenes), with margin.
"""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.engine.config import PRESETS, PTIConfig
from pipeline.engine.engine import Engine
from pipeline.engine.models import load_stable_diffusion
from pipeline.engine.text import tokenize
from pipeline.io.images import to_pil, to_tensor
from pipeline.world import scenes as world
from pipeline.world.training import RECIPES, RESUMABLE_CHANGES

SHARP = Path(__file__).resolve().parents[1] / "models" / "sharp-sd"
SCENES = 3  # of the held-out scenes; each costs about 8 s of the suite
GUIDANCE, ETA = 3.0, 0.8  # docs/quality.md compares the two models at this setting


@pytest.fixture(scope="module")
def sharp_sd():
    return load_stable_diffusion(str(SHARP), device="cpu")


def test_the_sharp_model_is_its_recipe_with_16x16_latents(sharp_sd):
    # Its layout and size (at most 30 MB): tests/test_shipped_model.py, for every shipped model.
    recorded = json.loads((SHARP / "training.json").read_text())["config"]
    recipe = json.loads(json.dumps(asdict(RECIPES["sharp-sd"])))  # tuples as JSON lists
    assert {k: v for k, v in recorded.items() if k not in RESUMABLE_CHANGES} == {
        k: v for k, v in recipe.items() if k not in RESUMABLE_CHANGES
    }
    assert sharp_sd.resolution == 128 and sharp_sd.resolution // sharp_sd.vae_scale_factor == 16  # latents


def test_every_word_of_the_world_is_one_token(sharp_sd):
    ids = tokenize(sharp_sd, list(world.WORDS))
    end = sharp_sd.tokenizer.eos_token_id
    spelled = [tuple(t for t in row.tolist()[1:] if t != end) for row in ids]
    assert all(len(s) == 1 for s in spelled) and len(set(spelled)) == len(world.WORDS)


@pytest.fixture(scope="module")
def controlled_colour_edits(sharp_sd):
    """PTI (fast preset) on the first held-out scenes, each reconstructed (eta 0) and edited to
    another colour under Prompt-to-Prompt control, in one call."""
    scenes = world.held_out_scenes(SCENES, sharp_sd.resolution)
    truths = [world.edit_targets(s, n)["colour"] for n, s in enumerate(scenes)]
    config = PTIConfig(model=str(SHARP), guidance=GUIDANCE, control="auto", progress=False, **PRESETS["fast"])
    engine = Engine(sharp_sd, config)
    pixels = torch.stack([to_tensor(Image.fromarray(s.render())) for s in scenes])
    sources = [s.caption() for s in scenes]
    inversion = engine.invert_and_tune(pixels, sources)
    targets = [t.caption() for t in truths]
    plans = [engine.attention_plan(s, t) for s, t in zip(sources, targets)]
    edited = engine.edit(inversion, list(range(SCENES)), targets, [ETA] * SCENES, plans=plans)
    scores = [
        world.score_edit(np.asarray(to_pil(e)), s, t, "colour") for e, s, t in zip(edited, scenes, truths)
    ]
    return scenes, inversion, scores


@pytest.mark.slow  # PTI on the non-default model: make test-slow (README)
def test_the_reconstruction_keeps_the_object(controlled_colour_edits):
    scenes, inversion, _ = controlled_colour_edits
    ious = [
        world.iou(world.object_region(np.asarray(to_pil(r)), s.background), s.masks()[0])
        for r, s in zip(inversion.reconstruction, scenes)
    ]
    assert np.mean(ious) >= 0.95  # issue 17's bar; measured 0.982 (min 0.965); 0.983 over 12 scenes


@pytest.mark.slow  # PTI on the non-default model: make test-slow (README)
def test_pti_with_control_changes_the_colour_and_keeps_the_object_and_background(controlled_colour_edits):
    _, _, scores = controlled_colour_edits
    # Measured on these three (fast preset): 3 of 3, IoU 0.94 (0.89 to 0.99), 34.6 dB. Over 12 scenes at
    # the default preset: 83 %, 0.766, 33.0 dB (the fourth scene's small square is redrawn at the centre).
    assert sum(s["success"] for s in scores) >= 2
    assert np.mean([s["object_iou"] for s in scores]) >= 0.80
    assert np.mean([s["background_psnr"] for s in scores]) >= 30.0
