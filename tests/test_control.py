"""Attention control wired into the engine and the batch job: the config picks the control, every
method edits under it, a row that cannot be aligned fails alone, and the cost is 2T(n+1)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.batch.config import RunConfig
from pipeline.batch.jobs import run_all
from pipeline.engine.config import PTIConfig
from pipeline.engine.plan import attention_edit
from pipeline.errors import InputError

SOURCE = "a photo of a cat"
STEPS = 4


def test_auto_control_aligns_words_and_blends_the_words_that_change():
    auto = PTIConfig(control="auto", local_blend=True, reweight={"red": 2.0})
    swap = attention_edit(auto, "a red cat on a hat", "a blue cat on a hat")
    assert swap.mode == "replace" and swap.blend_words == (["red"], ["blue"])
    assert swap.cross_replace_steps == 0.8 and swap.self_replace_steps == 0.4
    added = attention_edit(auto, "a cat", "a red cat wearing a hat", reweight={"hat": 3.0, "red": 1.5})
    assert added.mode == "refine" and added.blend_words == ([], ["red", "wearing", "hat"])
    assert added.reweight == {"red": 1.5, "hat": 3.0}  # the row's factors over the config's
    assert swap.reweight == {}  # "red" is not in the target "a blue cat on a hat"
    given = attention_edit(auto, "a red cat", "a blue cat", blend_words=["cat"])
    assert given.blend_words == (["cat"], ["cat"])
    assert attention_edit(PTIConfig(control="reweight"), "a cat", "a dog").mode is None
    assert attention_edit(PTIConfig(), "a cat", "a dog") is None  # the paper's plain interpolation
    assert attention_edit(PTIConfig(control="auto"), None, "a dog").mode == "refine"  # no words to count


def test_a_config_refuses_unknown_controls_and_fractions_outside_0_1():
    with pytest.raises(InputError) as error:
        PTIConfig(control="swap", cross_replace_steps=1.5, reweight={"cat": -1})
    message = str(error.value)
    assert "control 'swap'" in message and "cross_replace_steps" in message and "reweight" in message


@pytest.mark.parametrize("method", ["pti", "nti", "npi", "ddim"])
def test_a_controlled_edit_toward_the_source_prompt_is_the_reconstruction(make_engine, pixels, method):
    full = dict(control="replace", cross_replace_steps=1.0, self_replace_steps=1.0)
    engine = make_engine(method=method, steps=STEPS, inner_steps=2, lr=0.1, **full)
    inversion = engine.invert_and_tune(pixels[:1], [SOURCE])
    eta = 0.0 if method == "pti" else 0.8  # the others' edit embedding is psi(source) at any eta
    plan = engine.attention_plan(SOURCE, SOURCE)
    assert plan is not None and bool(plan.mapped.all())
    controlled = engine.edit(inversion, [0], [SOURCE], [eta], plans=[plan])
    plain = engine.edit(inversion, [0], [SOURCE], [0.0])  # eta 0: the reconstruction
    torch.testing.assert_close(controlled, plain, atol=1e-4, rtol=0)  # fused vs explicit kernels


def test_control_costs_2T_per_edit_and_source_and_changes_what_plain_editing_makes(make_engine, pixels):
    engine = make_engine(steps=STEPS, inner_steps=2, lr=0.1, control="auto")
    inversion = engine.invert_and_tune(pixels[:2], [SOURCE, SOURCE])
    rows, targets, etas = (
        [0, 0, 1],
        ["a photo of a dog", "a photo of a black cat", "a photo of a dog"],
        [0.8] * 3,
    )
    plans = [engine.attention_plan(SOURCE, t) for t in targets]
    assert [p.mapped.sum().item() > 0 for p in plans] == [True] * 3  # replace, refine, replace
    before = engine.eps.evaluations
    controlled = engine.edit(inversion, rows, targets, etas, plans=plans)
    assert engine.eps.evaluations - before == 2 * STEPS * (3 + 2)  # 3 edits and 2 source branches
    plain = engine.edit(inversion, rows, targets, etas)
    assert (controlled - plain).abs().max() > 1e-3  # control changed the edits
    alone = engine.edit(inversion.select([1]), [0], targets[2:], etas[2:], plans=plans[2:])
    torch.testing.assert_close(controlled[2:], alone, atol=1e-4, rtol=0)  # images never interact


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).resize((64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_controlled_job_fails_only_the_row_that_cannot_be_aligned(
    ray_cluster, tiny_model_dir, photos, tmp_path
):
    cat = {
        "id": "cat",
        "image": _png(photos["chelsea"]),
        "source_prompt": SOURCE,
        "target_prompts": ["a photo of a dog", "a photo of a tiger"],
        "blend_words": ["cat", "dog", "tiger"],
        "reweight": [("dog", 2.0)],
    }
    no_source = {
        "id": "no-source",
        "image": _png(photos["astronaut"]),
        "target_prompts": ["a photo of a man"],
    }
    rows = [cat, no_source]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.binary()),
            ("source_prompt", pa.string()),
            ("target_prompts", pa.list_(pa.string())),
            ("blend_words", pa.list_(pa.string())),
            ("reweight", pa.map_(pa.string(), pa.float64())),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "manifest.parquet")
    # device cpu: the test cluster's GPUs are fake (conftest), and a GPU actor refuses the CPU unasked
    pti = dict(
        model=tiny_model_dir, steps=2, inner_steps=1, etas=[0.8], progress=False, control="auto", device="cpu"
    )
    config = RunConfig(
        manifest=str(tmp_path / "manifest.parquet"),
        output=str(tmp_path / "out"),
        gpus_per_actor=1,
        max_failed_fraction=1.0,  # one of two rows fails on purpose
        pti=dict(pti, local_blend=True),
    )
    summary = run_all(config)
    assert (summary["rows_in"], summary["rows_done"], summary["rows_failed"], summary["edits"]) == (
        2,
        1,
        1,
        2,
    )
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert [(e["id"], e["stage"], e["kind"]) for e in errors] == [("no-source", "edit", "bad_control")]
    assert "'no-source'" in errors[0]["message"] and "source prompt" in errors[0]["message"]
    results = pq.read_table(tmp_path / "out" / "results")
    assert sorted(results["target_prompt"].to_pylist()) == ["a photo of a dog", "a photo of a tiger"]


def test_pti_edit_controls_its_edits_and_refuses_alignment_without_a_source(tiny_model_dir, photos, tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    image = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(image)
    quick = ["--model", tiny_model_dir, "--steps", "2", "--inner-steps", "1", "--eta", "0.8", "--quiet"]
    args = ["edit", str(image), "--target", "a photo of a dog", "--control", "auto", *quick]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2, refused.output
    assert "error: target 0 ('a photo of a dog'): refine needs the source prompt" in refused.stderr
    assert not (tmp_path / "refused").exists()  # refused before stage 1

    out = tmp_path / "out"
    controlled = ["--source", SOURCE, "--local-blend", "--reweight", "dog=2", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *controlled])
    assert result.exit_code == 0, result.output
    assert "ran on cpu in float32" in result.stdout  # a GPU run that fell to the CPU would say so
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["control"] == "auto" and summary["config"]["reweight"] == {"dog": 2.0}
    assert summary["unet_calls"] == 2 + 2 * (1 + 1 + 1) + 2  # invert, tune (K=1), one controlled edit
    bad = CliRunner().invoke(
        app, [*args, "--source", SOURCE, "--reweight", "dog", "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "--reweight 'dog' is not WORD=FACTOR" in bad.stderr
