"""The rendered world's CLIP (models/shapes-clip, issue 24): a scorer that knows the world, so that
the curation filter's worth can be measured against the world's truth (docs/quality.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine.scoring import load_scorer
from pipeline.world import scenes as world
from pipeline.world.clip import ClipConfig, contrastive_loss, train_world_clip

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes-clip"
CAPTIONS = sorted(
    f"a {size} {colour} {shape} on a {background} background"
    for size in world.SIZES
    for colour in world.COLOURS
    for shape in world.SHAPES
    for background in world.BACKGROUNDS
)


def unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` as the scorer takes them: ``[B, 3, H, W]`` in [0, 1]."""
    return torch.tensor(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def shipped():
    return load_scorer(str(SHIPPED), device="cpu")


def test_the_shipped_clip_is_safetensors_in_transformers_layout_with_its_record():
    files = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "training.json"} <= files
    assert not files & {"pytorch_model.bin", "model.pt"}
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 5e6
    record = json.loads((SHIPPED / "training.json").read_text())
    assert record["recipe"] == json.loads(json.dumps(ClipConfig().__dict__))  # shipped from the defaults
    curve = record["loss_every_100_steps"]
    assert curve[-1] < curve[0] / 2  # it learned (the floor is the targets entropy: captions repeat)


def test_the_shipped_clip_names_held_out_scenes_among_every_caption_of_the_world(shipped):
    scenes = world.held_out_scenes(96, 64)
    pixels = unit(np.stack([s.render() for s in scenes]))
    best = (shipped.encode_images(pixels) @ shipped.encode_texts(CAPTIONS).T).argmax(1).tolist()
    named = [CAPTIONS[b] == s.caption() for b, s in zip(best, scenes)]
    assert np.mean(named) >= 0.9  # of 72 captions; chance is 1.4 %


def test_the_shipped_clip_sees_a_colour_edit_as_its_direction(shipped):
    """The directional score of a true edit (the truth's render) beats that of a wrong one (the
    colour changed to another than asked) on most held-out scenes."""
    from pipeline.engine.scoring import edit_scores

    wins = []
    for n, scene in enumerate(world.held_out_scenes(24, 64)):
        truth = world.edit_targets(scene, n)["colour"]
        other = [c for c in world.COLOURS if c not in (scene.things[0].colour, truth.things[0].colour)]
        wrong = scene.edited(colour=other[0])  # another colour than asked
        images = unit(np.stack([truth.render(), wrong.render()]))
        source = unit(scene.render()[None])
        scores = edit_scores(shipped, images, [truth.caption()] * 2, source, [0, 0], [scene.caption()])
        wins.append(scores["clip_sim_dir"][0] > scores["clip_sim_dir"][1])
    assert np.mean(wins) >= 0.9


def test_contrastive_loss_splits_a_shared_captions_target_and_reaches_its_floor_when_aligned():
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(2, 8, generator=generator), dim=-1)
    scale = torch.tensor(100.0)
    images = texts = torch.cat([features, features[:1]])  # images 0 and 2 share a caption
    same = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    # Aligned, the loss is its targets' entropy: rows 0 and 2 split theirs over texts 0 and 2.
    assert contrastive_loss(images, texts, scale, same) == pytest.approx(2 / 3 * np.log(2), abs=1e-3)
    two = torch.eye(2, dtype=torch.bool)
    assert contrastive_loss(features, features, scale, two) < 1e-3  # distinct captions, aligned
    assert contrastive_loss(features, features.flip(0), scale, two) > 10  # each image on the other's text


def test_training_is_seeded_and_writes_a_checkpoint_the_scorer_loads(tmp_path):
    config = ClipConfig(scenes=32, steps=3, batch=8, hidden_size=16, projection_dim=8)
    a = load_scorer(str(train_world_clip(tmp_path / "a", config, progress=False)), device="cpu")
    b = load_scorer(str(train_world_clip(tmp_path / "b", config, progress=False)), device="cpu")
    pixels = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(a.encode_images(pixels), b.encode_images(pixels), rtol=0, atol=0)
    assert a.side == 32 and a.encode_texts(["a red circle"]).shape == (1, 8)
