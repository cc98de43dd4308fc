"""One bad row never ends a job (issue 30): each value a row may override is checked by the rule
that checks it in a config; whatever one row raises in a stage is that row's error; the property
tests draw rows over every column's domain instead of listing cases.

Hypothesis runs ``PTI_HYPOTHESIS_EXAMPLES`` examples per property (default 200) and
``PTI_HYPOTHESIS_JOBS`` drawn jobs (default 1, a Ray job each): raise them to search longer, e.g.
``PTI_HYPOTHESIS_EXAMPLES=20000 PTI_HYPOTHESIS_JOBS=10 .venv/bin/python -m pytest
tests/test_one_bad_row.py``.
"""

from __future__ import annotations

import io
import math
import re
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.batch.config import RunConfig
from pipeline.batch.output import image_key
from pipeline.batch.resume import edit_key
from pipeline.engine.config import PTIConfig
from pipeline.errors import InputError
from schemas import manifest as man
from schemas.errors import KINDS

EXAMPLES = int(os.environ.get("PTI_HYPOTHESIS_EXAMPLES", 200))
JOBS = int(os.environ.get("PTI_HYPOTHESIS_JOBS", 1))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
# device cpu: the test cluster's GPUs are fake (conftest), and a GPU actor refuses the CPU unasked
PTI = dict(steps=2, inner_steps=1, lr=0.1, etas=[1.0], progress=False, device="cpu")

# --- each column's domain, as Arrow hands a manifest's rows to the validator -------------------

floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, 7.5, -5.0, 1e-300, 1e30, 1.2e-05, 1.4e-05, 0.3000001]
)
# Any code point, lone surrogates and NUL included; sometimes 10,000 characters of one.
text = st.text(st.characters(exclude_categories=())) | st.builds(
    lambda c, n: c * n, st.characters(exclude_categories=()), st.integers(0, 10_000)
)
schemes = st.sampled_from(["", "s3", "s3a", "gs", "az", "http", "https", "file", "memory", "ftp", "hf"])
uris = (
    st.builds(lambda s, rest: f"{s}://{rest}" if s else rest, schemes, text)
    | st.sampled_from(
        [
            "http://[::1/x.png",
            "s3://[bucket/x.png",
            "/images/a\x00.png",
            "http://host:99999/x.png",
            "http://host:port/x.png",
            "s3://",
            "file://",
            "http://",
            "../../etc/passwd",
            "\udcff.png",
        ]
    )
    | text
)
words = st.lists(st.none() | text, max_size=4)


ROW_OK = {man.ID: "ok", man.IMAGE: "a.png", man.TARGET_PROMPTS: ["a cat"]}


def nullable(strategy):
    return st.none() | strategy


ROW = st.fixed_dictionaries(
    {
        man.ID: nullable(text | st.sampled_from(["dup", "a", " "])),
        man.IMAGE: nullable(uris | st.binary(max_size=64)),
        man.SOURCE_PROMPT: nullable(text),
        man.TARGET_PROMPTS: nullable(words),
        man.ETA: nullable(st.lists(st.none() | floats, max_size=4)),
        man.GUIDANCE: nullable(floats),
        man.SEED: nullable(st.integers(-(2**63), 2**63 - 1)),
        man.BLEND_WORDS: nullable(words),
        man.REWEIGHT: nullable(st.lists(st.tuples(text, st.none() | floats), max_size=3)),  # a map, read back
        man.INSTRUCTIONS: nullable(words),
    },
    optional={man.TARGET_PROMPT: nullable(text)},
)


