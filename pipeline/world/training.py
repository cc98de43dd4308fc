"""Training the small Stable Diffusion of the rendered world (``pipeline.world.scenes``) on the CPU.

Stable Diffusion's recipe, shrunk: first the VAE (reconstruction + a small KL term), then the
UNet and the text encoder together on the VAE's latents with epsilon-prediction and caption
dropout for classifier-free guidance. (Stable Diffusion froze a pretrained CLIP; there is none
to download here, so the text encoder learns with the UNet.) The layout on disk is diffusers',
the same as a real checkpoint's, so every part of the product loads it unchanged.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import trange

from pipeline.world import scenes as world


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 0
    resolution: int = 64
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6  # Stable Diffusion's
    scenes: int = 20_000  # rendered once, encoded once; the UNet sees them in random order
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1  # an empty caption this often: the unconditional branch of guidance
    hidden_size: int = 64  # text embedding width
    threads: int = 2


def build_components(config: TrainingConfig):
    """Untrained tokenizer, text encoder, VAE and UNet of the world's model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pipeline.world.tiny import TINY_WORDS, tiny_text_model

    torch.manual_seed(config.seed)
    tokenizer, text_encoder = tiny_text_model(dict.fromkeys([*TINY_WORDS, *world.WORDS]), config.hidden_size)
    vae = AutoencoderKL(  # Stable Diffusion's 8x downsampling: 64x64 images, 8x8x4 latents
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=config.resolution,
        layers_per_block=1,
        block_out_channels=(16, 32, 64, 64),
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96),
        norm_num_groups=16,
        cross_attention_dim=config.hidden_size,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return tokenizer, text_encoder, vae, unet


def render_scenes(count: int, seed: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` random one-object scenes: pixels ``[N, 3, H, W]`` in ``[-1, 1]`` and captions."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng, resolution) for _ in range(count)]
    pixels = torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1, [s.caption() for s in scenes]


def _cosine(step: int, steps: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def train_vae(vae, pixels: torch.Tensor, config: TrainingConfig, progress: bool = True) -> list[float]:
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, config.vae_steps))
    losses = []
    vae.train()
    for _ in (bar := trange(config.vae_steps, desc="vae", disable=not progress)):
        x = pixels[torch.randint(len(pixels), (config.vae_batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = (reconstruction - x).pow(2).mean()
        loss = mse + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(mse.item())
        bar.set_postfix(mse=f"{np.mean(losses[-50:]):.5f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unscaled latent means of every image; sets the VAE's ``scaling_factor`` to 1/std, as
    Stable Diffusion's was chosen, so the UNet sees unit-variance latents."""
    latents = torch.cat(
        [vae.encode(pixels[i : i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)]
    )
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return latents * vae.config.scaling_factor


def train_unet(
    unet, text_encoder, tokenizer, latents, captions, config: TrainingConfig, progress: bool = True
) -> list[float]:
    from pipeline.world.tiny import sd_scheduler

    scheduler = sd_scheduler()  # the noise schedule the model is saved with
    generator = torch.Generator().manual_seed(config.seed + 1)
    ids = tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, config.unet_steps))
    alphas_cumprod = scheduler.alphas_cumprod
    losses = []
    unet.train()
    text_encoder.train()
    for _ in (bar := trange(config.unet_steps, desc="unet", disable=not progress)):
        pick = torch.randint(len(latents), (config.unet_batch,), generator=generator)
        z0, tokens = latents[pick], ids[pick].clone()
        tokens[torch.rand(len(pick), generator=generator) < config.caption_dropout] = empty
        t = torch.randint(scheduler.config.num_train_timesteps, (len(pick),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = (unet(zt, t, text_encoder(tokens).last_hidden_state).sample - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    unet.eval()
    text_encoder.eval()
    return losses


def train_world_model(
    folder: Path | str, config: TrainingConfig = TrainingConfig(), progress: bool = True
) -> Path:
    """Train the world's model and save it in diffusers layout (fp16 safetensors, a few MB) with
    ``training.json``: the config, the final losses and the time it took."""
    from pipeline.world.tiny import save_checkpoint

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    tokenizer, text_encoder, vae, unet = build_components(config)
    pixels, captions = render_scenes(config.scenes, config.seed, config.resolution)
    vae_losses = train_vae(vae, pixels, config, progress)
    vae_done = time.perf_counter()
    latents = encode_latents(vae, pixels)
    unet_losses = train_unet(unet, text_encoder, tokenizer, latents, captions, config, progress)
    folder = Path(folder)
    save_checkpoint(folder, vae, text_encoder, tokenizer, unet, dtype=torch.float16)
    record = {
        "config": asdict(config),
        "vae_mse_last_100": float(np.mean(vae_losses[-100:])),
        "unet_loss_last_100": float(np.mean(unet_losses[-100:])),
        "vae_seconds": round(vae_done - started, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "threads": config.threads,
    }
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder
