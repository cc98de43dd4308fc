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

from benchmarks.common import append_record, markdown_table, model_folder

IMAGE_SIDE = 512  # the edit's side (SD 1.5), resized to the scorer's by the scorer


def scorer_on(name: str, device: torch.device):
    """A ``Scorer`` of ``name`` (``vit-l-14``, ``tiny-clip`` or a CLIP folder) on ``device``: the
    published architecture with seeded random weights (its tokenizer the tiny one: token ids only
    shape the cost through the 77 positions), else the checkpoint's own."""
    from pipeline.engine.scoring import load_scorer
    from pipeline.world.architectures import ARCHITECTURES

    return load_scorer(model_folder(name), device=str(device), weights=name not in ARCHITECTURES)


def encodings(scorer) -> dict:
    """Scoring's two pieces on the scorer's device: one image encoding (at ``IMAGE_SIDE``, resized
    to the scorer's side) and one text encoding."""
    pixels = torch.rand(1, 3, IMAGE_SIDE, IMAGE_SIDE, device=scorer.device)
    return {
        "image": lambda: scorer.encode_images(pixels),
        "text": lambda: scorer.encode_texts(["a photo of a cat wearing a hat"]),
    }


def count_scoring(scorer) -> dict[str, int]:
    """FLOPs of each of ``encodings``, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.engine import _register_cpu_attention_flops

    _register_cpu_attention_flops()
    counted = {}
    for name, work in encodings(scorer).items():
        with FlopCounterMode(display=False) as counter:
            work()
        counted[name] = counter.get_total_flops()
    return counted


def time_scoring(scorer, repeat: int = 3) -> dict[str, float]:
    """Seconds of each of ``encodings``, best of ``repeat`` after a warm-up."""
    seconds = {}
    for name, work in encodings(scorer).items():
        work()
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
    scorer = "tiny-clip" if args.scorer == "tiny" else args.scorer  # the tests' seeded random CLIP
    report = scoring_report(scorer, args.model, args.steps, args.repeat)
    body = report_table(report)
    print(body)
    if not args.no_record:
        append_record("benchmarks.scoring", f"Scoring cost: `{args.scorer}` against `{args.model}`", body)


if __name__ == "__main__":
    main()
