"""Train a small Stable Diffusion of the rendered world and save it in diffusers layout:

    python -m jobs.train_tiny --recipe sharp-sd --out models/sharp-sd

Seeded and resumable: the state is checkpointed to ``--checkpoints`` (``<out>.checkpoints`` by
default) and the same command run again goes on from the last checkpoint, ending with the weights
an unbroken run ends with (same torch build and thread count). ``--max-seconds`` stops after the
first checkpoint past that time (exit status 3: run again to go on). On a GPU:
``--device cuda --dtype bfloat16``. A model's ``training.json`` records its recipe and curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pipeline.world.training import RECIPES, Stopped, TrainingConfig, train_world_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_tiny",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write the model to")
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default="shapes-sd", help="the settings to start from"
    )
    parser.add_argument("--checkpoints", help="folder of the resumable state (default: <out>.checkpoints)")
    parser.add_argument("--max-seconds", type=float, help="stop after the first checkpoint past this time")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for field in dataclasses.fields(TrainingConfig):
        default = field.default
        kind = {"nargs": "+", "type": int} if isinstance(default, tuple) else {"type": _parser_of(default)}
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", help=f"(recipe's; shapes-sd: {default})", **kind
        )
    args = vars(parser.parse_args(argv))
    out, recipe, checkpoints = args.pop("out"), args.pop("recipe"), args.pop("checkpoints")
    max_seconds, quiet = args.pop("max_seconds"), args.pop("quiet")
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None}
    config = RECIPES[recipe].replace(**changes)
    try:
        print(train_world_model(out, config, not quiet, checkpoints, max_seconds))
    except Stopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(3)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def _parser_of(default):
    if isinstance(default, bool):
        return lambda text: {"true": True, "false": False}[text.lower()]
    return type(default)


if __name__ == "__main__":
    main()
