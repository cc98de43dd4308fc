"""Manifests: bad columns are rejected up front with every problem; bad rows each get a reason."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import ERRORS_SCHEMA
from schemas.manifest import MANIFEST_SCHEMA, schema_problems, validate_rows


def test_a_well_formed_manifest_has_no_schema_problems(tmp_path):
    table = pa.Table.from_pylist(
        [
            {
                "id": "a",
                "image": "s3://b/a.png",
                "source_prompt": None,
                "target_prompts": ["a cat"],
                "eta": [0.6],
                "guidance": 7.5,
                "seed": 1,
            }
        ],
        schema=MANIFEST_SCHEMA,
    )
    pq.write_table(table, tmp_path / "m.parquet")
    assert schema_problems(pq.read_schema(tmp_path / "m.parquet")) == []
    binary = pa.schema([("id", pa.string()), ("image", pa.binary()), ("target_prompt", pa.string())])
    assert schema_problems(binary) == []


def test_every_column_problem_is_listed_at_once():
    schema = pa.schema([("id", pa.int64()), ("target_prompts", pa.string()), ("eta", pa.float64())])
    problems = schema_problems(schema)
    assert "missing column 'image'" in problems
    assert "column 'id' must be a string, got int64" in problems
    assert "column 'target_prompts' must be a list of strings, got string" in problems
    assert "column 'eta' must be a list of numbers, got double" in problems
    assert len(problems) == 4
    assert any(
        "target_prompts" in p
        for p in schema_problems(pa.schema([("id", pa.string()), ("image", pa.string())]))
    )


def test_each_bad_row_becomes_an_error_with_its_reason_and_good_rows_pass():
    rows = [
        {"id": "ok", "image": "a.png", "target_prompts": ["a cat"]},
        {"id": "", "image": "b.png", "target_prompts": ["a cat"]},
        {"id": "dup", "image": "c.png", "target_prompts": ["a cat"]},
        {"id": "dup", "image": "d.png", "target_prompts": ["a dog"]},
        {"id": "none", "image": "e.png", "target_prompts": []},
        {"id": "blank", "image": "f.png", "target_prompts": ["a cat", "  "]},
        {"id": "eta", "image": "g.png", "target_prompts": ["a cat"], "eta": [0.5, 1.5, float("nan")]},
        {"id": "noimage", "image": None, "target_prompts": ["a cat"]},
        {"id": "single", "image": "h.png", "target_prompt": "a tiger"},
        {"id": "told", "image": "i.png", "target_prompts": ["a cat", "a b"], "instructions": ["cat", None]},
        {"id": "short", "image": "j.png", "target_prompts": ["a cat", "a dog"], "instructions": ["cat it"]},
        {"id": "blank_instruction", "image": "k.png", "target_prompts": ["a cat"], "instructions": [" "]},
    ]
    good, errors = validate_rows(rows)
    assert [r["id"] for r in good] == ["ok", "single", "told"]
    assert good[1]["target_prompts"] == ["a tiger"]
    by_row = {e["row"]: e for e in errors}
    assert sorted(by_row) == [1, 2, 3, 4, 5, 6, 7, 10, 11]
    assert len(good) + len(errors) == len(rows)  # every row accounted for
    assert by_row[1]["kind"] == "bad_id"
    assert by_row[2]["kind"] == by_row[3]["kind"] == "duplicate_id" and "'dup'" in by_row[2]["message"]
    assert by_row[4]["kind"] == "no_targets"
    assert by_row[5]["kind"] == "empty_target"
    assert by_row[6]["kind"] == "bad_eta" and "1.5" in by_row[6]["message"] and "nan" in by_row[6]["message"]
    assert by_row[7]["kind"] == "bad_image"
    assert by_row[10]["kind"] == "bad_instructions" and "prompt (2), got 1" in by_row[10]["message"]
    assert by_row[11]["kind"] == "bad_instructions" and "an instruction is empty" in by_row[11]["message"]
    pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)  # the errors fit their schema


def test_a_row_without_etas_gets_the_configs_once_when_it_is_checked():
    rows = [
        {"id": "own", "image": "a.png", "target_prompts": ["a cat"], "eta": [0.3]},
        {"id": "none", "image": "b.png", "target_prompts": ["a cat"], "eta": None},
        {"id": "empty", "image": "c.png", "target_prompt": "a cat", "eta": []},
        {"id": "absent", "image": "d.png", "target_prompts": ["a cat"]},
    ]
    good, errors = validate_rows(rows, etas=(0.6, 0.8))
    assert not errors and {r["id"]: r["eta"] for r in good} == {
        "own": [0.3],
        "none": [0.6, 0.8],
        "empty": [0.6, 0.8],
        "absent": [0.6, 0.8],
    }
    assert good[2]["target_prompts"] == ["a cat"]
    assert rows[1]["eta"] is None  # the caller's rows are not changed


def test_the_example_run_config_loads_and_lists_every_field():
    import dataclasses
    from pathlib import Path

    import yaml

    from pipeline.batch.config import RunConfig

    path = Path(__file__).resolve().parents[1] / "deploy" / "run.example.yaml"
    listed = set(yaml.safe_load(path.read_text()))
    assert listed == {f.name for f in dataclasses.fields(RunConfig)}
    assert RunConfig.load(path).allowed_image_prefixes is None
