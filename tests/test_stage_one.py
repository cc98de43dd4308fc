"""Stage 1's presets: a preset sets its fields and what the user sets wins; ``fast`` costs at most
half the default's UNet evaluations (the study that chose it: docs/stage-one.md)."""

from __future__ import annotations

from typer.testing import CliRunner

from jobs import common
from jobs.cli import app
from pipeline.engine.config import PRESETS, STAGE_ONE_FIELDS, PTIConfig


def config_from_argv(argv: list[str]):
    return common.config_from_args(common.parser("test").parse_args(argv))


def test_a_preset_sets_its_fields_and_set_wins_over_it():
    fast = PRESETS["fast"]
    config = config_from_argv(["--preset", "fast"])
    assert {k: getattr(config.pti, k) for k in fast} == fast
    assert config_from_argv(["--preset", "quality"]).pti == config_from_argv([]).pti
    overridden = config_from_argv(["--preset", "fast", "--set", "pti.steps=33"])
    assert overridden.pti.steps == 33
    assert {k: getattr(overridden.pti, k) for k in fast if k != "steps"} == {
        k: v for k, v in fast.items() if k != "steps"
    }


def test_a_preset_names_stage_one_fields_only():
    assert all(set(fields) <= set(STAGE_ONE_FIELDS) - {"guidance"} for fields in PRESETS.values())
    assert PRESETS["quality"] == {}


def test_the_fast_preset_costs_at_most_half_the_defaults_evaluations():
    default, fast = PTIConfig(), PTIConfig(**PRESETS["fast"])
    bound = lambda c: c.steps + c.steps * (1 + c.inner_steps + 1)  # noqa: E731 (ALGORITHM.md's formula)
    assert bound(fast) <= bound(default) / 2
    assert fast.unet_evaluations()["stage_one"] == bound(fast)
    assert PTIConfig(method="npi").unet_evaluations()["stage_one"] == 50 + 50 * 2  # npi does not tune


def test_pti_edit_takes_a_preset_and_explicit_options_win(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("pipeline.editing.edit_one_image", lambda config, *a: seen.append(config) or 1 / 0)
    runner = CliRunner()
    base = ["edit", "x.png", "-t", "a", "-o", str(tmp_path)]
    runner.invoke(app, [*base, "--preset", "fast"])
    runner.invoke(app, [*base, "--preset", "fast", "--steps", "7"])
    assert {k: getattr(seen[0], k) for k in PRESETS["fast"]} == PRESETS["fast"]
    assert seen[1].steps == 7
    assert runner.invoke(app, [*base, "--preset", "nope"]).exit_code == 2
