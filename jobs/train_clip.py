"""Train the rendered world's CLIP, the scorer that knows what the world's SD draws, and save it as
a transformers CLIP checkpoint (safetensors) that ``scorer`` takes:

    python -m jobs.train_clip --out models/shapes-clip

Seeded: the same command on the same torch build and thread count writes the same weights. Its
``training.json`` records the recipe, the loss curve and the time it took.
"""

from __future__ import annotations

import argparse
import dataclasses

from pipeline.world.clip import ClipConfig, train_world_clip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_clip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write the CLIP to")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    for field in dataclasses.fields(ClipConfig):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), help=f"default {field.default}"
        )
    args = vars(parser.parse_args(argv))
    out, quiet = args.pop("out"), args.pop("quiet")
    config = ClipConfig(**{k: v for k, v in args.items() if v is not None})
    print(train_world_clip(out, config, progress=not quiet))


if __name__ == "__main__":
    main()