@PROPERTY
@given(st.lists(ROW, max_size=8))
def test_the_validator_classifies_every_drawn_row_and_a_good_row_makes_a_valid_config(rows):
    good, errors = man.validate_rows(rows)  # never raises
    assert len(good) + len(errors) == len(rows)
    places = [e["row"] for e in errors]
    assert len(set(places)) == len(places) and set(places) <= set(range(len(rows)))
    for e in errors:
        assert e["kind"] in KINDS and e["message"] and e["stage"] == "validate", e
    for row in good:  # a good row's overrides are a config that runs
        etas = row[man.ETA] or [1.0]
        PTIConfig(
            guidance=7.5 if row[man.GUIDANCE] is None else row[man.GUIDANCE],
            etas=etas,
            reweight=dict(row[man.REWEIGHT] or []),
        )
        assert row[man.TARGET_PROMPTS] and all(t.strip() for t in row[man.TARGET_PROMPTS])
        instructions = row[man.INSTRUCTIONS] or [None] * len(row[man.TARGET_PROMPTS])  # one per target
        assert len(instructions) == len(row[man.TARGET_PROMPTS])
        assert all(i is None or i.strip() for i in instructions)
        assert len({edit_key("x", 0, "t", e) for e in etas}) == len(etas)  # each eta one edit


