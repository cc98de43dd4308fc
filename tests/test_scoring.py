"""Scoring edits (issue 24): CLIP similarities as InstructPix2Pix's generator computes them, from
a scorer loaded like the SD checkpoint (folder, object-store URI or hub id, safetensors only).
The tiny CLIP has random weights: these tests prove the computation and the loading, not quality."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.batch.config import RunConfig
from pipeline.batch.curate import CurateConfig
from pipeline.engine.scoring import clip_similarities, load_scorer, normalized
from pipeline.errors import InputError, ModelError
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


# --- scores in the pipeline -----------------------------------------------------------------------

PTI = dict(steps=3, inner_steps=2, lr=0.1, etas=[0.5, 1.0], progress=False, device="cpu")


def _manifest(tmp_path, photos) -> str:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for name, source in (("astronaut", "a photo of a man"), ("chelsea", None)):
        buffer = io.BytesIO()
        Image.fromarray(photos[name]).resize((80, 80)).save(buffer, format="PNG")
        (tmp_path / f"{name}.png").write_bytes(buffer.getvalue())
        image = str(tmp_path / f"{name}.png")
        rows.append({"id": name, "image": image, "source_prompt": source, "target_prompts": ["a cat"]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    return str(tmp_path / "manifest.parquet")


def test_a_job_scores_every_edit_as_the_scorer_scores_its_written_image_and_stored_input(
    ray_cluster, tiny_model_dir, photos, clip_dir, scorer, tmp_path
):
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.batch.jobs import run_all
    from schemas import results as res

    config = RunConfig(
        manifest=_manifest(tmp_path, photos),
        output=str(tmp_path / "out"),
        gpus_per_actor=1,
        scorer=str(clip_dir),
        pti=dict(model=tiny_model_dir, **PTI),
    )
    summary = run_all(config)
    assert summary["edits"] == 4
    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    stored = pq.read_table(tmp_path / "out" / "embeddings", columns=["id", "source_prompt", "image"])
    inputs = dict(zip(stored["id"].to_pylist(), stored["image"].combine_chunks().to_numpy_ndarray()))
    assert inputs["astronaut"].shape == (64, 64, 3)  # the input as stage 1 saw it
    for row in results:
        edited = np.asarray(Image.open(row["image_uri"]))
        pixels = torch.from_numpy(np.stack([inputs[row["id"]], edited])).permute(0, 3, 1, 2).float() / 255
        image_0, image_1 = scorer.encode_images(pixels)[:, None]
        source = "a photo of a man" if row["id"] == "astronaut" else None
        text_1 = scorer.encode_texts([row["target_prompt"]])
        text_0 = scorer.encode_texts([source or ""])
        want = {k: v.item() for k, v in clip_similarities(image_0, image_1, text_0, text_1).items()}
        if source is None:  # no caption: nothing to compare the change of text with
            want["clip_sim_0"] = want["clip_sim_dir"] = None
        for name, value in want.items():
            assert row[name] == (None if value is None else pytest.approx(value, abs=1e-5)), (row["id"], name)
        assert -1 <= row[res.INPUT_SSIM] <= 1 and row[res.INPUT_SSIM] != 1  # the edit changed the image
        thresholds = config.curate.thresholds()  # each edit judged by every defined score
        under = [n for n, low in thresholds.items() if row[n] is not None and row[n] < low]
        assert row[res.KEPT] == (not under) and (row[res.REJECTED_BY] is None) == (not under), row
    kept = sum(r[res.KEPT] for r in results)  # the summary counts the verdicts
    assert summary.get("kept", 0) == kept and summary.get("rejected", 0) == len(results) - kept
    # One results table holds one scorer's scores: another scorer is refused before any work.
    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    with pytest.raises(InputError, match="scorer was .*tiny-clip.*, now .*other-clip"):
        run_all(dataclasses.replace(config, scorer=str(other)))
    with pytest.raises(InputError, match="curate was .*min_clip_sim_dir=0.2.*, now .*min_clip_sim_dir=0.3"):
        run_all(dataclasses.replace(config, curate=CurateConfig(min_clip_sim_dir=0.3)))
    # A scorer that cannot be loaded is one clear error at start, not an actor's failure mid-job.
    with pytest.raises(ModelError, match="not a transformers CLIP checkpoint"):
        run_all(dataclasses.replace(config, output=str(tmp_path / "out2"), scorer=tiny_model_dir))
    assert not (tmp_path / "out2" / "results").exists()


def test_an_edit_whose_score_is_not_finite_fails_alone(
    ray_cluster, tiny_model_dir, photos, clip_dir, tmp_path
):
    import pyarrow.parquet as pq

    from pipeline.batch.manifests import prepare_rows
    from pipeline.batch.stages import EditStage, TuneStage
    from pipeline.engine.config import PTIConfig
    from pipeline.io.storage import Location

    table = pq.read_table(_manifest(tmp_path, photos))
    read = dict(resolution=64, duplicates=set(), endpoint_url=None, allowed=("/",), max_bytes=2**24)
    prepared = prepare_rows(table, max_pixels=10**7, etas=PTI["etas"], **read)
    config = PTIConfig(model=tiny_model_dir, **PTI)
    tuned = TuneStage(config, Location(tiny_model_dir))(prepared)
    stage = EditStage(config, Location(tiny_model_dir), scorer=Location(str(clip_dir)))
    real = stage.scorer.encode_images

    def encode_images(pixels):
        features = real(pixels)
        if len(pixels) == 4:  # the batch's edits: the first one's features are NaN
            features[0] = float("nan")
        return features

    stage.scorer.encode_images = encode_images
    out = stage(tuned).to_pylist()
    failed = [r for r in out if r["kind"]]
    assert len(out) == 4 and len(failed) == 1 and failed[0]["kind"] == "non_finite"
    assert "scores are not finite" in failed[0]["message"] and "clip_sim_1" in failed[0]["message"]
    assert all(r["clip_sim_1"] is not None and np.isfinite(r["clip_sim_1"]) for r in out if not r["kind"])


def test_each_scored_edit_is_judged_by_every_threshold_and_nulls_reject_nothing():
    import pyarrow as pa

    from pipeline.batch.curate import judge, tally
    from schemas import results as res

    rows = [
        dict(clip_sim_0=None, clip_sim_1=None, clip_sim_dir=None, clip_sim_image=None, input_ssim=None),
        dict(clip_sim_0=0.3, clip_sim_1=0.25, clip_sim_dir=0.4, clip_sim_image=0.9, input_ssim=0.8),
        dict(clip_sim_0=0.3, clip_sim_1=0.25, clip_sim_dir=0.1, clip_sim_image=0.5, input_ssim=0.8),
        dict(clip_sim_0=None, clip_sim_1=0.25, clip_sim_dir=None, clip_sim_image=0.9, input_ssim=0.4),
    ]
    table = pa.Table.from_pylist(rows, schema=pa.schema([res.RESULTS_SCHEMA.field(n) for n in res.SCORES]))
    judged = judge(table, CurateConfig())  # InstructPix2Pix's: 0.2, 0.2, 0.2, 0.7; no SSIM bound
    assert judged[res.KEPT].to_pylist() == [None, True, False, True]
    rejected = "clip_sim_dir 0.1 < 0.2; clip_sim_image 0.5 < 0.7"
    assert judged[res.REJECTED_BY].to_pylist() == [None, None, rejected, None]
    counts = {"kept": 2, "rejected": 1, "rejected_by_clip_sim_dir": 1, "rejected_by_clip_sim_image": 1}
    assert tally(judged) == counts
    strict = judge(table, CurateConfig(min_clip_sim_image=None, min_input_ssim=0.5))
    assert strict[res.KEPT].to_pylist() == [None, True, False, False]
    assert strict[res.REJECTED_BY].to_pylist()[3] == "input_ssim 0.4 < 0.5"
    with pytest.raises(InputError, match=r"curate.min_clip_sim_dir must be a number in \[-1, 1\] or null"):
        RunConfig.load(None, ["curate.min_clip_sim_dir=2"])


def test_the_nights_report_counts_each_outputs_verdicts_and_older_results_have_none(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.batch.output import Output
    from pipeline.batch.report import report_markdown, verdicts

    judged, older = Output.at(str(tmp_path / "judged")), Output.at(str(tmp_path / "older"))
    rows = {
        "id": ["a", "a", "b"],
        "target_index": pa.array([0, 0, 0], pa.int32()),
        "eta": pa.array([0.5, 1.0, 0.5], pa.float32()),
    }
    (tmp_path / "judged" / "results").mkdir(parents=True)
    rejected_by = [None, "clip_sim_dir 0.1 < 0.2", "clip_sim_1 0 < 0.2"]
    verdict = {"kept": [True, False, False], "rejected_by": rejected_by}
    pq.write_table(pa.table({**rows, **verdict}), tmp_path / "judged" / "results" / "run-1-0-00000.parquet")
    (tmp_path / "older" / "results").mkdir(parents=True)
    pq.write_table(pa.table(rows), tmp_path / "older" / "results" / "run-1-0-00000.parquet")
    counts = verdicts(judged)
    assert counts == {"kept": 1, "rejected": 2, "rejected_by_clip_sim_1": 1, "rejected_by_clip_sim_dir": 1}
    assert verdicts(older) == {}
    totals = {
        **dict(manifests=1, manifests_done=1, manifests_failed=0, manifests_skipped=0),
        **dict(rows_in=2, rows_done=2, rows_failed=0, edits=3, error_kinds={}, verdicts=counts),
        **dict(seconds=1.0, rows_per_second=2.0, gpu_hours=0.0, gpu_hour_price=None, cost_estimate=None),
    }
    night = {"run_id": "n", "manifests_prefix": "m", "manifests": [], "totals": totals, "contact_sheet": None}
    page = report_markdown(night)
    assert "- scored edits: kept 1, rejected 2 (clip_sim_1 1, clip_sim_dir 1)" in page
