"""The published architectures that the cost benchmarks measure, as checkpoint folders without weights.

Stable Diffusion 1.5, SDXL base 1.0 and CLIP ViT-L/14 (the scorer InstructPix2Pix uses), written
from their published configs: ``model_index.json`` and each part's config, a small CLIP tokenizer
(the vocabulary does not change the cost: only the 77 positions do) and SD's DDIM scheduler. The
loaders build them with ``weights=False`` (``models.load_stable_diffusion``,
``scoring.load_scorer``): seeded random weights, or shapes alone on the meta device. Nothing is
downloaded, and cost does not depend on the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.world.tiny import TINY_WORDS, clip_tokenizer, sd_scheduler

ARCHITECTURES = {
    "sd15": "Stable Diffusion 1.5 at 512x512",
    "sdxl": "Stable Diffusion XL base 1.0 at 1024x1024",
    "vit-l-14": "CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14's architecture)",
}


def _clip_text(hidden: int, layers: int, heads: int, act: str, projection: int) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
    )


def _vae(sample_size: int, scaling_factor: float, **config) -> dict:
    return dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **config,
    )


VIT_L = _clip_text(768, 12, 12, "quick_gelu", 768)  # SD's text encoder and the scorer's
PARTS = {
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768),  # the rest: diffusers' defaults, SD 1.x's
        vae=_vae(512, 0.18215),
        text_encoder=VIT_L,
    ),
    "sdxl": dict(
        unet=dict(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        vae=_vae(1024, 0.13025, force_upcast=True),
        text_encoder=VIT_L,
        text_encoder_2=_clip_text(1280, 32, 20, "gelu", 1280),  # OpenCLIP bigG, with its projection
    ),
}
VIT_L_14_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
)
CLIP_PREPROCESSING = {"crop_size": {"height": 224, "width": 224}}  # and CLIP's mean and std (Scorer.of)


def write_architecture(name: str, folder: Path | str) -> Path:
    """Write ``name`` (one of ``ARCHITECTURES``) to ``folder`` as a checkpoint of configs alone."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPTextConfig

    if name not in ARCHITECTURES:
        raise ValueError(f"no architecture {name!r}: one of {', '.join(ARCHITECTURES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer(TINY_WORDS)
    if name == "vit-l-14":
        text = {k: v for k, v in VIT_L.items() if k != "projection_dim"}
        CLIPConfig(text_config=text, vision_config=VIT_L_14_VISION, projection_dim=768).save_pretrained(
            folder
        )
        tokenizer.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSING))
        return folder
    parts = PARTS[name]
    with torch.device("meta"):  # the configs as diffusers writes them, without building any weight
        UNet2DConditionModel(**parts["unet"]).save_config(folder / "unet")
        AutoencoderKL(**parts["vae"]).save_config(folder / "vae")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    for part in ("text_encoder", "text_encoder_2"):
        if part in parts:
            CLIPTextConfig(**parts[part]).save_pretrained(folder / part)
            tokenizer.save_pretrained(folder / part.replace("text_encoder", "tokenizer"))
    sd_scheduler().save_pretrained(folder / "scheduler")
    if name == "sdxl":
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
