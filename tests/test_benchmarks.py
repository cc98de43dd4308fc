"""The engine benchmark counts what the engine does, as ALGORITHM.md states it (its timings are
recorded in docs/benchmarks.md, never asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import edit_quality
from benchmarks.engine import (
    LEVERS,
    count_pieces,
    end_of_sampling,
    first_steps,
    meta_model,
    run_case,
    with_flops,
)
from pipeline.engine.models import load_stable_diffusion
from pipeline.world.tiny import build_tiny_model

T, K = 3, 2
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes-sd"


def case(model: str, lever: str, **pti) -> dict:
    pti = dict(steps=T, inner_steps=K, lr=0.1, early_stop=False, **pti)
    return run_case(dict(model=model, lever=lever, pti=pti, edits=2, batch=2, device="cpu", dtype="auto"))


@pytest.fixture(scope="module")
def baseline(tiny_model_dir) -> dict:
    return case(tiny_model_dir, "baseline")


def test_engine_benchmark_counts_the_unet_evaluations_of_algorithm_md(baseline):
    assert baseline["stage1_evals_per_image"] == T + T * (1 + K + 1)
    assert baseline["inner_steps_taken"] == T * K
    assert baseline["stage2_calls"] == T and baseline["stage2_evals_per_edit"] == 2 * T


def test_a_case_priced_at_its_evaluations_costs_what_torch_counts_the_engine_doing(tiny_model_dir, baseline):
    """The FLOPs a case reports (the counted pieces, priced at the evaluations it measured) are
    ALGORITHM.md's formula (``PTIConfig.flops``), and what torch's counter counts in the engine's
    own stage 1 and stage 2 (stage 1 also encodes the source prompt and computes PSNR and SSIM: on
    the tiny model 1.5 % more, on SD 1.5 under 1e-4)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.engine.config import PTIConfig
    from pipeline.engine.engine import Engine
    from pipeline.world.tiny import photographs

    sd = load_stable_diffusion(tiny_model_dir, device="cpu")
    pieces = count_pieces(sd)
    row = with_flops(baseline, pieces, peak=1.0)
    config = PTIConfig(steps=T, inner_steps=K, lr=0.1, early_stop=False, progress=False)
    formula = config.flops(pieces, edits=1)
    assert row["stage1_tflop_per_image"] * 1e12 == pytest.approx(formula["stage_one"], rel=1e-12)
    assert row["edit_tflop_per_edit"] * 1e12 == pytest.approx(formula["stage_two"], rel=1e-12)
    engine = Engine(sd, config)
    with FlopCounterMode(display=False) as stage_one, torch.enable_grad():
        inversion = engine.invert_and_tune(photographs(engine.resolution, 1), [None])
    with FlopCounterMode(display=False) as stage_two:
        engine.edit(inversion, [0], ["a photo of a cat"], [0.8])
    assert formula["stage_one"] < stage_one.get_total_flops() < 1.02 * formula["stage_one"]
    assert stage_two.get_total_flops() == pytest.approx(formula["stage_two"], rel=1e-3)


def test_a_lever_changes_what_it_names_and_not_the_work(tiny_model_dir, baseline):
    """``channels_last`` (the lever the GPU check measures on every device) puts the UNet's weights in
    channels-last memory; the engine then evaluates exactly what the baseline does."""
    import torch

    from pipeline.engine.config import PTIConfig
    from pipeline.engine.engine import Engine

    engine = Engine(load_stable_diffusion(tiny_model_dir, device="cpu"), PTIConfig(progress=False))
    LEVERS["channels_last"][1](engine)
    assert engine.sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not engine.sd.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    lever = case(tiny_model_dir, "channels_last")
    for key in ("stage1_evals_per_image", "stage1_calls", "stage2_evals_per_edit", "stage2_calls"):
        assert lever[key] == baseline[key]


def test_a_config_lever_is_the_baselines_config_with_its_fields_changed_in_the_baselines_process():
    import argparse

    from benchmarks.engine import cases_of, groups_of
    from pipeline.errors import InputError

    parser = argparse.ArgumentParser()
    args = argparse.Namespace(
        model="tiny", timed_steps=None, edits=4, device="cpu", dtype=["auto"], batches=[1, 2]
    )
    args.levers = ["pti.control=auto", "pti.control=auto,pti.local_blend=true", "channels_last"]
    _, cases = cases_of(args, parser, {"steps": 5})
    assert [c["lever"] for c in cases] == ["baseline", *args.levers]
    assert [c["pti"] for c in cases] == [
        {"steps": 5},
        {"steps": 5, "control": "auto"},
        {"steps": 5, "control": "auto", "local_blend": True},
        {"steps": 5},
    ]
    assert all(c["batch"] == 2 for c in cases)
    assert groups_of(cases) == [[0, 1, 2], [3]]  # a code lever may change the model: its own process
    args.levers = ["pti.no_such_field=1"]
    with pytest.raises(InputError, match="unknown field pti.no_such_field"):
        cases_of(args, parser, {})
    args.levers = ["fixed_branch_every_step"]  # left the harness (docs/benchmarks.md)
    with pytest.raises(SystemExit):
        cases_of(args, parser, {})


