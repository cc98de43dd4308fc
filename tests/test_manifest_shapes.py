"""Manifests in the shapes operators hand in (issue 12): a wrong path or a file that is not
Parquet is one clean error, on the driver before any Ray Data work; stray files beside the
Parquet files, pandas' categorical and all-null columns are read; every error row names its row in
the manifest; a results table with an edit twice is read with it once."""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.batch import report
from pipeline.batch.config import RunConfig
from pipeline.batch.jobs import run_all
from pipeline.batch.manifests import check_manifest, read_manifest_part
from pipeline.batch.output import Output
from pipeline.batch.resume import read_committed, read_results
from pipeline.errors import InputError
from schemas import results as res
from schemas.errors import ROW
from schemas.manifest import duplicated_ids, schema_problems, validate_rows

PTI = dict(steps=3, inner_steps=2, lr=0.1, etas=[1.0], progress=False)


def manifest(path) -> RunConfig:
    return RunConfig(manifest=str(path), output=str(path) + "-out")


def refused(config: RunConfig) -> str:
    with pytest.raises(InputError) as error:
        check_manifest(config)
    assert "\n" not in str(error.value)  # one line after "error: "
    return str(error.value)


def pandas_manifest(path, ids, images) -> None:
    """A manifest as pandas writes it: ``id`` categorical, prompts categorical, ``eta`` with no
    value at all (Arrow's null type)."""
    frame = pd.DataFrame(
        {
            "id": pd.Categorical(ids),
            "image": images,
            "source_prompt": pd.Categorical(["a photo"] * len(ids)),
            "target_prompt": pd.Categorical(["a photo of a cat"] * len(ids)),
            "eta": [None] * len(ids),
        }
    )
    frame.to_parquet(path, index=False)


def test_a_missing_path_or_a_file_that_is_not_parquet_is_one_error_naming_it(tmp_path):
    message = refused(manifest(tmp_path / "nowhere.parquet"))
    assert message == f"manifest {tmp_path / 'nowhere.parquet'}: no such file or folder"
    (tmp_path / "m.csv").write_text("id,image,target_prompt\na,a.png,a cat\n")
    assert refused(manifest(tmp_path / "m.csv")) == (
        f"manifest {tmp_path / 'm.csv'} is not a Parquet file (Parquet magic bytes not found in footer)"
    )
    (tmp_path / "x.parquet").write_bytes(b"")
    assert refused(manifest(tmp_path / "x.parquet")) == (
        f"manifest {tmp_path / 'x.parquet'} is not a Parquet file (Parquet file size is 0 bytes)"
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "rows.csv").write_text("id\n")
    assert refused(manifest(folder)).endswith(": no *.parquet files in this folder, only rows.csv")
    pandas_manifest(folder / "a.parquet", ["a"], ["a.png"])
    (folder / "b.parquet").write_bytes(b"")  # a Parquet name in a folder: read, so named when bad
    assert f"{folder / 'b.parquet'} is not a Parquet file" in refused(manifest(folder))


def test_bad_columns_name_their_file_in_a_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    pandas_manifest(folder / "a.parquet", ["a"], ["a.png"])
    pq.write_table(pa.table({"id": [1], "image": [b"png"], "target_prompt": ["x"]}), folder / "b.parquet")
    pandas_manifest(folder / "c.parquet", ["c"], [b"png"])  # images as bytes here, as URIs in a.parquet
    message = refused(manifest(folder))
    assert message == (
        f"manifest {folder}: b.parquet: column 'id' must be a string, got int64; "
        "c.parquet: column 'image' is binary here but string in other files"
    )


