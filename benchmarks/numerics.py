"""Half precision against float32 on the shipped world model: does stage 1 and an edit hold in
bfloat16 and float16?

    python -m benchmarks.numerics                                  # on a GPU: float32, bf16, fp16
    python -m benchmarks.numerics --scenes 2 --set pti.steps=6     # the CPU runs float32 only

Each held-out scene (``world.held_out_scenes``) is inverted and tuned, then given one colour edit
(``world.edit_targets``) at ``--eta``, in each dtype on one model per dtype. Per dtype: the
reconstruction's PSNR and SSIM, the share of edits that reach their colour (``world.score_edit``),
the reconstructions and edits against float32's (PSNR), and every non-finite value in what stage 1
and stage 2 return (z_T, the tuned embeddings, the reconstructions, the final losses, the edits).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import add_set_option, append_record, markdown_table, pti_settings, write_rows
from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.engine.metrics import psnr
from pipeline.engine.models import load_stable_diffusion
from pipeline.io.images import to_tensor, to_uint8
from pipeline.world import scenes as world

COLUMNS = {
    "dtype": "dtype",
    "reconstruction_psnr": "reconstruction PSNR dB",
    "reconstruction_psnr_min": "worst scene dB",
    "reconstruction_ssim": "SSIM",
    "reconstruction_vs_float32_psnr": "reconstruction against float32's, dB",
    "edit_vs_float32_psnr": "edit against float32's, dB",
    "edits_right": "colour edits right",
    "nonfinite": "non-finite values",
    "values_checked": "of values",
    "seconds": "s",
}


def in_dtype(args, dtype: str, config: PTIConfig, reference: dict | None) -> tuple[dict, dict]:
    """Stage 1 and one colour edit of each scene in ``dtype``; against ``reference`` (float32's)."""
    started = time.perf_counter()
    sd = load_stable_diffusion(args.model, args.device, dtype)
    engine = Engine(sd, config)
    scenes = world.held_out_scenes(args.scenes, engine.resolution)
    truths = [world.edit_targets(s, n)["colour"] for n, s in enumerate(scenes)]
    pixels = torch.stack([to_tensor(Image.fromarray(s.render())) for s in scenes])
    inversion = engine.invert_and_tune(pixels, [s.caption() for s in scenes])
    targets = [t.caption() for t in truths]
    edits = engine.edit(inversion, list(range(len(scenes))), targets, [args.eta] * len(scenes))
    returned = [inversion.z_T, inversion.cond, inversion.reconstruction, inversion.final_loss, edits]
    scores = [
        world.score_edit(to_uint8(e.nan_to_num()), s, t, "colour") for e, s, t in zip(edits, scenes, truths)
    ]
    row = {
        "dtype": dtype,
        "scenes": len(scenes),
        "reconstruction_psnr": float(inversion.psnr.mean()),
        "reconstruction_psnr_min": float(inversion.psnr.min()),
        "reconstruction_ssim": float(inversion.ssim.mean()),
        "edits_right": float(np.mean([s["success"] for s in scores])),
        "nonfinite": sum(int((~torch.isfinite(v.float())).sum()) for v in returned),
        "values_checked": sum(v.numel() for v in returned),
        "seconds": time.perf_counter() - started,
    }
    if reference is not None:
        row["reconstruction_vs_float32_psnr"] = float(
            psnr(inversion.reconstruction, reference["recon"]).mean()
        )
        row["edit_vs_float32_psnr"] = float(psnr(edits, reference["edits"]).mean())
    return row, {"recon": inversion.reconstruction, "edits": edits}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/shapes-sd")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--eta", type=float, default=0.8)
    add_set_option(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jsonl", help="also append each dtype's row to this file as a JSON line")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to docs/")
    args = parser.parse_args(argv)
    config = PTIConfig(model=args.model, progress=False, **pti_settings(args.set))
    rows, reference = [], None
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    for dtype in args.dtypes:
        if dtype != "float32" and not cuda:
            row = {"dtype": dtype, "skipped": "half precision needs CUDA; the CPU runs float32"}
        else:
            row, images = in_dtype(args, dtype, config, reference)
            reference = images if dtype == "float32" else reference
        write_rows(args.jsonl, [row])
        rows.append(row)
    setting = (
        f"model `{args.model}`, {args.scenes} held-out scenes, T={config.steps}, K={config.inner_steps}, "
        f"lr={config.lr}; one colour edit per scene at eta {args.eta:g}"
    )
    table = markdown_table([r for r in rows if "skipped" not in r], COLUMNS)
    print(f"\n{setting}\n\n{table}")
    if args.record:
        append_record("benchmarks.numerics", "Numerics in half precision", f"{setting}.\n\n{table}")


if __name__ == "__main__":
    main()
