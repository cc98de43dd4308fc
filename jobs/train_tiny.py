"""Train the small Stable Diffusion of the rendered world on the CPU and save it in diffusers
layout: ``python -m jobs.train_tiny --out models/shapes-sd``. Seeded and reproducible on the
same torch build and thread count; the shipped model's ``training.json`` records how it was made.
"""

from __future__ import annotations

import argparse
import dataclasses

from pipeline.world.training import TrainingConfig, train_world_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write the model to")
    for field in dataclasses.fields(TrainingConfig):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    print(train_world_model(out, TrainingConfig(**args)))


if __name__ == "__main__":
    main()
