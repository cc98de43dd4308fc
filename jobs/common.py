"""What every job shares: a config file, flags that override it, and the closing summary."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from pipeline.errors import PTIError, TooManyFailures
from pipeline.batch.config import RunConfig

FLAGS = {  # flag -> config key, for the settings people change most
    "--manifest": "manifest",
    "--output": "output",
    "--embeddings": "embeddings",
    "--targets": "targets",
    "--endpoint-url": "endpoint_url",
    "--model": "pti.model",
}
NIGHTLY_FLAGS = {**FLAGS, "--manifests": "nightly.manifests", "--run-id": "nightly.run_id"}  # jobs.nightly


def parser(description: str, flags: dict[str, str] = FLAGS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML run config (see README); flags override it")
    for flag, key in flags.items():
        p.add_argument(flag, help=f"sets {key}")
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
    overrides = list(args.set)
    for flag, key in flags.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    return RunConfig.load(args.config, overrides)


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
) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser(description, flags).parse_args(argv)
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
