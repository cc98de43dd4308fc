"""``make demo``: edit a photograph from scikit-image with the tiny offline model.

Runs ``pti edit`` on embedded defaults (local files, no network) and prints where the outputs are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from skimage import data

from pipeline.cli import app

TARGETS = ("a photo of a cat wearing a hat", "a watercolor painting of a cat")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=".cache/tiny-model")
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args(argv)
    photo = Path(args.out) / "chelsea.png"
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.chelsea()).save(photo)
    command = ["edit", str(photo), "--source", "a photo of a cat", "--model", args.model, "--out", args.out]
    for target in TARGETS:
        command += ["--target", target]
    app(command, prog_name="pti", standalone_mode=False)


if __name__ == "__main__":
    main()