def test_an_s3_manifest_that_is_missing_or_not_parquet_is_named_and_stray_files_are_skipped(
    s3_server, tmp_path, caplog
):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="shapes")

    def config(uri):
        return RunConfig(manifest=uri, endpoint_url=s3_server)

    for uri in ("s3://shapes/nowhere.parquet", "s3://shapes/nowhere/", "s3://no-bucket/m.parquet"):
        assert refused(config(uri)) == f"manifest {uri}: no such file or folder"
    client.put_object(Bucket="shapes", Key="bad/x.parquet", Body=b"")
    assert refused(config("s3://shapes/bad/")) == (
        "manifest s3://shapes/bad/x.parquet is not a Parquet file (Parquet file size is 0 bytes)"
    )
    pandas_manifest(tmp_path / "part.parquet", ["a", "b"], ["s3://shapes/a.png", "s3://shapes/b.png"])
    client.put_object(
        Bucket="shapes", Key="night/part-0.parquet", Body=(tmp_path / "part.parquet").read_bytes()
    )
    for name in ("_SUCCESS", "README.txt", ".part-0.parquet.crc"):
        client.put_object(Bucket="shapes", Key=f"night/{name}", Body=b"not Parquet")
    with caplog.at_level(logging.INFO, logger="pipeline.batch.manifests"):
        checked = check_manifest(config("s3://shapes/night/"))
    assert checked.ids == ["a", "b"] and [p["path"] for p in checked.parts] == ["shapes/night/part-0.parquet"]
    assert "skipping files not named *.parquet: .part-0.parquet.crc, README.txt, _SUCCESS" in caplog.text


