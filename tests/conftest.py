"""Shared fixtures: one tiny model per session, real photographs from scikit-image."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipeline.config import PTIConfig
from pipeline.engine import Engine
from pipeline.images import center_square, to_tensor
from pipeline.models import build_tiny_model, load_stable_diffusion

# Small and quick: the tiny model's 64x64 images, few steps. Its text embeddings are 32 wide
# (SD's are 768), so tuning uses a larger learning rate than ALGORITHM.md's default.
TEST_CONFIG = dict(steps=10, inner_steps=10, lr=0.1, progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_sd(tiny_model_dir):
    return load_stable_diffusion(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def make_engine(tiny_sd, tiny_model_dir):
    """An engine over the session's one loaded model, with config overrides."""

    def make(**overrides) -> Engine:
        return Engine(tiny_sd, PTIConfig(model=tiny_model_dir, **{**TEST_CONFIG, **overrides}))

    return make


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}


@pytest.fixture(scope="session")
def pixels(photos) -> torch.Tensor:
    """The three photographs as a ``[3, 3, 64, 64]`` batch in ``[0, 1]``."""
    return torch.stack([to_tensor(center_square(Image.fromarray(p), 64)) for p in photos.values()])


@pytest.fixture(autouse=True)
def _quiet_loaders():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
