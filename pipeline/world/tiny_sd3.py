"""The tiny offline Stable Diffusion 3: seeded random weights of SD3's architecture, built in code.

``StableDiffusion3Pipeline``'s parts at toy sizes: a joint-attention ``SD3Transformer2DModel``, a
16-channel VAE with a shift and a scale, two CLIP text encoders with projections (CLIP-L's and
CLIP-G's places: their pooled outputs side by side are the pooled projection), a T5 encoder with a
working T5 tokenizer, and SD3's scheduler config (flow matching, shift 3). 64x64 images, 8x8
latents. It proves the mechanics of PTI on the flow family (docs/flow-matching.md), not quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.world.tiny import TINY_WORDS, latent_statistics, tiny_text_model, tiny_vae


def t5_tokenizer(words: tuple[str, ...] = tuple(TINY_WORDS)):
    """A T5 (Unigram, SentencePiece-style) tokenizer that knows each of ``words`` as one token and
    spells any other word from single characters. (Built from a vocabulary written here: no
    SentencePiece model can be downloaded, and T5's own is 32,000 pieces.)"""
    from transformers import T5Tokenizer

    characters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in characters] + [(f"▁{c}", -5.5) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_t5(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
        )
    )


def build_tiny_sd3(folder: Path | str, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a seeded random-weight SD3 of the real architecture, tiny, in diffusers layout with
    safetensors. Token embeddings: each CLIP's ``hidden_size / 2`` side by side, zero-padded to T5's
    ``hidden_size`` (as the pipeline pads CLIP to T5's width); the pooled projection is both CLIPs'
    projections (``hidden_size / 2`` each)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    half = hidden_size // 2
    tokenizer, clip = tiny_text_model(TINY_WORDS, half)
    config = clip.config.to_dict() | {"projection_dim": half}
    text_encoder = CLIPTextModelWithProjection(type(clip.config)(**config))
    text_encoder_2 = CLIPTextModelWithProjection(type(clip.config)(**config))
    tokenizer_3 = t5_tokenizer()
    text_encoder_3 = _tiny_t5(len(tokenizer_3), hidden_size)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=hidden_size,
        caption_projection_dim=16,  # heads x head dim: the blocks' width
        pooled_projection_dim=2 * half,
        pos_embed_max_size=8,
    )
    vae = tiny_vae(latent_channels=16)
    shift, scale = latent_statistics(vae)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD3's config
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    ).save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(
        f"Tiny Stable Diffusion 3 with seeded random weights (seed {seed}), built by "
        "`pti build-tiny-model --family sd3`. Its edits are noise: it proves mechanics, not quality.\n"
    )
    return folder
