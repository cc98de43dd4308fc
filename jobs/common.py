"""What every job shares: a config file, flags that override it, and the closing summary."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable

from pipeline.errors import PTIError, TooManyFailures
from pipeline.batch.config import SECTIONS, RunConfig
from pipeline.engine.config import PRESETS

FLAGS = {  # flag -> config key, for the settings people change most
    "--manifest": "manifest",
    "--output": "output",
    "--embeddings": "embeddings",
    "--targets": "targets",
    "--endpoint-url": "endpoint_url",
    "--model": "pti.model",
}
NIGHTLY_FLAGS = {**FLAGS, "--manifests": "nightly.manifests", "--run-id": "nightly.run_id"}  # jobs.nightly
DATASET_FLAGS = {**FLAGS, "--to": "dataset.output", "--best-of": "dataset.best_of"}  # jobs.dataset


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # every line timestamped


def fields_help() -> str:
    """Every config field with its type and default, for ``--help`` (the config object is the
    one source of both)."""
    lines = ["config fields (YAML keys, --set KEY=VALUE):"]
    for prefix, kind in (("", RunConfig), *((f"{name}.", kind) for name, kind in SECTIONS.items())):
        for f in dataclasses.fields(kind):
            if f.name in SECTIONS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name}: {f.type} = {default!r}")
    return "\n".join(lines)


def parser(
    description: str, flags: dict[str, str] = FLAGS, prog: str | None = None
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML run config (see README); flags override it")
    for flag, key in flags.items():
        p.add_argument(flag, help=f"sets {key}")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="named stage-1 settings (docs/stage-one.md): set over the config file, --set wins over them",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set pti.steps=20 --set tune_actors=4",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file, flags and --set) as YAML and exit without running",
    )
    return p


def config_from_args(args: argparse.Namespace, flags: dict[str, str] = FLAGS) -> RunConfig:
    """The config file, then ``--preset``, then ``--set``, then the flags (paths and ids: taken as
    written)."""
    texts = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key in flags.items()}
    overrides = [*preset_overrides(getattr(args, "preset", None)), *args.set]
    return RunConfig.load(args.config, overrides, {k: v for k, v in texts.items() if v is not None})


def preset_overrides(name: str | None) -> list[str]:
    """A preset as ``--set`` items (``pti.steps=25``), to go before the user's own."""
    fields = PRESETS[name] if name else {}
    return [
        f"pti.{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in fields.items()
    ]


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pti {summary['job']}: done in {summary['seconds']:.1f} s", show_header=False)
    for key, value in summary.items():
        if key not in ("job", "seconds"):
            table.add_row(key.replace("_", " "), str(value))
    Console(stderr=False).print(table)


def main(
    run: Callable[[RunConfig], dict],
    description: str,
    argv: list[str] | None = None,
    flags: dict[str, str] = FLAGS,
    prog: str | None = None,  # the command's name in --help; default: the script's
) -> dict | None:
    # force: a process's entry point owns the root logger (a caller's stale handlers go).
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    args = parser(description, flags, prog).parse_args(argv)
    try:
        config = config_from_args(args, flags)
        if args.print_config:  # check a config before submitting it: nothing starts
            print(config.to_yaml(), end="")
            return None
        summary = run(config)
    except PTIError as error:
        if isinstance(error, TooManyFailures):  # the job ran to the end: show what it did
            print_summary(error.summary)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print_summary(summary)
    return summary
