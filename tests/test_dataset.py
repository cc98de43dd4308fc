"""The training set (issue 24): the kept edits of a scored output, the best of each (image, target),
written as Parquet that datasets.load_dataset decodes to images and plain pyarrow reads."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch.config import RunConfig
from pipeline.batch.curate import CurateConfig, DatasetConfig, select_best
from pipeline.errors import InputError
from schemas import dataset as ds
from schemas import results as res


def _judged(rows: list[tuple]) -> pa.Table:
    """Results rows (id, target_index, eta, clip_sim_dir, clip_sim_1, kept)."""
    names = [res.ID, res.TARGET_INDEX, res.ETA, res.CLIP_SIM_DIR, res.CLIP_SIM_1, res.KEPT]
    return pa.Table.from_pylist([dict(zip(names, r)) for r in rows])


def test_selection_ranks_kept_edits_within_each_image_and_target():
    table = _judged(
        [
            ("a", 0, 0.6, 0.30, 0.5, True),
            ("a", 0, 0.8, 0.50, 0.1, True),  # best of (a, 0) by direction
            ("a", 0, 1.0, 0.90, 0.9, False),  # rejected: never selected, however it scores
            ("a", 1, 0.6, 0.25, 0.3, True),
            ("a", 1, 0.8, 0.25, 0.4, True),  # a tie on direction: the smaller eta first
            ("b", 0, 0.6, None, 0.2, True),  # no source prompt: ranked by clip_sim_1
            ("b", 0, 0.8, None, 0.7, True),
            ("c", 0, 0.8, 0.99, 0.9, None),  # not scored: no verdict, not taken
        ]
    )
    best = select_best(table, DatasetConfig(best_of=1))
    picked = list(zip(*(best[c].to_pylist() for c in (res.ID, res.TARGET_INDEX, res.ETA))))
    assert picked == [("a", 0, 0.8), ("a", 1, 0.6), ("b", 0, 0.8)]
    assert best[ds.RANK].to_pylist() == [1, 1, 1]
    every = select_best(table, DatasetConfig(best_of=None))
    assert len(every) == 6 and every[ds.RANK].to_pylist() == [1, 2, 1, 2, 1, 2]
    by_image = select_best(table, DatasetConfig(best_of=1, rank_by=res.CLIP_SIM_1))
    assert by_image[res.ETA].to_pylist() == [0.6, 0.8, 0.8]


@pytest.mark.parametrize(
    "settings, problem",
    [(dict(best_of=0), "best_of must be at least 1"), (dict(rank_by="eta"), "rank_by must be one of")],
)
def test_bad_selection_settings_are_refused(settings, problem):
    with pytest.raises(InputError, match=problem):
        RunConfig.from_dict({"dataset": settings})


def test_edits_are_read_from_an_object_store_in_one_batch_and_a_missing_one_is_none(s3_server):
    import fsspec

    from pipeline.batch.dataset import read_edits

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("edits-bucket")
    fs.pipe({f"edits-bucket/out/images/{k}/0-0.8.png": f"png {k}".encode() for k in ("a", "b")})
    uris = [f"s3://edits-bucket/out/images/{k}/0-0.8.png" for k in ("b", "gone", "a")]
    assert read_edits(uris, s3_server) == [b"png b", None, b"png a"]


def _manifest(tmp_path, photos) -> str:
    from PIL import Image

    rows = []
    for name, source in (("astronaut", "a photo of a man"), ("chelsea", None)):
        Image.fromarray(photos[name]).resize((80, 80)).save(tmp_path / f"{name}.png")
        rows.append(
            {
                "id": name,
                "image": str(tmp_path / f"{name}.png"),
                "source_prompt": source,
                "target_prompts": ["a cat", "a dog"],
                "instructions": ["turn him into a cat", None] if source else None,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    return str(tmp_path / "manifest.parquet")


def test_a_scored_output_becomes_a_dataset_that_load_dataset_and_pyarrow_read(
    ray_cluster, tiny_model_dir, photos, tmp_path
):
    import datasets
    from PIL import Image

    from pipeline.batch.dataset import run_dataset
    from pipeline.batch.jobs import run_all
    from pipeline.world.tiny import build_tiny_clip

    out = tmp_path / "out"
    config = RunConfig(
        manifest=_manifest(tmp_path, photos),
        output=str(out),
        gpus_per_actor=1,
        scorer=str(build_tiny_clip(tmp_path / "clip", seed=0)),
        # The random CLIP's verdicts mean nothing: keep one edit in four by its direction score.
        curate=CurateConfig(min_clip_sim_0=None, min_clip_sim_1=None, min_clip_sim_image=None),
        pti=dict(model=tiny_model_dir, steps=3, inner_steps=2, lr=0.1, etas=[0.4, 0.7, 1.0], device="cpu"),
    )
    with pytest.raises(InputError, match="no results under"):  # nothing to take yet
        run_dataset(config)
    run_all(config)
    results = pq.read_table(out / "results").to_pylist()
    assert len(results) == 12
    again = run_all(config)  # resumed: nothing is edited or scored again
    assert (again["edits"], again["already_done"]) == (0, 2)
    assert pq.read_table(out / "results").to_pylist() == results
    for r in results:  # each edit carries its target's instruction
        given = (r["id"], r["target_index"]) == ("astronaut", 0)
        assert r[res.INSTRUCTION] == ("turn him into a cat" if given else None)

    summary = run_dataset(dataclasses.replace(config, dataset=DatasetConfig(best_of=1, rows_per_file=2)))
    kept = [r for r in results if r[res.KEPT]]
    assert summary["kept"] == len(kept) and 0 < summary["kept"] < 12  # the thresholds chose
    best = {}
    for r in kept:  # by hand: the highest direction score (clip_sim_1 without a source) per target
        key = (r["id"], r["target_index"])
        score = r["clip_sim_dir"] if r["clip_sim_dir"] is not None else r["clip_sim_1"]
        if key not in best or score > best[key][0]:
            best[key] = (score, r)
    assert summary["rows"] == summary["selected"] == len(best)

    files = sorted((out / "dataset" / "data").glob("*.parquet"))
    assert len(files) == -(-len(best) // 2) and files[-1].name.endswith(f"-of-{len(files):05d}.parquet")
    loaded = datasets.load_dataset(str(out / "dataset"), split="train")  # as diffusers' trainer loads it
    assert isinstance(loaded.features[ds.INPUT_IMAGE], datasets.Image)  # the schema's metadata says so
    stored = pq.read_table(out / "embeddings", columns=["id", "image"])
    inputs = dict(zip(stored["id"].to_pylist(), stored["image"].combine_chunks().to_numpy_ndarray()))
    assert len(loaded) == len(best)
    for row in loaded:
        _, want = best[(row["id"], row["target_index"])]
        assert row[res.ETA] == pytest.approx(want[res.ETA]) and row[ds.RANK] == 1
        assert row[ds.TARGET_PROMPT] == want[res.TARGET_PROMPT] == ["a cat", "a dog"][row["target_index"]]
        instruction = "turn him into a cat" if (row["id"], row["target_index"]) == ("astronaut", 0) else None
        assert row[ds.INSTRUCTION] == want[res.INSTRUCTION] == instruction  # carried through the results
        assert row[ds.EDIT_PROMPT] == instruction or row[ds.TARGET_PROMPT]  # a caption where none is given
        assert row[ds.SOURCE_PROMPT] == ("a photo of a man" if row["id"] == "astronaut" else None)
        direction = want[res.CLIP_SIM_DIR]
        assert row[res.CLIP_SIM_DIR] == (None if direction is None else pytest.approx(direction))
        assert isinstance(row[ds.EDITED_IMAGE], Image.Image)  # decoded by datasets
        edited = np.asarray(Image.open(want[res.IMAGE_URI]))
        np.testing.assert_array_equal(np.asarray(row[ds.EDITED_IMAGE]), edited)
        np.testing.assert_array_equal(np.asarray(row[ds.INPUT_IMAGE]), inputs[row["id"]])
        assert row[ds.METHOD] == "pti" and row[ds.MODEL] == tiny_model_dir
    plain = pq.read_table(out / "dataset" / "data")  # no datasets needed: the images are PNG bytes
    image = plain[ds.EDITED_IMAGE][0].as_py()
    assert Image.open(io.BytesIO(image["bytes"])).size == (64, 64) and image["path"].endswith(".png")
    assert (out / "dataset" / "config.yaml").exists()

    # A re-run with other selection settings replaces the set: every kept edit, in one file; an
    # edit whose image is gone from the output is left out and counted.
    gone = kept[0][res.IMAGE_URI]
    Path(gone).unlink()
    summary = run_dataset(dataclasses.replace(config, dataset=DatasetConfig(best_of=None)))
    assert [f.name for f in (out / "dataset" / "data").glob("*.parquet")] == ["train-00000-of-00001.parquet"]
    assert summary["rows"] == len(pq.read_table(out / "dataset" / "data")) == len(kept) - 1
    assert summary["missing_images"] == 1
    written = pq.read_table(out / "dataset" / "data")[ds.EDITED_IMAGE].to_pylist()
    assert gone not in [image["path"] for image in written]

    unscored = dataclasses.replace(config, output=str(tmp_path / "unscored"), scorer=None)
    run_all(dataclasses.replace(unscored, pti=dataclasses.replace(unscored.pti, etas=(1.0,))))
    with pytest.raises(InputError, match="none of the 4 edits .* is scored"):
        run_dataset(unscored)
