"""Scoring edits (issue 24): CLIP similarities as InstructPix2Pix's generator computes them, from
a scorer loaded like the SD checkpoint (folder, object-store URI or hub id, safetensors only).
The tiny CLIP has random weights: these tests prove the computation and the loading, not quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine.scoring import clip_similarities, load_scorer, normalized
from pipeline.errors import ModelError
from pipeline.world.tiny import build_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return load_scorer(str(clip_dir), device="cpu")


def test_a_tiny_clip_is_transformers_layout_with_safetensors_only(clip_dir):
    files = sorted(p.name for p in clip_dir.iterdir())
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt"))]


def test_the_four_scores_are_the_references_cosines_in_float64():
    rng = np.random.default_rng(0)
    i0, i1, t0, t1 = (normalized(torch.from_numpy(rng.standard_normal((5, 8)))) for _ in range(4))
    scores = clip_similarities(i0, i1, t0, t1)

    def cos(a, b):
        a, b = a.numpy(), b.numpy()
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    want = {
        "clip_sim_0": cos(i0, t0),
        "clip_sim_1": cos(i1, t1),
        "clip_sim_dir": cos(i1 - i0, t1 - t0),
        "clip_sim_image": cos(i0, i1),
    }
    assert scores.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(scores[name].numpy(), want[name], rtol=1e-12, err_msg=name)


def test_an_edit_that_changes_nothing_scores_image_1_and_direction_0(scorer):
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    features = scorer.encode_images(image)
    text_0 = scorer.encode_texts(["a red circle", "a red circle"])
    text_1 = scorer.encode_texts(["a cat", "a dog"])
    scores = clip_similarities(features, features, text_0, text_1)
    torch.testing.assert_close(scores["clip_sim_image"], torch.ones(2))
    assert torch.equal(scores["clip_sim_dir"], torch.zeros(2))  # not NaN: the reference's eps
    assert all(bool(s.isfinite().all()) for s in scores.values())


def test_features_do_not_depend_on_the_batch_and_long_prompts_are_cut_at_77_tokens(scorer):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    together = scorer.encode_images(images)
    alone = torch.cat([scorer.encode_images(images[k : k + 1]) for k in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(3))
    long = "a red cat " * 2000  # 6,000 words: CLIP reads the first 77 tokens, as the reference does
    tokens = scorer.tokenizer(long, truncation=True)["input_ids"]
    cut = scorer.tokenizer.decode(tokens, skip_special_tokens=True)
    torch.testing.assert_close(scorer.encode_texts([long]), scorer.encode_texts([cut]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scorer.encode_texts(["a red cat"]), scorer.encode_texts(["a blue dog"]))


def test_a_scorer_loads_from_an_object_store_uri_taking_only_its_files(
    clip_dir, scorer, tmp_path, monkeypatch
):
    import shutil

    source = tmp_path / "bucket" / "clip"
    shutil.copytree(clip_dir, source)
    for extra in ("pytorch_model.bin", "flax_model.msgpack", "README.md"):
        (source / extra).write_bytes(b"not needed")
    monkeypatch.setenv("PTI_CACHE", str(tmp_path / "cache"))
    loaded = load_scorer(f"file://{source}", device="cpu")
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded.encode_images(images), scorer.encode_images(images), rtol=0, atol=0)
    (copy,) = (tmp_path / "cache" / "models").iterdir()
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in clip_dir.iterdir())


def test_a_scorer_that_cannot_be_loaded_is_one_clear_error(clip_dir, tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="neither an existing folder"):
        load_scorer(str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(ModelError, match="is not a transformers CLIP checkpoint: missing config.json"):
        load_scorer(tiny_model_dir, device="cpu")  # a Stable Diffusion folder is no scorer
    pickled = tmp_path / "pickled"
    build_tiny_clip(pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no safetensors weights"):
        load_scorer(str(pickled), device="cpu")
