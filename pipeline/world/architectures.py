"""The published architectures that the cost benchmarks measure, as checkpoint folders without weights.

Stable Diffusion 1.5, SDXL base 1.0, SD3.5 Medium and Large, and CLIP ViT-L/14 (the scorer
InstructPix2Pix uses), written from their published configs: ``model_index.json`` and each part's
config, small tokenizers (the vocabulary does not change the cost: only the 77 CLIP and 256 T5
positions do) and the family's scheduler. The
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
    "sd35-medium": "Stable Diffusion 3.5 Medium at 1024x1024",
    "sd35-large": "Stable Diffusion 3.5 Large at 1024x1024",
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


def _sd35(layers: int, heads: int, position_embeddings: int, dual_attention_layers: int = 0) -> dict:
    """SD3.5's parts: its transformer (``heads`` of 64: the blocks' width), SD3's 16-channel VAE,
    CLIP-L and CLIP-G with projections (the pooled projection, 768 + 1280) and T5-XXL."""
    return dict(
        transformer=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=layers,
            attention_head_dim=64,
            num_attention_heads=heads,
            joint_attention_dim=4096,
            caption_projection_dim=64 * heads,
            pooled_projection_dim=2048,
            pos_embed_max_size=position_embeddings,
            dual_attention_layers=tuple(range(dual_attention_layers)),
            qk_norm="rms_norm",
        ),
        vae=_vae(
            1024,
            1.5305,
            latent_channels=16,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=VIT_L,
        text_encoder_2=_clip_text(1280, 32, 20, "gelu", 1280),
        text_encoder_3=dict(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        ),
    )


PARTS["sd35-medium"] = _sd35(layers=24, heads=24, position_embeddings=384, dual_attention_layers=13)
PARTS["sd35-large"] = _sd35(layers=38, heads=38, position_embeddings=192)
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
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import UNet2DConditionModel
    from transformers import CLIPConfig, CLIPTextConfig, T5Config

    from pipeline.world.tiny_sd3 import t5_tokenizer

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
    sd3 = "transformer" in parts
    with torch.device("meta"):  # the configs as diffusers writes them, without building any weight
        if sd3:
            SD3Transformer2DModel(**parts["transformer"]).save_config(folder / "transformer")
        else:
            UNet2DConditionModel(**parts["unet"]).save_config(folder / "unet")
        AutoencoderKL(**parts["vae"]).save_config(folder / "vae")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    index |= {part: ["diffusers", "config only"] for part in parts}  # the parts it lists (model_family)
    for part in ("text_encoder", "text_encoder_2"):
        if part in parts:
            CLIPTextConfig(**parts[part]).save_pretrained(folder / part)
            tokenizer.save_pretrained(folder / part.replace("text_encoder", "tokenizer"))
    if sd3:
        T5Config(**parts["text_encoder_3"]).save_pretrained(folder / "text_encoder_3")
        t5_tokenizer().save_pretrained(folder / "tokenizer_3")
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(
            folder / "scheduler"
        )
        index.update(_class_name="StableDiffusion3Pipeline")
    else:
        sd_scheduler().save_pretrained(folder / "scheduler")
    if name == "sdxl":
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
