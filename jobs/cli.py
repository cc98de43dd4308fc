"""The ``pti`` command: edit one image, build the tiny offline model, or run a batch job of ``jobs/``."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from jobs import common
from pipeline.batch.config import RunConfig
from pipeline.batch.dataset import run_dataset
from pipeline.batch.jobs import run_all, run_edit, run_tune
from pipeline.batch.nightly import run_nightly
from pipeline.engine.config import PRESETS, PTIConfig
from pipeline.errors import PTIError

app = typer.Typer(
    help="Prompt Tuning Inversion: text-driven image editing with Stable Diffusion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("edit")
def edit_command(
    image: str = typer.Argument(..., help="Image path or URI (s3://, gs://, https://, file://)."),
    target: list[str] = typer.Option(..., "--target", "-t", help="Target prompt; repeat for more."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the outputs."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="Source prompt (optional)."),
    eta: list[float] = typer.Option(
        list(PTIConfig.etas), "--eta", help="Weight on the target, in [0, 1]; repeat for more."
    ),
    method: str = typer.Option(PTIConfig.method, help="pti, ddim, nti or npi."),
    preset: Optional[str] = typer.Option(
        None,
        help=f"Named stage-1 settings, one of {', '.join(PRESETS)} (docs/stage-one.md); "
        "options given explicitly win over it.",
    ),
    steps: Optional[int] = typer.Option(
        None, help=f"DDIM steps T (default {PTIConfig.steps}, or the preset's)."
    ),
    guidance: float = typer.Option(PTIConfig.guidance, help="Classifier-free guidance w."),
    inner_steps: Optional[int] = typer.Option(
        None, help=f"Adam steps per timestep K (default {PTIConfig.inner_steps}, or the preset's)."
    ),
    lr: Optional[float] = typer.Option(
        None, help=f"Tuning learning rate, decays to half (default {PTIConfig.lr:g}, or the preset's)."
    ),
    model: str = typer.Option(
        PTIConfig.model, help="Hub id, local folder or fsspec URI of a diffusers checkpoint."
    ),
    resolution: Optional[int] = typer.Option(PTIConfig.resolution, help="Image size; default: the model's."),
    seed: int = typer.Option(PTIConfig.seed),
    device: str = typer.Option(PTIConfig.device, help="auto, cpu or cuda[:N]."),
    dtype: str = typer.Option(PTIConfig.dtype, help="auto, float32, float16 or bfloat16 (CUDA)."),
    control: str = typer.Option(
        PTIConfig.control,
        help="Attention control of the edits (Prompt-to-Prompt): none, replace, refine, reweight or auto.",
    ),
    cross_replace_steps: float = typer.Option(
        PTIConfig.cross_replace_steps, help="Fraction of the steps whose cross-attention is the source's."
    ),
    self_replace_steps: float = typer.Option(
        PTIConfig.self_replace_steps, help="Fraction of the steps whose low-resolution self-attention is."
    ),
    local_blend: bool = typer.Option(
        PTIConfig.local_blend, help="Keep the image outside the words that change (needs --source)."
    ),
    blend_threshold: float = typer.Option(PTIConfig.blend_threshold, help="Local blend's mask threshold."),
    reweight: list[str] = typer.Option(
        [], "--reweight", help="WORD=FACTOR: scale a target word's attention; repeat for more."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Invert and tune one image, then write one edit per (target, eta), a contact sheet and a summary."""
    from pipeline.editing import edit_one_image

    try:
        if preset is not None and preset not in PRESETS:
            raise PTIError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
        given = {"steps": steps, "inner_steps": inner_steps, "lr": lr}
        stage_one = {**PRESETS.get(preset, {}), **{k: v for k, v in given.items() if v is not None}}
        config = PTIConfig(
            model=model,
            method=method,
            guidance=guidance,
            **stage_one,
            etas=tuple(eta),
            resolution=resolution,
            seed=seed,
            device=device,
            dtype=dtype,
            control=control,
            cross_replace_steps=cross_replace_steps,
            self_replace_steps=self_replace_steps,
            local_blend=local_blend,
            blend_threshold=blend_threshold,
            reweight=_factors(reweight),
            progress=not quiet,
        )
        summary = edit_one_image(config, image, target, source, out)
    except PTIError as error:
        _fail(error)
    recon = summary["reconstruction"]
    typer.echo(f"ran on {summary['device']} in {summary['dtype']}")
    typer.echo(
        f"reconstruction PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f}; "
        f"{len(summary['edits'])} edits in {summary['seconds']['total']:.1f} s"
    )
    typer.echo(f"outputs:       {out}/")
    typer.echo(f"contact sheet: {out / 'contact_sheet.png'}")


def _factors(items: list[str]) -> dict[str, float] | None:
    """``WORD=FACTOR`` options as a dict."""
    factors = {}
    for item in items:
        word, sep, factor = item.partition("=")
        try:
            factors[word] = float(factor)
        except ValueError:
            sep = ""
        if not sep or not word:
            raise PTIError(f"--reweight {item!r} is not WORD=FACTOR (e.g. --reweight hat=2)")
    return factors or None


@app.command("build-tiny-model")
def build_tiny_model_command(
    folder: Path = typer.Argument(..., help="Where to write the checkpoint."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    family: str = typer.Option("sd", help="sd (SD 1.x architecture), sdxl (SDXL's) or sd3 (SD3's)."),
) -> None:
    """Write a tiny Stable Diffusion with seeded random weights (offline; for tests and the demo)."""
    from pipeline.world.tiny import build_tiny_model

    if family not in ("sd", "sdxl", "sd3"):
        raise PTIError(f"--family {family!r} is not one of sd, sdxl, sd3")
    started = time.perf_counter()
    build_tiny_model(folder, seed=seed, family=family)
    typer.echo(f"tiny model written to {folder} in {time.perf_counter() - started:.1f} s")


def _job(
    name: str, run: Callable[[RunConfig], dict], help: str, flags: dict[str, str] = common.FLAGS
) -> None:
    """A ``pti`` subcommand that is a job of ``jobs/``, with the same flags (``jobs.common``)."""

    @app.command(
        name,
        help=help,
        add_help_option=False,  # --help reaches the job's own parser, which lists its options
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def command(context: typer.Context) -> None:
        common.main(run, help, context.args, flags, prog=f"pti {name}")


_job("run", run_all, "Both stages on Ray: manifest -> embeddings -> edits (jobs.run).")
_job("tune", run_tune, "Stage 1 on Ray: manifest -> embeddings (jobs.tune).")
_job("edit-batch", run_edit, "Stage 2 on Ray: embeddings + targets -> edits (jobs.edit).")
_job(
    "nightly",
    run_nightly,
    "Every new manifest under a prefix through jobs.run, then a report (jobs.nightly).",
    common.NIGHTLY_FLAGS,
)
_job(
    "dataset",
    run_dataset,
    "An output's kept edits as a training set for datasets.load_dataset (jobs.dataset).",
    common.DATASET_FLAGS,
)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format=common.LOG_FORMAT, stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