def test_engine_benchmark_counts_the_source_branch_of_controlled_edits(tiny_model_dir, baseline):
    """Under attention control (``--set pti.control=auto``) each image's source branch runs beside
    its n edits: 2T (n + 1) / n evaluations per edit against plain editing's 2T."""
    n = 2
    controlled = [case(tiny_model_dir, "baseline", control="auto", local_blend=b) for b in (False, True)]
    assert baseline["stage2_evals_per_edit"] == 2 * T
    assert all(r["stage2_evals_per_edit"] == 2 * T * (n + 1) / n for r in controlled)
    assert all(r["stage2_calls"] == T for r in [baseline, *controlled])


@pytest.mark.parametrize("control", ["none", "auto"])
def test_stage_two_is_timed_from_its_last_steps_end_with_a_callback_not_a_patch(tiny_model_dir, control):
    """Stage 2's fixed part (decoding) is what follows the mark of the last sampling step, on a
    schedule cut to its first steps as the timed cases cut it."""
    import time

    from pipeline.engine.config import PTIConfig
    from pipeline.engine.engine import Engine
    from pipeline.world.tiny import photographs

    sd = load_stable_diffusion(tiny_model_dir, device="cpu")
    engine = Engine(sd, PTIConfig(steps=5, inner_steps=1, control=control, progress=False))
    engine.schedule = first_steps(engine.schedule, 2)
    inversion = engine.invert_and_tune(photographs(engine.resolution, 1), ["a photo of a dog"])
    plans = None if control == "none" else [engine.attention_plan("a photo of a dog", "a photo of a cat")]
    ended, callback = end_of_sampling(engine)
    started = time.perf_counter()
    engine.edit(inversion, [0], ["a photo of a cat"], [0.8], plans=plans, callback=callback)
    assert len(ended) == 1 and started < ended[0] < time.perf_counter()
    assert "decode_latents" not in vars(engine)  # the engine as shipped, nothing wrapped


def test_edit_quality_measures_attention_control_from_one_inversion(tmp_path):
    """Stage 1 once per method; plain and controlled edits from it, each row naming its control,
    controlled rows costing their scene's source branch too."""
    args = edit_quality.parse_args(
        [
            "--model",
            str(SHIPPED),
            "--images",
            "2",
            "--methods",
            "pti",
            "--etas",
            "0.8",
            "--guidance",
            "3",
            "--set",
            f"pti.steps={T}",
            "pti.inner_steps=1",
        ]
        + ["--controls", "none", "auto", "--out", str(tmp_path)]
    )
    assert (args.config.steps, args.config.inner_steps, args.config.guidance) == (
        T,
        1,
        7.5,
    )  # --guidance sweeps
    result = edit_quality.run(args)
    rows = result["rows"]
    assert {(r["control"], r["local_blend"], r["kind"]) for r in rows} == {
        (c, b, k) for c, b in (("none", None), ("auto", False), ("auto", True)) for k in ("colour", "shape")
    }
    assert len({r["stage1_seconds_per_image"] for r in rows}) == 1  # one inversion for every control
    plain = [r for r in rows if r["control"] == "none"]
    controlled = [r for r in rows if r["control"] == "auto"]
    assert all(r["edit_unet_evaluations_per_edit"] == 2 * T for r in plain)
    n = 4  # per scene: two kinds, one eta, blend off and on, in one call with one source branch
    assert all(r["edits_per_image"] == n for r in controlled)
    assert all(r["edit_unet_evaluations_per_edit"] == 2 * T * (n + 1) / n for r in controlled)
    assert all(r["cross_replace_steps"] == 0.8 and r["self_replace_steps"] == 0.4 for r in controlled)
    blended = [r for r in controlled if r["local_blend"]]
    assert all(0 < r["blend_mask_fraction"] <= 1 and 0 <= r["blend_object_cover"] <= 1 for r in blended)
    # The model's ceiling first: its VAE's round trip, which no reconstruction beats by much.
    ceiling = result["ceiling"]
    assert 0.9 < ceiling["vae_object_iou"] <= 1 and ceiling["vae_background_psnr"] > 30
    assert all(r["reconstruction_object_iou"] <= ceiling["vae_object_iou"] + 0.02 for r in rows)
    edit_quality.write_markdown(result, args, tmp_path / "quality.md")
    text = (tmp_path / "quality.md").read_text()
    assert "| pti | 3 | auto | on | 0.8 | 0.4 | colour | 0.8 |" in text
    assert text.index("The model's ceiling: its VAE's round trip") < text.index("Closest to the quality bar")