def test_pandas_columns_are_read_as_the_stages_expect_and_rows_keep_their_manifest_place(tmp_path):
    empty = pa.schema([("id", pa.string()), ("image", pa.string()), ("target_prompts", pa.null())])
    assert schema_problems(empty) == ["column 'target_prompts' must be a list of strings, got null"]
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.txt").write_text("how these files were made")
    (folder / "_SUCCESS").write_bytes(b"")
    pandas_manifest(folder / "a.parquet", ["a", "dup", "c"], ["a.png", "b.png", "c.png"])
    # Large types, narrow numbers, two row groups.
    schema = pa.schema(
        [
            ("id", pa.large_string()),
            ("image", pa.large_string()),
            ("target_prompts", pa.large_list(pa.large_string())),
            ("eta", pa.list_(pa.float32())),
            ("seed", pa.int32()),
        ]
    )
    rows = [
        {"id": "dup", "image": "d.png", "target_prompts": ["a dog"], "eta": [1.0], "seed": 7},
        {"id": "e", "image": "e.png", "target_prompts": ["a fox"], "eta": [0.5], "seed": 8},
        {"id": "f", "image": "f.png", "target_prompts": ["an owl"], "eta": None, "seed": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "b.parquet", row_group_size=2)
    assert schema_problems(pq.read_schema(folder / "a.parquet")) == []  # categorical, null eta

    checked = check_manifest(manifest(folder))
    assert checked.ids == ["a", "dup", "c", "dup", "e", "f"] and checked.duplicates == {"dup"}
    assert [(p["path"].rsplit("/", 1)[-1], p["row_group"], p["first_row"]) for p in checked.parts] == [
        ("a.parquet", 0, 0),
        ("b.parquet", 0, 3),
        ("b.parquet", 1, 5),
    ]
    # Ray reads the row groups in any order, in any tasks: each row keeps its manifest place.
    parts = pa.Table.from_pylist(checked.parts[::-1])
    table = read_manifest_part(parts, location=manifest(folder).manifest_location, schema=checked.schema)
    assert table.schema.field("id").type == pa.string() and table.schema.field("eta").type == pa.list_(
        pa.float64()
    )
    by_place = sorted(table.to_pylist(), key=lambda r: r[ROW])
    assert [(r[ROW], r["id"]) for r in by_place] == list(enumerate(checked.ids))
    assert by_place[0]["source_prompt"] == "a photo" and by_place[0]["eta"] is None
    assert by_place[3]["eta"] == [1.0] and by_place[3]["seed"] == 7 and by_place[5]["eta"] is None

    good, errors = validate_rows(by_place, duplicated_ids(checked.ids))
    assert [r["id"] for r in good] == ["a", "c", "e", "f"]
    assert good[0]["target_prompts"] == ["a photo of a cat"]
    assert sorted((e["id"], e["row"], e["kind"]) for e in errors) == [
        ("dup", 1, "duplicate_id"),
        ("dup", 3, "duplicate_id"),
    ]


def results_file(output: Output, name: str, rows: list[tuple]) -> None:
    table = pa.Table.from_pylist(
        [
            {
                res.ID: i,
                res.TARGET_INDEX: t,
                res.TARGET_PROMPT: "a cat",
                res.ETA: eta,
                res.GUIDANCE: 7.5,
                res.IMAGE_URI: uri,
                res.CONFIG_FINGERPRINT: "f",
            }
            for i, t, eta, uri in rows
        ],
        schema=res.RESULTS_SCHEMA,
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (output.results / name).write_bytes(buffer.getvalue())


def test_a_results_table_with_an_edit_twice_is_read_with_its_latest_row_once(tmp_path):
    output = Output.at(str(tmp_path / "out"))
    # An older version wrote edit a/0/0.5 in two attempts; the later one (named edit-..., which
    # sorts first by name) made the image on disk.
    results_file(
        output,
        "run-20260101T000000-aaaaaa-00000.parquet",
        [("a", 0, 0.5, "old.png"), ("b", 0, 0.5, "b.png"), ("a", 0, 0.5, "older-copy.png")],
    )
    results_file(output, "edit-20260102T000000-bbbbbb-00000.parquet", [("a", 0, 0.5, "new.png")])
    table = read_results(output, [res.ID, res.IMAGE_URI])
    assert sorted(zip(table[res.ID].to_pylist(), table[res.IMAGE_URI].to_pylist())) == [
        ("a", "new.png"),
        ("b", "b.png"),
    ]
    assert report.count_edits(output) == 2
    assert len(read_committed(output, results=True).edits) == 2
    assert read_results(Output.at(str(tmp_path / "empty")), [res.ID]) is None


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_pandas_manifest_folder_runs_and_its_errors_name_their_manifest_rows(
    ray_cluster, tiny_model_dir, photos, tmp_path, capsys
):
    from jobs.common import main

    # What the operator sees of a wrong path: one line, exit status 2, no traceback.
    with pytest.raises(SystemExit) as exit_:
        main(run_all, "run", argv=["--manifest", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")])
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and not any("Traceback" in line for line in lines)
    assert lines[-1] == f"error: manifest {tmp_path / 'nowhere'}: no such file or folder"

    (tmp_path / "good.png").write_bytes(png(photos["astronaut"][::4, ::4]))
    good, missing = str(tmp_path / "good.png"), str(tmp_path / "nowhere.png")
    folder = tmp_path / "manifest"
    folder.mkdir()
    for name in ("README.txt", "_SUCCESS", ".part-0.parquet.crc"):
        (folder / name).write_text("not Parquet")
    pandas_manifest(folder / "part-0.parquet", ["cat", "dup"], [good, good])
    rows = [
        {"id": "dup", "image": good, "target_prompts": ["a dog"]},
        {"id": "missing", "image": missing, "target_prompts": ["a dog"]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-1.parquet")
    out = tmp_path / "out"
    summary = run_all(
        RunConfig(
            manifest=str(folder),
            output=str(out),
            gpus_per_actor=0,  # actors on CPUs: the tiny model needs no GPU
            tune_batch_size=4,
            max_failed_fraction=1.0,
            pti=dict(model=tiny_model_dir, **PTI),
        )
    )
    errors = pq.read_table(out / "errors").to_pylist()
    assert sorted((e["id"], e["row"], e["stage"], e["kind"]) for e in errors) == [
        ("dup", 1, "validate", "duplicate_id"),
        ("dup", 2, "validate", "duplicate_id"),
        ("missing", 3, "read", "not_found"),
    ]
    results = pq.read_table(out / "results").to_pylist()
    assert [(r["id"], r["target_prompt"], r["eta"]) for r in results] == [("cat", "a photo of a cat", 1.0)]
    assert (summary["rows_in"], summary["rows_done"], summary["rows_failed"]) == (4, 1, 3)
