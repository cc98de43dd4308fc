"""The tiny offline Stable Diffusion: seeded random weights of the real architecture, built in code.

Tests and the CPU benchmarks use it where no checkpoint can be downloaded; ``pti build-tiny-model``
writes it. Its CLIP tokenizer is built here too (a byte-level BPE that knows the project's words),
and ``save_checkpoint`` writes any set of components in diffusers layout, as the world's trainer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

TINY_WORDS = (
    "a an the of on in with and photo picture painting drawing sketch portrait image "
    "cat dog man woman person astronaut cup coffee tiger lion horse car tree house "
    "red green blue yellow black white orange purple pink brown gray "
    "circle square triangle background big small wearing hat glasses sitting standing "
    "oil watercolor pencil style sunny snowy night"
).split()


def _clip_bpe_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP byte-level BPE vocabulary: every byte, with and without the end-of-word mark, plus
    merges that make each of ``words`` one token, so any text tokenises and these words are one
    token each. (Hand-written because ``tokenizers``' BPE trainer learns merges by frequency and
    would not promise one token per word.)"""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())  # the 256 characters that stand for bytes
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}  # a merge's rank is the order it was added in
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        # First the merges the tokenizer will apply anyway (BPE: the lowest-ranked adjacent pair,
        # until none is left) ...
        while pairs := [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]:
            _, i = min(pairs)
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
        # ... then new merges, ranked after every other, that join what is left from the left.
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            tokens.append(pieces[0] + pieces[1])
            pieces[:2] = [pieces[0] + pieces[1]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return vocab, list(ranks)


def clip_tokenizer(words: Sequence[str]):
    """A CLIP tokenizer that tokenises any text and knows each of ``words`` as one token."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe_vocab(tuple(words))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_text_model(words: Sequence[str], hidden_size: int):
    """A CLIP tokenizer that knows ``words`` and a small, untrained CLIP text encoder for it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(words)
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    return tokenizer, text_encoder


def sd_scheduler():
    """A DDIM scheduler with Stable Diffusion 1.x's noise schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def save_checkpoint(
    folder: Path, vae, text_encoder, tokenizer, unet, dtype: torch.dtype | None = None
) -> None:
    """Save the parts in diffusers layout, safetensors only, with Stable Diffusion 1.x's scheduler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(folder, safe_serialization=True)


# What the tiny SD and SDXL UNets share: 8x8 latents (64 px images), two levels.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    norm_num_groups=32,
)


def tiny_vae(sample_size: int = 64, latent_channels: int = 4):
    """A small VAE with SD's 8x downsampling (SD3's has 16 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        sample_size=sample_size,
        layers_per_block=1,
        block_out_channels=(16, 16, 32, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )


def build_tiny_model(folder: Path | str, seed: int = 0, hidden_size: int = 32, family: str = "sd") -> Path:
    """Save a seeded random-weight Stable Diffusion of the real architecture, tiny, in diffusers
    layout with safetensors: a VAE with SD's 8x downsampling, a cross-attention UNet, a CLIP
    text encoder and a working CLIP tokenizer. 64x64 images, 8x8 latents. ``family="sdxl"``
    builds SDXL's architecture instead (``build_tiny_sdxl``), ``family="sd3"`` SD3's
    (``tiny_sd3.build_tiny_sd3``)."""
    from diffusers import UNet2DConditionModel

    if family == "sdxl":
        return build_tiny_sdxl(folder, seed, hidden_size)
    if family == "sd3":
        from pipeline.world.tiny_sd3 import build_tiny_sd3

        return build_tiny_sd3(folder, seed, hidden_size)
    if family != "sd":
        raise ValueError(f"family {family!r} is not one of sd, sdxl, sd3")
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_text_model(TINY_WORDS, hidden_size)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        cross_attention_dim=hidden_size,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=latent_statistics(vae)[1])
    save_checkpoint(folder, vae, text_encoder, tokenizer, unet)
    (folder / "README.md").write_text(
        f"Tiny Stable Diffusion with seeded random weights (seed {seed}), built by "
        "`pti build-tiny-model`. Its edits are noise: it proves mechanics, not quality.\n"
    )
    return folder


def small_clip(hidden_size: int, layers: int, side: int, patch_size: int, projection_dim: int):
    """A CLIP of the real architecture (a text and a vision transformer, each projected to a
    shared space), small, initialised from torch's current seed; the tiny SD's tokenizer; and an
    image processor for ``side`` px with OpenAI CLIP's mean and std."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_tokenizer(TINY_WORDS)
    vocab = tokenizer.get_vocab()
    sizes = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            **sizes,
        ),
        vision_config=dict(image_size=side, patch_size=patch_size, **sizes),
        projection_dim=projection_dim,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return CLIPModel(config), tokenizer, processor


def build_tiny_clip(folder: Path | str, seed: int = 0, hidden_size: int = 32, side: int = 32) -> Path:
    """Save a seeded random-weight CLIP of the real architecture, tiny, in transformers layout
    with safetensors, with the tokenizer of the tiny SD and an image processor for ``side`` px: a
    scorer that proves plumbing, never quality."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model, tokenizer, processor = small_clip(hidden_size, 2, side, side // 4, hidden_size // 2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: Path | str, seed: int = 0, hidden_size: int = 32) -> Path:
    """A seeded random-weight SDXL of the real architecture, tiny: two CLIP text encoders (the
    second with a projection: the pooled embedding) sharing one tokenizer's vocabulary, a UNet with
    SDXL's ``text_time`` added conditioning, linear attention projections and no attention at the
    finest level, SDXL's scheduler config (Euler, leading spacing) and ``force_zeros_for_empty_prompt``.
    64x64 images, 8x8 latents; token embeddings ``2 * hidden_size`` wide, pooled ``hidden_size``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_text_model(TINY_WORDS, hidden_size)
    config = text_encoder.config
    text_encoder_2 = CLIPTextModelWithProjection(
        type(config)(**{**config.to_dict(), "projection_dim": hidden_size})
    )
    time_dim = 8
    unet = UNet2DConditionModel(
        **TINY_UNET,
        cross_attention_dim=2 * hidden_size,  # both encoders' hidden states side by side
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden_size,  # time ids + pooled
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=latent_statistics(vae)[1])
    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    # SDXL base's scheduler_config.json also carries DDIM's keys (it was written from a DDIM
    # config): a DDIMScheduler made from it must not clip x0, as it would by its own default.
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0)
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    ).save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(
        f"Tiny Stable Diffusion XL with seeded random weights (seed {seed}), built by "
        "`pti build-tiny-model --family sdxl`. Its edits are noise: it proves mechanics, not quality.\n"
    )
    return folder


def photographs(size: int, count: int = 3) -> torch.Tensor:
    """scikit-image's photographs (astronaut, chelsea, coffee), repeated to ``count``, centre-cropped
    to ``size``: ``[count, 3, size, size]`` in ``[0, 1]``."""
    from PIL import Image
    from skimage import data

    from pipeline.io.images import center_square, to_tensor

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    return torch.stack([to_tensor(center_square(Image.fromarray(photos[i % 3]), size)) for i in range(count)])


@torch.no_grad()
def latent_statistics(vae) -> tuple[float, float]:
    """The mean and one over the standard deviation of real photographs' latents (scikit-image's):
    a VAE's ``shift_factor`` and ``scaling_factor``, chosen as SD3's and Stable Diffusion's were,
    so latents have zero mean (SD3) and unit scale."""
    latents = vae.encode(2 * photographs(vae.config.sample_size) - 1).latent_dist.mean
    return float(latents.mean()), float(1 / latents.std())
