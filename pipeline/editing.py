"""Editing one image end to end: what ``pti edit`` does, as a function."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from pipeline.engine.config import PTIConfig
from pipeline.engine.engine import Engine
from pipeline.errors import InputError, NonFiniteError
from pipeline.io.fetch import read_bytes
from pipeline.io.images import center_square, decode_rgb, save_png, to_tensor
from pipeline.io.sheets import SHEET_TILE, contact_sheet, edit_caption
from pipeline.engine.metrics import psnr, ssim


def edit_file_name(target_index: int, eta: float) -> str:
    """``{target_index}-{eta}.png``: stable across runs, whatever the prompt's text."""
    return f"{target_index}-{eta:g}.png"


def edit_one_image(
    config: PTIConfig,
    image: str,
    targets: Sequence[str],
    source: str | None,
    out: Path,
    engine: Engine | None = None,
) -> dict:
    """Stage 1 and 2 for one image; writes PNGs, ``contact_sheet.png`` and ``summary.json``."""
    if not targets:
        raise InputError("no target prompts: give at least one --target")
    empty = [f"target prompt {i} is empty" for i, t in enumerate(targets) if not t.strip()]
    if empty:  # the config's etas were checked when it was made (PTIConfig's own bounds)
        raise InputError("; ".join(empty))
    started = time.perf_counter()
    photo = decode_rgb(read_bytes(image, image), image)  # a bad image fails before the model loads
    engine = engine or Engine.load(config)
    loaded = time.perf_counter()
    # Attention control is planned before stage 1, so a target it cannot align fails at once.
    plans = [engine.attention_plan(source, t, name=f"target {n} ({t!r})") for n, t in enumerate(targets)]
    pixels = to_tensor(center_square(photo, engine.resolution)).unsqueeze(0)
    inversion = engine.invert_and_tune(pixels, [source])
    if not bool(inversion.finite[0]):  # after the engine's float32 retry, if it ran in half precision
        dtype = str(engine.sd.dtype).removeprefix("torch.")
        again = " and again in float32" if bool(inversion.retried[0]) else ""
        raise NonFiniteError(f"{image}: the model produced NaN or inf in stage 1 in {dtype}{again}")
    edits = engine.edit_grid(inversion, targets, config.etas, plans)
    finished = time.perf_counter()

    out = Path(out)
    save_png(pixels[0], out / "input.png")
    save_png(inversion.reconstruction[0], out / "reconstruction.png")
    rows, labels, records, k = [], [], [], 0
    for t, target in enumerate(targets):
        row = [pixels[0], inversion.reconstruction[0]]
        captions = ["input", "reconstruction"]
        for eta in config.etas:
            name = edit_file_name(t, eta)
            save_png(edits[k], out / name)
            records.append(
                {
                    "file": name,
                    "target_index": t,
                    "target": target,
                    "eta": eta,
                    "psnr_to_input": float(psnr(edits[k : k + 1], pixels)[0]),
                    "ssim_to_input": float(ssim(edits[k : k + 1], pixels)[0]),
                }
            )
            row.append(edits[k])
            captions.append(edit_caption(target, eta))
            k += 1
        rows.append(row)
        labels.append(captions)
    contact_sheet(rows, labels=labels, tile=SHEET_TILE).save(out / "contact_sheet.png")
    summary = {
        "image": image,
        "source": source,
        "targets": list(targets),
        "config": config.to_dict(),
        "model_fingerprint": engine.sd.fingerprint,
        "device": str(engine.sd.device),
        "dtype": str(engine.sd.dtype).removeprefix("torch."),
        "config_fingerprint": engine.fingerprint,
        "retried_in_float32": bool(inversion.retried[0]),
        "reconstruction": {
            "file": "reconstruction.png",
            "psnr": float(inversion.psnr[0]),
            "ssim": float(inversion.ssim[0]),
            "tuning_loss_initial": float(inversion.initial_loss.mean()),
            "tuning_loss_final": float(inversion.final_loss.mean()),
        },
        "edits": records,
        "unet_calls": engine.eps.calls,
        "seconds": {
            "load": loaded - started,
            **inversion.seconds,
            "edit": finished - loaded - sum(inversion.seconds.values()),
            "total": finished - started,
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
