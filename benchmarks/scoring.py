"""Scoring cost (issue 24): what CLIP scoring adds to an edit, in FLOPs counted on the meta device
and in seconds on this machine's CPU.

    python -m benchmarks.scoring                  # CLIP ViT-L/14 against one SD 1.5 edit, T = 50
    python -m benchmarks.scoring --scorer tiny --model tiny   # the tests' tiny models (seconds)

Scoring an edit encodes, with the scorer (``pipeline.engine.scoring``): the edited image and the
target prompt, and once per image the input image and the source prompt. Per edit that is at most
two image encodings and two text encodings (an image with a single edit); an image with ``n``
edits shares its input's two. The edit is ALGORITHM.md's ``T x 2f + d + p`` (``benchmarks.engine``
``flops_report``). ``ViT-L/14`` is ``openai/clip-vit-large-patch14``'s published architecture
(the scorer InstructPix2Pix and UltraEdit use) with seeded random weights: cost does not depend on
the weights. Results print and are appended to ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import append_record, markdown_table

SCORERS = {"vit-l-14": "CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14's architecture)"}
IMAGE_SIDE = 512  # the edit's side (SD 1.5), resized to the scorer's by the scorer


def clip_vit_l_14():
    """CLIP ViT-L/14's architecture (its published config), freshly initialised under the current
    device context (``torch.device("meta")``: shapes alone)."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            ),
            vision_config=dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
                hidden_act="quick_gelu",
            ),
            projection_dim=768,
        )
    )


def scorer_on(name: str, device: torch.device):
    """A ``Scorer`` of ``name`` (``vit-l-14``, or a CLIP folder such as ``tiny``'s) on ``device``;
    the tokenizer is the tiny one (token ids only shape the cost through the 77 positions)."""
    from pipeline.engine.scoring import Scorer, load_scorer
    from pipeline.world.tiny import TINY_WORDS, clip_tokenizer

    if name != "vit-l-14":
        return load_scorer(name, device=str(device))
    with device:
        model = clip_vit_l_14().eval().requires_grad_(False)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), device=device).reshape(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711), device=device).reshape(3, 1, 1)
    return Scorer(model, clip_tokenizer(TINY_WORDS), 224, mean, std)


def count_scoring(scorer) -> dict[str, int]:
    """FLOPs of one image encoding (at ``IMAGE_SIDE``, resized to the scorer's side) and one text
    encoding, counted by ``torch.utils.flop_counter`` on the scorer's device."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.engine import _register_cpu_attention_flops

    _register_cpu_attention_flops()
    pixels = torch.rand(1, 3, IMAGE_SIDE, IMAGE_SIDE, device=scorer.device)
    counted = {}
    for name, work in (
        ("image", lambda: scorer.encode_images(pixels)),
        ("text", lambda: scorer.encode_texts(["a photo of a cat wearing a hat"])),
    ):
        with FlopCounterMode(display=False) as counter:
            work()
        counted[name] = counter.get_total_flops()
    return counted


def time_scoring(scorer, repeat: int = 3) -> dict[str, float]:
    """Seconds of one image encoding and one text encoding on the scorer's device, best of ``repeat``."""
    pixels = torch.rand(1, 3, IMAGE_SIDE, IMAGE_SIDE, device=scorer.device)
    seconds = {}
    for name, work in (
        ("image", lambda: scorer.encode_images(pixels)),
        ("text", lambda: scorer.encode_texts(["a photo of a cat wearing a hat"])),
    ):
        work()  # warm-up
        runs = []
        for _ in range(repeat):
            began = time.perf_counter()
            work()
            runs.append(time.perf_counter() - began)
        seconds[name] = min(runs)
    return seconds


def scoring_report(scorer_name: str, model: str, steps: int, repeat: int = 3) -> dict:
    """Counted FLOPs and CPU seconds of scoring against one edit's counted FLOPs (``model`` on
    the meta device, T = ``steps``): per edit at most, and amortised over ``n`` edits per image."""
    from benchmarks.engine import flops_report, meta_model

    flops = count_scoring(scorer_on(scorer_name, torch.device("meta")))
    seconds = time_scoring(scorer_on(scorer_name, torch.device("cpu")), repeat)
    edit = flops_report(meta_model(model), steps, 1)["edit"]
    worst = 2 * flops["image"] + 2 * flops["text"]  # an image with one edit
    per_edit = {n: flops["image"] + flops["text"] + (flops["image"] + flops["text"]) / n for n in (1, 4, 16)}
    return dict(
        scorer=scorer_name,
        model=model,
        steps=steps,
        image_flops=flops["image"],
        text_flops=flops["text"],
        edit_flops=edit,
        worst_flops=worst,
        worst_share=worst / edit,
        shares={n: f / edit for n, f in per_edit.items()},
        image_seconds=seconds["image"],
        text_seconds=seconds["text"],
        worst_seconds=2 * seconds["image"] + 2 * seconds["text"],
    )


def report_table(report: dict) -> str:
    """``scoring_report`` as a Markdown table and a line on its share of an edit."""
    pieces = [
        ("one image encoding (512 px in)", "image_flops", "image_seconds"),
        ("one text encoding (77 tokens)", "text_flops", "text_seconds"),
        ("**scoring, one edit at most** (2 images, 2 texts)", "worst_flops", "worst_seconds"),
        (f"one edit, T = {report['steps']} (`{report['model']}`)", "edit_flops", None),
    ]
    rows = [dict(piece=p, gflop=report[f] / 1e9, s=report.get(s)) for p, f, s in pieces]
    table = markdown_table(rows, {"piece": "piece", "gflop": "GFLOP (counted)", "s": "CPU s (best of runs)"})
    shares = ", ".join(f"{share:.3%} at {n} edit(s) per image" for n, share in report["shares"].items())
    return (
        f"{table}\n\nScoring adds {report['worst_share']:.3%} of an edit's counted FLOPs at most "
        f"({shares}); the bound is 5 %."
    )


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--scorer", default="vit-l-14", help="vit-l-14, tiny, or a CLIP folder")
    parser.add_argument("--model", default="sd15", help="the edit's model: sd15, sdxl, tiny or a folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only, leave docs/benchmarks.md")
    args = parser.parse_args(argv)
    scorer = args.scorer
    if scorer == "tiny":  # the tests' seeded random CLIP, built in a temporary folder
        import tempfile
        from pathlib import Path

        from pipeline.world.tiny import build_tiny_clip

        scorer = str(build_tiny_clip(Path(tempfile.mkdtemp(prefix="pti-bench-")) / "tiny-clip"))
    report = scoring_report(scorer, args.model, args.steps, args.repeat)
    body = report_table(report)
    print(body)
    if not args.no_record:
        append_record("benchmarks.scoring", f"Scoring cost: `{args.scorer}` against `{args.model}`", body)


if __name__ == "__main__":
    main()
