"""A small CLIP of the rendered world: a scorer that knows what the world's Stable Diffusion draws.

A scorer with random weights proves plumbing only. To show that the curation filter keeps right
edits and drops wrong ones (issue 24), scores must come from a model that knows the world, as
OpenAI's CLIP knows photographs: this one is trained here, contrastively, on the world's scenes and
captions (``pipeline.world.scenes``), in transformers' ``CLIPModel`` architecture, and saved like
any CLIP checkpoint (``save_pretrained``, safetensors), so ``load_scorer`` loads it as it would
``openai/clip-vit-large-patch14``.

The images go through ``Scorer.pixel_values`` (the scorer's own resize and normalisation), so the
model trains on exactly what it scores. They are lightly degraded (blur, noise, a colour shift)
so that it scores the world SD's imperfect drawings as it scores clean renders. Captions repeat
within a batch (the world has 72), so the contrastive targets spread over every pair that shares
a caption (``contrastive_loss``) instead of calling an identical caption a negative.

    python -m jobs.train_clip --out models/shapes-clip
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.engine.scoring import Scorer
from pipeline.world.tiny import small_clip
from pipeline.world.training import curve, render_scenes


@dataclass(frozen=True)
class ClipConfig:
    """The recipe of the world's CLIP (recorded in its ``training.json``)."""

    scenes: int = 20_000  # one-object scenes at 64 px, as models/shapes-sd was trained on
    resolution: int = 64
    seed: int = 0
    side: int = 32  # the vision encoder's input (patches of side / 8)
    hidden_size: int = 64
    layers: int = 2
    projection_dim: int = 32
    steps: int = 1_000
    batch: int = 256
    lr: float = 2e-3
    noise: float = 0.04  # the largest std of the Gaussian noise added to a training image, in [0, 1] units
    threads: int = 2


def build_clip(config: ClipConfig):
    """An untrained CLIP of the recipe's size (from torch's current seed), its tokenizer (the tiny
    SD's words) and the image processor (``side``, CLIP's mean and std) it is saved with."""
    return small_clip(config.hidden_size, config.layers, config.side, config.side // 8, config.projection_dim)


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, same: torch.Tensor):
    """CLIP's symmetric cross-entropy over image-text cosines ``scale * images @ texts.T`` of
    normalised features, with each row's target spread evenly over the pairs that share its
    caption (``same[i, j]``: image i's caption is text j's)."""
    logits = scale * images @ texts.T
    targets = same.float() / same.float().sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


def degrade(pixels: torch.Tensor, generator: torch.Generator, noise: float) -> torch.Tensor:
    """Training images ``[B, 3, H, W]`` in [0, 1], each blurred or not (a half-size round trip),
    shifted in colour by up to 4 % per channel and given Gaussian noise of std up to ``noise``."""
    b = len(pixels)
    blurred = F.interpolate(F.interpolate(pixels, scale_factor=0.5, mode="area"), size=pixels.shape[-2:])
    blur = torch.rand(b, 1, 1, 1, generator=generator) < 0.5
    out = torch.where(blur, blurred, pixels)
    out = out + (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.08
    std = torch.rand(b, 1, 1, 1, generator=generator) * noise
    out = out + torch.randn(out.shape, generator=generator) * std
    return out.clamp(0, 1)


def train_world_clip(out: Path | str, config: ClipConfig = ClipConfig(), progress: bool = True) -> Path:
    """Train the world's CLIP and save it to ``out`` (transformers layout, safetensors, float32)
    with ``training.json`` (recipe, loss curve, seconds)."""
    from tqdm import tqdm

    out = Path(out)
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    pixels, captions = render_scenes(config.scenes, config.resolution, config.seed)
    distinct = sorted(set(captions))
    index = {caption: k for k, caption in enumerate(distinct)}
    caption_ids = torch.tensor([index[c] for c in captions])
    model, tokenizer, processor = build_clip(config)
    scorer = Scorer.of(model, tokenizer, processor.to_dict())
    tokens = scorer.input_ids(distinct)  # every caption once: [captions, 77]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, config.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(config.seed)
    losses, started = [], time.perf_counter()
    model.train()
    for _ in tqdm(range(config.steps), disable=not progress, desc="world CLIP"):
        batch = torch.randint(len(pixels), (config.batch,), generator=generator)
        images = degrade(pixels[batch].float() / 255, generator, config.noise)
        ids = caption_ids[batch]
        same = ids[:, None] == ids[None]
        features = scorer.image_features(images), scorer.text_features(tokens[ids])
        loss = contrastive_loss(*features, model.logit_scale.exp(), same)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "recipe": asdict(config),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "loss_every_100_steps": [round(x, 4) for x in curve(losses, 100)],
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