@settings(PROPERTY, max_examples=max(1, EXAMPLES // 4))
@given(st.lists(ROW, max_size=6))
def test_the_read_stage_classifies_every_drawn_row_and_reads_only_allowed_ones(rows):
    from pipeline.batch.manifests import prepare_rows

    arrow = [  # as a manifest holds them: text without lone surrogates, the image a URI
        {**r, man.IMAGE: r[man.IMAGE] if isinstance(r[man.IMAGE], str) else None}
        for r in rows
        if not any(_surrogate(v) for v in r.values())
    ]
    schema = man.read_schema(pa.schema([f for f in man.MANIFEST_SCHEMA if f.name != man.TARGET_PROMPT]))
    table = pa.Table.from_pylist(arrow, schema=schema)
    table = table.append_column("row", pa.array(range(len(arrow)), pa.int64()))
    read = dict(duplicates=man.duplicated_ids(r[man.ID] for r in arrow), endpoint_url=None, max_bytes=2**20)
    read["etas"] = PTI["etas"]
    out = prepare_rows(table, resolution=64, allowed=("/nonexistent-images/",), max_pixels=10**6, **read)
    assert sorted(out["row"].to_pylist()) == list(range(len(arrow)))  # every row, once
    assert all(k in KINDS for k in out["kind"].to_pylist())  # each an error of a named kind
    assert out["pixels"].null_count == len(arrow)  # no image here: none was read


def _surrogate(value) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, (list, tuple)):
        return any(_surrogate(v) for v in value)
    return False


@PROPERTY
@given(floats | st.integers(-(2**70), 2**70) | st.none())  # what a number column or a config holds
def test_guidance_and_eta_have_one_rule_for_a_config_and_a_row(value):
    for field, column, kind, wrap in (
        ("guidance", man.GUIDANCE, "bad_guidance", lambda v: v),
        ("etas", man.ETA, "bad_eta", lambda v: [v]),
    ):
        try:
            PTIConfig(**{field: wrap(value)})
            config_refuses = None
        except (InputError, TypeError, ValueError) as exc:  # TypeError, ValueError: not numbers at all
            config_refuses = str(exc)
        row = {**ROW_OK, column: wrap(value)}
        _, errors = man.validate_rows([row])
        row_refuses = [e["message"] for e in errors if e["kind"] == kind]
        if value is not None or column == man.ETA:
            assert bool(config_refuses) == bool(row_refuses), (field, value, config_refuses, row_refuses)
        if row_refuses and isinstance(value, float):  # the row's error names the value and the range
            assert repr(value) in row_refuses[0] and ("[0, 1]" in row_refuses[0] or ">= 0" in row_refuses[0])


@PROPERTY
@given(st.dictionaries(text, floats, max_size=3))
def test_reweight_has_one_rule_for_a_config_and_a_row(factors):
    try:
        PTIConfig(reweight=factors)
        config_refuses = False
    except InputError:
        config_refuses = True
    row = {**ROW_OK, man.REWEIGHT: list(factors.items())}
    _, errors = man.validate_rows([row])
    assert config_refuses == any(e["kind"] == "bad_reweight" for e in errors)


@PROPERTY
@given(st.floats(0, 1), st.floats(0, 1))
def test_two_etas_are_one_edit_exactly_when_they_write_one_image(a, b):
    same_image = image_key("x", 0, a) == image_key("x", 0, b)
    assert same_image == (edit_key("x", 0, "t", a) == edit_key("x", 0, "t", b))
    assert same_image == bool(man.same_etas([a, b]))
    stored = float(np.float32(a))  # the results table's float32 matches the eta it came from
    assert edit_key("x", 0, "t", stored) == edit_key("x", 0, "t", a)


def test_the_etas_a_rounded_key_merged_are_two_edits():
    # 1.2e-05 and 1.4e-05 were one key at 5 decimals, so a re-run skipped the second silently.
    assert edit_key("a", 0, "t", 1.2e-05) != edit_key("a", 0, "t", 1.4e-05)
    assert image_key("a", 0, 1.2e-05) == "images/a/0-1.2e-05.png"


@pytest.mark.parametrize(
    "image, fragment",
    [
        ("/images/a\x00.png", "NUL byte"),
        ("http://[::1/x.png", "Invalid IPv6 URL"),
        ("s3://[bucket/x.png", "Invalid IPv6 URL"),
        ("http://host:99999/x.png", "out of range"),
    ],
)
def test_an_image_uri_that_does_not_parse_is_a_bad_uri_row(image, fragment):
    good, errors = man.validate_rows(
        [{man.ID: "bad", man.IMAGE: image, man.TARGET_PROMPTS: ["a cat"]}, {**ROW_OK, man.ID: "ok"}]
    )
    assert [g[man.ID] for g in good] == ["ok"]
    assert [(e["id"], e["kind"]) for e in errors] == [("bad", "bad_uri")] and fragment in errors[0]["message"]


# --- the stages' safety net -------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).resize((80, 80)).save(buffer, format="PNG")
    return buffer.getvalue()


PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture
def prepared(photos):
    from pipeline.batch.manifests import prepare_rows

    table = pa.table(
        {
            "id": list(PHOTOS),
            "image": [_png(photos[p]) for p in PHOTOS],
            "source_prompt": ["a photo", "poison", "a photo"],
            "target_prompts": [["a cat", "poison"]] * 3,
        }
    )
    read = dict(resolution=64, duplicates=set(), endpoint_url=None, allowed=(), max_bytes=2**24)
    read |= {"max_pixels": 10**7, "etas": PTI["etas"]}
    return prepare_rows(table, **read), read, table


def test_a_row_that_breaks_the_read_stage_fails_alone(ray_cluster, prepared, monkeypatch):
    from pipeline.batch import manifests

    _, read, table = prepared
    real = manifests.read_image

    def read_image(image, *args, name, **kwargs):
        if name.startswith("chelsea"):
            raise KeyError("a bug that only this image finds")
        return real(image, *args, name=name, **kwargs)

    monkeypatch.setattr(manifests, "read_image", read_image)
    out = manifests.prepare_rows(table, **read).to_pylist()
    assert {r["id"]: r["kind"] for r in out} == {"astronaut": None, "coffee": None, "chelsea": "internal"}
    (failed,) = [r for r in out if r["kind"]]
    assert failed["stage"] == "read" and failed["row"] is None and "KeyError" in failed["message"]


def test_a_row_that_breaks_tuning_fails_alone_and_its_batch_is_tuned(ray_cluster, tiny_model_dir, prepared):
    from pipeline.batch.stages import TuneStage
    from pipeline.io.storage import Location

    rows, _, _ = prepared
    stage = TuneStage(PTIConfig(model=tiny_model_dir, **PTI), Location(tiny_model_dir))
    real, calls = stage.engine.invert_and_tune, []

    def invert_and_tune(pixels, sources):
        calls.append(len(pixels))
        if "poison" in sources:
            raise RuntimeError("a kernel that fails on this row's text")
        return real(pixels, sources)

    stage.engine.invert_and_tune = invert_and_tune
    out = stage(rows)
    assert calls == [3, 1, 1, 1]  # the batch, then each row alone
    kinds = dict(zip(out["id"].to_pylist(), out["kind"].to_pylist()))
    assert kinds == {"astronaut": None, "coffee": None, "chelsea": "internal"}
    message = out.filter(pa.compute.equal(out["id"], "chelsea"))["message"][0].as_py()
    assert message == "RuntimeError: a kernel that fails on this row's text"


def test_a_row_is_tuned_at_its_own_guidance_and_its_seed_shapes_nothing(
    ray_cluster, tiny_model_dir, prepared
):
    """A row's guidance is a second engine on the same model; its seed is none (issue 29)."""
    from pipeline.batch.stages import TuneStage
    from pipeline.io.storage import Location

    rows, _, _ = prepared
    rows = rows.set_column(rows.schema.get_field_index("guidance"), "guidance", pa.array([None, 3.0, None]))
    seeded = rows.set_column(rows.schema.get_field_index("seed"), "seed", pa.array([5, 6, None], pa.int64()))
    stage = TuneStage(PTIConfig(model=tiny_model_dir, **PTI), Location(tiny_model_dir))
    plain, with_seeds = (stage(t).sort_by("id") for t in (rows, seeded))
    assert sorted(stage.engines) == [3.0, 7.5] and stage.engines[7.5] is stage.engine
    assert dict(zip(with_seeds["id"].to_pylist(), with_seeds["guidance"].to_pylist())) == {
        "astronaut": 7.5,
        "chelsea": 3.0,
        "coffee": 7.5,
    }
    for column in ("z_T", "prompt_embeddings", "config_fingerprint", "config"):
        assert with_seeds[column].equals(plain[column]), column


def test_an_edit_that_breaks_fails_alone_and_the_rows_other_edits_are_made(
    ray_cluster, tiny_model_dir, prepared
):
    from pipeline.batch.stages import EditStage, TuneStage
    from pipeline.io.storage import Location

    rows, _, _ = prepared
    config = PTIConfig(model=tiny_model_dir, **PTI)
    tuned = TuneStage(config, Location(tiny_model_dir))(rows)
    stage = EditStage(config, Location(tiny_model_dir))
    real = stage.engine.edit

    def edit(inversion, images, targets, etas, **kwargs):
        if "poison" in targets:
            raise ValueError("a target this model cannot take")
        return real(inversion, images, targets, etas, **kwargs)

    stage.engine.edit = edit
    out = stage(tuned).to_pylist()
    made = sorted((r["id"], r["target_prompt"]) for r in out if r["kind"] is None)
    assert made == [(p, "a cat") for p in sorted(PHOTOS)]
    failed = sorted((r["id"], r["kind"], r["message"]) for r in out if r["kind"] is not None)
    message = "target 1 at eta 1: ValueError: a target this model cannot take"
    assert failed == [(p, "internal", message) for p in sorted(PHOTOS)]


# --- jobs --------------------------------------------------------------------------------------


TABLES = ("errors", "results")


def _job(tmp_path: Path, rows: list[dict], model: str, out: Path, **pti) -> dict:
    from pipeline.batch.jobs import run_all

    manifest = tmp_path / f"manifest-{len(list(tmp_path.glob('manifest-*')))}.parquet"
    schema = pa.schema([f.with_nullable(True) for f in man.MANIFEST_SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), manifest)
    config = RunConfig(
        manifest=str(manifest),
        output=str(out),
        gpus_per_actor=1,
        tune_batch_size=8,
        max_failed_fraction=1.0,
        pti=dict(model=model, **PTI, **pti),
    )
    return run_all(config)


# Not shrunk: each try is a Ray job; a failure reports the manifest as drawn.
@settings(max_examples=JOBS, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
@given(st.data())
def test_a_job_on_a_drawn_manifest_accounts_for_every_row_once(
    ray_cluster, tiny_model_dir, photos, tmp_path_factory, data
):
    tmp_path = tmp_path_factory.mktemp("drawn")
    good_image = tmp_path / "good.png"
    good_image.write_bytes(_png(photos["chelsea"]))
    arrow_text = st.text(max_size=40) | st.just("x" * 10_000)  # Arrow holds no lone surrogate
    broken = st.sampled_from(["http://[::1/x.png", "s3://[bucket/x.png", "/a\x00.png", str(tmp_path / "no")])
    targets = nullable(st.lists(nullable(arrow_text), max_size=2))
    hostile = {  # column -> (a usable value, any value of its domain)
        man.ID: (st.uuids().map(str), nullable(arrow_text | st.sampled_from(["dup", "a"]))),
        man.IMAGE: (st.just(str(good_image)), broken | st.builds("{}://{}".format, schemes, arrow_text)),
        man.SOURCE_PROMPT: (st.sampled_from(["a photo of a cat", None]), nullable(arrow_text)),
        man.TARGET_PROMPTS: (st.just(["a photo of a dog"]), targets),
        man.ETA: (nullable(st.lists(st.floats(0, 1), min_size=1, max_size=2)), st.lists(nullable(floats))),
        man.GUIDANCE: (nullable(st.floats(0, 10)), floats),
        man.BLEND_WORDS: (st.none(), st.lists(nullable(arrow_text), max_size=2)),
        man.REWEIGHT: (st.none(), st.lists(st.tuples(arrow_text, nullable(floats)), max_size=2)),
        man.INSTRUCTIONS: (st.none(), st.lists(nullable(arrow_text), max_size=2)),
    }

    # Every third row usable; each other row takes its column i % 9 (and any drawn others) from
    # the column's whole domain, so even Hypothesis's simplest draw mixes good rows and bad ones.
    columns = list(hostile)
    draws = st.tuples(*(st.fixed_dictionaries({c: h[k] for c, h in hostile.items()}) for k in (0, 1)))
    drawn = data.draw(st.lists(st.tuples(draws, st.sets(st.sampled_from(columns))), min_size=16, max_size=32))
    rows = []
    for i, ((usable, any_value), others) in enumerate(drawn):
        hostile_columns = set() if i % 3 == 0 else {columns[i % len(columns)], *others}
        rows.append({c: (any_value if c in hostile_columns else usable)[c] for c in columns})
    summary = _job(tmp_path, rows, tiny_model_dir, tmp_path / "out")  # exit 0: no exception

    out = tmp_path / "out"
    errors, results = (pq.read_table(out / t).to_pylist() if (out / t).exists() else [] for t in TABLES)
    failed_early = [e["row"] for e in errors if e["stage"] not in ("edit", "write")]
    assert len(failed_early) == len(set(failed_early))  # no row fails twice
    done = {r["id"] for r in results}
    places = {e["row"] for e in errors} | {n for n, r in enumerate(rows) if r[man.ID] in done}
    assert places == set(range(len(rows)))  # every row is accounted for
    assert not done & {rows[n][man.ID] for n in failed_early}  # and once
    assert summary["rows_in"] == len(rows) and all(e["kind"] in KINDS for e in errors)
    passed, _ = man.validate_rows(rows)
    assert done <= {r[man.ID] for r in passed}  # only rows the validator passed were edited
    assert all(math.isfinite(r["eta"]) for r in results)


def test_the_readme_lists_every_kind_and_the_code_makes_only_those():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("**Bad input**") : readme.index("**Failures.**")]
    assert [k for k in KINDS if f"`{k}`" not in section] == []
    code = "".join((root / f).read_text() for f in ("schemas/manifest.py", "pipeline/batch/stages.py"))
    made = set(re.findall(r'\(\s*"([a-z_]+)",\s*(?:f?"|p\)|uri_problem)', code))  # ("kind", message) pairs
    made |= set(re.findall(r'error_row\([^,]+, "[a-z]+", "([a-z_]+)"', code))
    assert made and made <= set(KINDS), made - set(KINDS)


def test_a_bad_row_of_a_targets_table_is_its_error_and_the_others_are_edited(tmp_path):
    from pipeline.batch.jobs import targets_by_id

    rows = [
        {"id": "a", "target_prompts": ["a dog"], "eta": None},
        {"id": "b", "target_prompts": [""], "eta": None},
        {"id": "c", "target_prompts": ["a cat"], "eta": [1.5]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "targets.parquet")
    config = RunConfig(targets=str(tmp_path / "targets.parquet"), output=str(tmp_path / "out"))
    targets, refused = targets_by_id(config)  # jobs.edit's: it used to refuse the whole table
    assert list(targets) == ["a"] and targets["a"][man.TARGET_PROMPTS] == ["a dog"]
    refused = [(e["id"], e["row"], e["kind"]) for e in refused]
    assert refused == [("b", 1, "empty_target"), ("c", 2, "bad_eta")]