def stages(sd, T: int = 50, K: int = 10) -> tuple[dict, dict]:
    """The counted pieces of ``sd`` and ALGORITHM.md's stages priced from them, no early stop."""
    from pipeline.engine.config import PTIConfig

    pieces = count_pieces(sd)
    return pieces, PTIConfig(steps=T, inner_steps=K).flops(pieces)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_flops_counted_on_the_meta_device_are_those_of_a_real_run(family, tiny_model_dir, tmp_path):
    """Every piece counted on the meta device (UNet forward, forward and backward to the
    embedding, VAE, text encoding) equals the count of the same work computed on the CPU: meta
    alone would take unfused attention, whose backward does not recompute the scores; the count
    routes it through the fused kernel, as the CPU and GPUs run it."""
    folder = tiny_model_dir if family == "sd" else str(build_tiny_model(tmp_path / "m", family="sdxl"))
    meta = meta_model(folder)
    assert meta.device.type == "meta" and meta.family == family
    counted = count_pieces(meta)
    assert counted["forward"] > 0 and counted == count_pieces(load_stable_diffusion(folder, device="cpu"))


def test_sdxl_stages_are_priced_from_the_counted_pieces():
    """SDXL base at 1024x1024, counted on the meta device: stage 1 and an edit by ALGORITHM.md's
    counts, a forward of about 6.8 TFLOP, and its conditional embedding 77 x 2048 tokens + 1280 pooled."""
    T, K = 50, 10
    sd = meta_model("sdxl")
    pieces, cost = stages(sd, T, K)
    f, fb, d = pieces["forward"], pieces["forward_backward"], pieces["decode"]
    assert sd.resolution == 1024 and sd.family == "sdxl"
    assert cost["stage_one"] == pieces["encode"] + T * f + T * (2 * f + K * fb) + d
    assert cost["stage_two"] == T * 2 * f + d + pieces["text"]
    assert 6e12 < f < 7.5e12 and 2 * f < fb < 2.5 * f
    assert pieces["embedding"] == (77 + 1, 2048) and sd.pooled_dim == 1280


def test_sd15_counts_reproduce_the_scaling_plan_and_scoring_stays_under_5_percent_of_an_edit():
    """docs/scaling.md's SD 1.5 figures are these counts; scoring an edit costs a small part of it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import model_folder
    from pipeline.engine.scoring import load_scorer

    pieces, cost = stages(meta_model("sd15"))
    assert pieces["forward"] / 1e12 == pytest.approx(0.803, abs=5e-4)
    assert pieces["forward_backward"] / 1e12 == pytest.approx(1.72, abs=5e-3)
    assert (pieces["encode"] + pieces["decode"]) / 1e12 == pytest.approx(3.63, abs=5e-3)
    assert cost["stage_one"] / 1e15 == pytest.approx(0.985, abs=5e-4)
    assert cost["stage_two"] / 1e12 == pytest.approx(82.8, abs=0.1)
    assert pieces["embedding"] == (77, 768)

    # Issue 24's bound: CLIP ViT-L/14 scoring (two images and two prompts: an image with one edit)
    # under 5 % of one edit. ViT-L/14 at 224 px: 257 tokens through 24 layers of width 1024.
    scorer = load_scorer(model_folder("vit-l-14"), device="meta", weights=False)

    def counted(work) -> int:
        with FlopCounterMode(display=False) as counter:
            work()
        return counter.get_total_flops()

    image = counted(lambda: scorer.encode_images(torch.rand(1, 3, 512, 512, device="meta")))
    text = counted(lambda: scorer.encode_texts(["a photo of a cat wearing a hat"]))
    assert 1.4e11 < image < 1.8e11 and 1e10 < text < 3e10
    assert 2 * (image + text) / cost["stage_two"] < 0.05


@pytest.mark.parametrize(
    "name, forward, stage1, edit, transformer",
    [("sd35-medium", 11.25, 16.13, 1.138, 2.24), ("sd35-large", 31.12, 41.24, 3.125, 8.06)],
)
def test_sd35_counts_reproduce_the_scaling_plan(name, forward, stage1, edit, transformer):
    """docs/scaling.md's SD3.5 figures (TFLOP, PFLOP, PFLOP, billions of parameters) are these
    counts of the published architectures: the flow family's transformer, VAE and three encoders."""
    sd = meta_model(name)
    pieces, cost = stages(sd)
    assert sd.family == "sd3" and sd.resolution == 1024
    assert pieces["forward"] / 1e12 == pytest.approx(forward, abs=5e-3)
    assert cost["stage_one"] / 1e15 == pytest.approx(stage1, abs=5e-3)
    assert cost["stage_two"] / 1e15 == pytest.approx(edit, abs=5e-4)
    assert pieces["embedding"] == (333 + 1, 4096) and sd.pooled_dim == 2048
    assert sum(p.numel() for p in sd.unet.parameters()) / 1e9 == pytest.approx(transformer, abs=5e-3)
    assert sum(p.numel() for p in sd.text_encoder_3.parameters()) / 1e9 == pytest.approx(4.76, abs=5e-3)


def test_edit_quality_writes_each_model_to_its_own_folder_unless_told():
    """One page per world model under docs/quality/ (docs/quality.md compares them by hand)."""
    assert edit_quality.parse_args(["--model", "models/sharp-sd"]).out == Path("docs/quality/sharp-sd")
    assert edit_quality.parse_args([]).out == Path("docs/quality") / Path(edit_quality.SHIPPED_MODEL).name
    assert edit_quality.parse_args(["--out", "/tmp/q"]).out == Path("/tmp/q")
