"""The typed run config: every value checked by its field's type and bounds, every mistake one
``error:`` line (exit 2), and ``--help`` of every job listing its fields."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from jobs import common
from jobs.cli import app
from pipeline.batch.config import SECTIONS, RunConfig
from pipeline.errors import InputError


def config_from_argv(argv: list[str], flags=common.NIGHTLY_FLAGS) -> RunConfig:
    return common.config_from_args(common.parser("test", flags).parse_args(argv), flags)


@pytest.mark.parametrize(
    "argv",
    [
        ["--run-id", "2026-11-25"],  # the README's resume command: a date stays text
        ["--set", "nightly.run_id=2026-11-25"],
    ],
)
def test_a_date_run_id_is_the_text_given(argv):
    assert config_from_argv(argv).nightly.run_id == "2026-11-25"


def test_a_date_in_a_config_file_is_text_and_flags_override_set_which_overrides_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("nightly:\n  run_id: 2026-11-25\npti:\n  steps: 7\n  etas: [0.5]\ntune_actors: 2\n")
    config = config_from_argv(["--config", str(path), "--set", "pti.steps=9", "--set", "pti.model=a"])
    assert (config.nightly.run_id, config.pti.steps, config.pti.etas, config.tune_actors) == (
        "2026-11-25",
        9,
        (0.5,),
        2,
    )
    assert config_from_argv(["--set", "pti.model=a", "--model", "[b]"]).pti.model == "[b]"  # flags: text
    assert config_from_argv(["--set", 'pti.device="cpu"']).pti.device == "cpu"  # quoted: YAML text


@pytest.mark.parametrize(
    "override, message",
    [
        ("pti.steps=abc", "pti.steps = 'abc': Input should be a valid integer"),
        ("tune_actors=2.5", "tune_actors = '2.5': Input should be a valid integer"),
        ("tune_actors=0", "tune_actors must be at least 1, got 0"),
        ("max_failed_fraction=1.5", r"max_failed_fraction must be in \[0, 1\], got 1.5"),
        ("pti.early_stop=maybe", "pti.early_stop = 'maybe': Input should be a valid boolean"),
        ("pti.etas=[0.5, 2]", r"pti: eta must be in \[0, 1\], got 2.0"),
        ("pti.etas=0.5", "pti.etas = '0.5': Input should be a valid tuple"),
        ("pti.reweight={hat: x}", "pti.reweight.hat = 'x': Input should be a valid number"),
        ("pti.method=foo", "pti: method 'foo' is not one of pti, ddim, nti, npi"),
        ("pti.stepz=3", "unknown field pti.stepz"),
        ("tune_actor=3", "unknown field tune_actor"),
        ("nightly.run_id=../x", "nightly: run_id '../x' must be letters, digits"),
        ("pti.etas=[0.5", "override value '\\[0.5' is not valid YAML"),
        ("steps", "override 'steps' is not KEY=VALUE"),
        ("pti.device=gpu", "pti: device must be auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
        ("pti.lr=0", "pti: lr must be > 0, got 0.0"),
        ("pti.guidance=-1", "pti: guidance must be a finite number >= 0, got -1.0"),
        ("results_flush_seconds=0", "results_flush_seconds must be > 0, got 0.0"),
        ("max_image_bytes=0", "max_image_bytes must be at least 1, got 0"),
    ],
)
def test_each_bad_value_is_one_error_naming_field_value_and_what_is_allowed(override, message):
    with pytest.raises(InputError, match=message) as raised:
        config_from_argv(["--set", override])
    assert "\n" not in str(raised.value)


def test_several_mistakes_are_named_together():
    with pytest.raises(InputError) as raised:
        config_from_argv(["--set", "pti.steps=x", "--set", "edit_actors=y", "--set", "nope=1"])
    assert str(raised.value).count(";") == 2
    assert all(name in str(raised.value) for name in ("pti.steps", "edit_actors", "unknown field nope"))


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "config file .*: No such file or directory"),
        ("pti: [1, 2\n", "config file .* is not valid YAML"),
        ("- 1\n- 2\n", "config file .* must be a mapping of field: value, got list"),
        ("pti:\n  steps: 2.5\n", "pti.steps = 2.5: Input should be a valid integer"),
    ],
)
def test_a_bad_or_missing_config_file_is_one_error(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError, match=message):
        RunConfig.load(path)


def test_the_command_line_turns_a_bad_value_into_one_error_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        common.main(lambda config: {}, "test", ["--set", "pti.steps=abc", "--print-config"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.splitlines() == [
        "error: invalid run config: pti.steps = 'abc': Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


@pytest.mark.parametrize("command", ["run", "tune", "edit-batch", "nightly"])
def test_help_of_every_job_command_lists_its_options_and_every_config_field(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"usage: pti {command}" in result.output
    assert all(flag in result.output for flag in ("--config", "--manifest", "--set", "--print-config"))
    assert ("--run-id" in result.output) == (command == "nightly")
    for prefix, kind in (("", RunConfig), *((f"{name}.", kind) for name, kind in SECTIONS.items())):
        for field in dataclasses.fields(kind):
            if field.name not in SECTIONS:
                assert f"  {prefix}{field.name}: {field.type} = " in result.output
