"""The rendered world: scenes, their captions, their ground truth and the scores built on it."""

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from pipeline.world import scenes as world
from pipeline.world.scenes import Scene, Thing


def test_a_scene_renders_its_background_and_object_colours_exactly():
    scene = Scene((Thing("square", "red", "big", 0.5, 0.5),), "gray")
    image = scene.render()
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == world.BACKGROUNDS["gray"]
    assert tuple(image[32, 32]) == world.COLOURS["red"]
    mask = scene.masks()[0]
    side = round(world.SIZES["big"] * 64)
    assert abs(int(mask.sum()) - side * side) <= 2 * side  # the square's area, up to its edge pixels
    assert (image[mask] == world.COLOURS["red"]).all(axis=-1).mean() > 0.9


@pytest.mark.parametrize("shape, area", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_each_shape_covers_its_geometric_area(shape, area):
    scene = Scene((Thing(shape, "blue", "big", 0.5, 0.5),), "white")
    side = world.SIZES["big"] * 64
    assert scene.masks()[0].sum() == pytest.approx(area * side * side, rel=0.06)


def test_captions_name_every_object_and_the_background():
    two = Scene(
        (Thing("circle", "red", "small", 0.3, 0.3), Thing("triangle", "yellow", "big", 0.7, 0.7)), "black"
    )
    assert two.caption() == "a small red circle and a big yellow triangle on a black background"
    assert (
        two.edited(1, colour="green").caption()
        == "a small red circle and a big green triangle on a black background"
    )


def test_an_edit_changes_only_what_it_names():
    scene = Scene((Thing("circle", "red", "big", 0.4, 0.6),), "white")
    blue = scene.edited(colour="blue")
    assert np.array_equal(scene.masks(), blue.masks())
    inside = scene.masks()[0]
    edge = binary_dilation(inside) & ~inside  # partly covered pixels blend both colours
    assert np.array_equal(scene.render()[~inside & ~edge], blue.render()[~inside & ~edge])
    assert world.nearest_colour(world.mean_colour(blue.render(), inside)) == "blue"
    square = scene.edited(shape="square")
    assert (
        0.6 < world.iou(scene.masks()[0], square.masks()[0]) < 0.9
    )  # same place and size, not the same shape


def test_random_scenes_are_seeded_inside_the_image_and_apart():
    first = [world.random_scene(np.random.default_rng(7), objects=2) for _ in range(2)]
    assert first[0] == first[1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = world.random_scene(rng, objects=2)
        masks = scene.masks()
        assert masks.sum(axis=(1, 2)).min() > 100  # each object wholly visible: none hides another
        assert not (masks[0] & masks[1]).any()
        assert not masks[:, [0, -1], :].any() and not masks[:, :, [0, -1]].any()


def test_the_object_region_of_a_rendering_is_its_mask():
    rng = np.random.default_rng(3)
    for _ in range(30):
        scene = world.random_scene(rng)
        assert world.iou(world.object_region(scene.render(), scene.background), scene.masks()[0]) > 0.9


def test_background_psnr_ignores_the_objects_and_sees_the_background():
    scene = Scene((Thing("circle", "red", "big", 0.5, 0.5),), "white")
    image = scene.render()
    recoloured = scene.edited(colour="green").render()
    assert world.background_psnr(recoloured, image, scene.masks()) == pytest.approx(100.0)
    noisy = np.clip(image.astype(int) + np.random.default_rng(0).integers(-10, 11, image.shape), 0, 255)
    uniform_noise_psnr = 10 * np.log10(255**2 / ((21**2 - 1) / 12))  # integers in [-10, 10]: 32.5 dB
    assert world.background_psnr(noisy, image, scene.masks()) == pytest.approx(uniform_noise_psnr, abs=0.3)


def test_size_jitter_varies_widths_within_a_size_and_leaves_unjittered_scenes_as_they_were():
    plain = [world.random_scene(np.random.default_rng(4)) for _ in range(2)]
    assert plain[0] == plain[1] and plain[0].things[0].scale == 1.0
    rng = np.random.default_rng(4)
    scales = [t.scale for _ in range(100) for t in world.random_scene(rng, 128, 2, size_jitter=0.15).things]
    assert 0.85 <= min(scales) < 0.9 and 1.1 < max(scales) <= 1.15
    small = Scene((Thing("square", "red", "small", 0.5, 0.5, scale=1.15),), "white", 128)
    assert small.masks()[0].sum() == pytest.approx((0.28 * 1.15 * 128) ** 2, rel=0.05)


TRAINING = dict(
    resolution=64,
    scenes=32,
    vae_steps=6,
    vae_batch=4,
    unet_steps=7,
    unet_batch=4,
    checkpoint_every=2,
    threads=1,
)


def _flags(**settings) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    parts = ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model")
    return {f"{p}/{k}": v for p in parts for k, v in load_file(folder / f"{p}.safetensors").items()}


def test_a_killed_training_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_ends(tmp_path, capsys):
    """The sharp recipe, shrunk: one run unbroken in this process; another from the same seed by
    ``jobs.train_tiny``, stopped at a time limit, SIGKILLed once in each phase (in processes of
    their own), and going on each time."""
    import os
    import subprocess
    import sys

    from jobs import train_tiny
    from pipeline.engine.models import load_stable_diffusion
    from pipeline.world.training import RECIPES, train_world_model

    config = RECIPES["sharp-sd"].replace(**TRAINING)
    unbroken = train_world_model(tmp_path / "unbroken", config, progress=False)
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    (failpoints / "training.vae.3").touch()
    (failpoints / "training.unet.5").touch()
    argv = ["--recipe=sharp-sd", "--quiet", "--out", str(tmp_path / "b"), *_flags(**TRAINING)]

    def exit_status(*extra: str) -> int:  # the command, in this process
        try:
            train_tiny.main([*argv, *extra])
        except SystemExit as stop:
            return stop.code
        return 0

    assert exit_status("--max-seconds=0") == 3
    assert "stopped after vae step 2 of 6" in capsys.readouterr().err
    env = {**os.environ, "PTI_FAILPOINTS": str(failpoints)}
    command = [sys.executable, "-m", "jobs.train_tiny", *argv]
    killed = [subprocess.run(command, env=env, capture_output=True, text=True) for _ in range(2)]
    assert [k.returncode for k in killed] == [-9, -9], [k.stderr[-2000:] for k in killed]
    assert sorted(p.name.split(".fired")[0] for p in failpoints.iterdir()) == [
        "training.unet.5",
        "training.vae.3",
    ]
    assert exit_status() == 0
    first, second = _weights(unbroken), _weights(tmp_path / "b")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    untrained = train_world_model(tmp_path / "c", config.replace(vae_steps=0, unet_steps=0), progress=False)
    assert any(not torch.equal(v, _weights(untrained)[k]) for k, v in first.items())  # the steps did train
    record = json.loads((unbroken / "training.json").read_text())
    assert record["config"]["unet_channels"] == [32, 64, 128] and len(record["curves"]["unet_loss"]) == 1
    sd = load_stable_diffusion(str(tmp_path / "b"), device="cpu")
    assert sd.resolution == 64 and sd.vae.config.scaling_factor > 0
    assert len(sd.unet.config.down_block_types) == 3 and not sd.vae.config.mid_block_add_attention

    capsys.readouterr()
    assert exit_status("--unet-lr=0.5") == 2
    assert "another recipe (unet_lr 0.001 -> 0.5)" in capsys.readouterr().err
