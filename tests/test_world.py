"""The rendered world: scenes, their captions, their ground truth and the scores built on it."""

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


def test_training_the_world_model_is_reproducible_and_saves_a_loadable_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from pipeline.engine.models import load_stable_diffusion
    from pipeline.world.training import TrainingConfig, train_world_model

    config = TrainingConfig(vae_steps=2, vae_batch=4, scenes=16, unet_steps=2, unet_batch=4, threads=1)
    first, second = (train_world_model(tmp_path / name, config, progress=False) for name in ("a", "b"))
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        a, b = load_file(first / part), load_file(second / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untrained = TrainingConfig(vae_steps=0, unet_steps=0, scenes=16, threads=1)
    before = load_file(
        train_world_model(tmp_path / "c", untrained, progress=False)
        / "unet/diffusion_pytorch_model.safetensors"
    )
    after = load_file(first / "unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the steps did train
    sd = load_stable_diffusion(str(first), device="cpu")
    assert sd.resolution == 64 and sd.vae.config.scaling_factor > 0
