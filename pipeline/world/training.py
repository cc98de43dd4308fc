"""Training the small Stable Diffusions of the rendered world (``pipeline.world.scenes``).

Stable Diffusion's recipe, shrunk: first the VAE (reconstruction + a small KL term), then the
UNet and the text encoder together on the VAE's latents with epsilon-prediction and caption
dropout for classifier-free guidance. (Stable Diffusion froze a pretrained CLIP; there is none
to download here, so the text encoder learns with the UNet.) The layout on disk is diffusers',
the same as a real checkpoint's, so every part of the product loads it unchanged.

Training is seeded and resumable: every ``checkpoint_every`` steps the whole state (weights,
optimiser, schedule, random generator, losses) is written atomically to a checkpoint folder, and
a training started again on that folder goes on from there and ends with the weights an unbroken
one ends with. Written by hand (not with accelerate's ``save_state``) because the state is a
handful of tensors and one generator, and a single ``torch.save`` of it is the whole mechanism.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.faults import failpoint
from pipeline.world import scenes as world


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 0
    resolution: int = 64
    max_objects: int = 1  # each scene has 1 to max_objects objects
    size_jitter: float = 0.0  # object widths vary by this fraction within "small" and "big"
    scenes: int = 20_000  # rendered once; the VAE and the UNet see them in random order
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # 4 levels: Stable Diffusion's 8x downsampling
    vae_mid_attention: bool = True
    # Train the VAE on random crops of this side (0: whole images). Beware: GroupNorm normalises
    # over the whole image, so a VAE trained on crops sees other statistics on whole images (for
    # sharp-sd, 64 px crops of 128 px scenes: MSE 0.0094 on crops, 0.018 on the same pixels of
    # whole scenes, white backgrounds 13 levels dark).
    vae_crop: int = 0
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6  # Stable Diffusion's
    unet_channels: tuple[int, ...] = (48, 96)  # one cross-attention level per entry
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1  # an empty caption this often: the unconditional branch of guidance
    hidden_size: int = 64  # text embedding width
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"  # bfloat16: autocast on a GPU (weights and optimiser stay float32)
    checkpoint_every: int = 100  # steps

    def replace(self, **changes) -> TrainingConfig:
        return replace(self, **changes)


# The shipped models' recipes. ``sharp-sd`` is issue 17's: 128 px scenes of one or two objects
# of varied sizes, 16x16 latents, cross-attention at 16x16, 8x8 and 4x4. Its VAE sees as many
# pixels per step as shapes-sd's (8 whole 128 px scenes) for twice the steps.
RECIPES = {
    "shapes-sd": TrainingConfig(),
    "sharp-sd": TrainingConfig(
        resolution=128,
        max_objects=2,
        size_jitter=0.15,
        vae_mid_attention=False,
        vae_batch=8,
        vae_steps=5000,
        unet_channels=(32, 64, 128),
        unet_steps=6000,
        unet_batch=32,
    ),
}
# What a training may change between sittings. checkpoint_every never changes the weights; threads
# may change float rounding, so a resumed run equals an unbroken one bit for bit only on the same
# thread count (tests/test_world.py keeps it).
RESUMABLE_CHANGES = {"threads", "checkpoint_every"}


def build_components(config: TrainingConfig):
    """Untrained tokenizer, text encoder, VAE and UNet of the world's model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pipeline.world.tiny import TINY_WORDS, tiny_text_model

    torch.manual_seed(config.seed)
    tokenizer, text_encoder = tiny_text_model(dict.fromkeys([*TINY_WORDS, *world.WORDS]), config.hidden_size)
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=config.resolution,
        layers_per_block=1,
        block_out_channels=config.vae_channels,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        mid_block_add_attention=config.vae_mid_attention,
    )
    levels = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 2 ** (len(config.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=config.unet_channels,
        norm_num_groups=16,
        cross_attention_dim=config.hidden_size,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
    )
    return tokenizer, text_encoder, vae, unet


def render_scenes(
    count: int, resolution: int, seed: int, max_objects: int = 1, size_jitter: float = 0.0
) -> tuple[torch.Tensor, list[str]]:
    """Training scenes (the world SD's and the world CLIP's): pixels ``[N, 3, H, W]`` uint8 (a
    quarter of float32's memory) and captions."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        objects = 1 if max_objects == 1 else int(rng.integers(1, max_objects + 1))
        scenes.append(world.random_scene(rng, resolution, objects, size_jitter))
    pixels = torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2)
    return pixels.contiguous(), [s.caption() for s in scenes]


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1


def random_crops(pixels: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``side`` x ``side`` crop of each image (all of it when ``side`` is 0)."""
    full = pixels.shape[-1]
    if not side or side >= full:
        return pixels
    corners = torch.randint(full - side + 1, (len(pixels), 2), generator=generator).tolist()
    return torch.stack([p[:, y : y + side, x : x + side] for p, (y, x) in zip(pixels, corners)])


def cosine_schedule(step: int, steps: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def vae_loss(vae, pixels: torch.Tensor, config: TrainingConfig, generator: torch.Generator):
    """Reconstruction MSE plus the KL term; returns (loss, mse)."""
    x = to_unit(random_crops(pixels, config.vae_crop, generator)).to(config.device)
    posterior = vae.encode(x).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(config.device)
    reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
    mse = (reconstruction.float() - x).pow(2).mean()
    return mse + config.kl_weight * posterior.kl().mean(), mse


def denoising_loss(unet, text_encoder, z0, tokens, scheduler, config: TrainingConfig, generator):
    """Epsilon-prediction MSE at uniformly drawn timesteps (Stable Diffusion's objective)."""
    t = torch.randint(scheduler.config.num_train_timesteps, (len(z0),), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = (a.sqrt() * z0 + (1 - a).sqrt() * noise).to(config.device)
    t, noise, tokens = t.to(config.device), noise.to(config.device), tokens.to(config.device)
    prediction = unet(zt, t, text_encoder(tokens).last_hidden_state).sample
    loss = (prediction.float() - noise).pow(2).mean()
    return loss, loss


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, device: str = "cpu", batch: int = 128) -> torch.Tensor:
    """Unscaled latent means of every image, on the CPU, in float32."""
    return torch.cat(
        [
            vae.encode(to_unit(pixels[i : i + batch]).to(device)).latent_dist.mean.float().cpu()
            for i in range(0, len(pixels), batch)
        ]
    )


class Checkpoints:
    """The training state in one folder: ``state.pt`` (replaced atomically) and, once the VAE is
    trained, ``latents.pt`` (the scaled latents of every scene, written once)."""

    def __init__(self, folder: Path | str, config: TrainingConfig):
        self.folder = Path(folder)
        self.config = config

    def load(self) -> dict | None:
        path = self.folder / "state.pt"
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["config"]
        differs = {
            k: (saved.get(k), v)
            for k, v in _plain(self.config).items()
            if saved.get(k) != v and k not in RESUMABLE_CHANGES
        }
        if differs:
            named = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differs.items())
            raise ValueError(
                f"{path} holds a training of another recipe ({named}): "
                "give another --checkpoints folder, or delete this one to start again"
            )
        return state

    def _write(self, name: str, value) -> None:
        """``torch.save`` to a partial file, then renamed: a kill mid-write leaves the last whole."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"{name}.{os.getpid()}.partial"
        torch.save(value, partial)
        os.replace(partial, self.folder / name)

    def save(self, state: dict) -> None:
        self._write("state.pt", {**state, "config": _plain(self.config)})

    def save_latents(self, latents: torch.Tensor) -> None:
        self._write("latents.pt", latents)

    def load_latents(self) -> torch.Tensor:
        return torch.load(self.folder / "latents.pt", map_location="cpu")


def _plain(config: TrainingConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


class Stopped(Exception):
    """The training reached ``max_seconds`` and saved its state: run it again to go on."""


class Training:
    """One sitting of a training: the models, the state saved so far, and where to save it."""

    def __init__(self, config: TrainingConfig, store: Checkpoints, max_seconds: float | None, progress: bool):
        self.config, self.store, self.progress = config, store, progress
        self.started = time.perf_counter()
        self.deadline = time.monotonic() + (math.inf if max_seconds is None else max_seconds)
        self.tokenizer, text_encoder, vae, unet = build_components(config)
        self.parts = {"vae": vae, "unet": unet, "text_encoder": text_encoder}
        self.state = store.load() or {"seconds": 0.0}
        self.seconds_before = self.state["seconds"]
        for name, weights in self.state.get("weights", {}).items():
            self.parts[name].load_state_dict(weights)
        if "scaling_factor" in self.state:
            vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        for model in self.parts.values():
            model.to(config.device)

    def save(self) -> None:
        self.state["weights"] = {name: model.state_dict() for name, model in self.parts.items()}
        self.state["seconds"] = self.seconds_before + time.perf_counter() - self.started
        self.store.save(self.state)

    def phase(
        self, name: str, loss_fn, models: list[str], lr: float, weight_decay: float, steps: int, seed: int
    ):
        """``steps`` AdamW steps of ``loss_fn(generator) -> (loss, logged)`` with a cosine schedule,
        resumed from the saved state when there is one, checkpointed every ``checkpoint_every``."""
        config = self.config
        params = [p for m in models for p in self.parts[m].parameters()]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, steps))
        generator = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        seconds, began = 0.0, time.perf_counter()  # this phase's, over every sitting
        if saved := self.state.get(name):
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            generator.set_state(saved["generator"])
            losses, seconds = list(saved["losses"]), saved.get("seconds", 0.0)
        for m in models:
            self.parts[m].train()
        with tqdm(total=steps, initial=len(losses), desc=name, disable=not self.progress) as bar:
            for step in range(len(losses), steps):
                failpoint(f"training.{name}.{step}")
                with torch.autocast(config.device, torch.bfloat16, enabled=config.dtype == "bfloat16"):
                    loss, logged = loss_fn(generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                losses.append(logged.item())
                bar.update()
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}")
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == steps:
                    self.state[name] = {
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "generator": generator.get_state(),
                        "losses": losses,
                        "seconds": seconds + time.perf_counter() - began,
                    }
                    self.save()
                    if time.monotonic() > self.deadline and step + 1 < steps:
                        raise Stopped(f"stopped after {name} step {step + 1} of {steps}; run again to go on")
        for m in models:
            self.parts[m].eval()


def train_world_model(
    folder: Path | str,
    config: TrainingConfig = TrainingConfig(),
    progress: bool = True,
    checkpoints: Path | str | None = None,
    max_seconds: float | None = None,
) -> Path:
    """Train the world's model (or go on with the training saved in ``checkpoints``, by default
    ``<folder>.checkpoints``) and save it in diffusers layout (fp16 safetensors) with
    ``training.json``: the recipe, the loss curves and the time it took. Raises ``Stopped`` once
    ``max_seconds`` have passed, after a checkpoint."""
    from pipeline.world.tiny import save_checkpoint, sd_scheduler

    torch.set_num_threads(config.threads)
    folder = Path(folder)
    store = Checkpoints(checkpoints or folder.with_name(folder.name + ".checkpoints"), config)
    run = Training(config, store, max_seconds, progress)
    vae, unet, text_encoder = run.parts["vae"], run.parts["unet"], run.parts["text_encoder"]
    pixels, captions = render_scenes(
        config.scenes, config.resolution, config.seed, config.max_objects, config.size_jitter
    )

    def vae_batch(g):
        return vae_loss(vae, pixels[torch.randint(len(pixels), (config.vae_batch,), generator=g)], config, g)

    run.phase("vae", vae_batch, ["vae"], config.vae_lr, 0.0, config.vae_steps, config.seed)
    if "scaling_factor" not in run.state:  # 1/std of the latents, as Stable Diffusion's was chosen
        latents = encode_latents(vae, pixels, config.device)
        run.state["scaling_factor"] = float(1 / latents.std())
        store.save_latents(latents * run.state["scaling_factor"])
        vae.register_to_config(scaling_factor=run.state["scaling_factor"])
    latents = store.load_latents()
    scheduler = sd_scheduler()  # the noise schedule the model is saved with
    tokenize = run.tokenizer
    ids = tokenize(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenize([""], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def unet_batch(g):
        pick = torch.randint(len(latents), (config.unet_batch,), generator=g)
        tokens = ids[pick].clone()
        tokens[torch.rand(len(pick), generator=g) < config.caption_dropout] = empty
        return denoising_loss(unet, text_encoder, latents[pick], tokens, scheduler, config, g)

    run.phase(
        "unet", unet_batch, ["unet", "text_encoder"], config.unet_lr, 1e-2, config.unet_steps, config.seed + 1
    )
    for model in run.parts.values():
        model.to("cpu", torch.float32)
    save_checkpoint(folder, vae, text_encoder, run.tokenizer, unet, dtype=torch.float16)
    write_record(folder, config, run.state)
    return folder


def curve(losses: list[float], every: int = 50) -> list[float]:
    """Means of consecutive windows of ``every`` steps: the loss curve, small enough to keep."""
    return [float(np.mean(losses[i : i + every])) for i in range(0, len(losses), every)]


def write_record(folder: Path, config: TrainingConfig, state: dict) -> None:
    vae, unet = state.get("vae", {}).get("losses", []), state.get("unet", {}).get("losses", [])
    record = {
        "config": _plain(config),
        "vae_mse_last_100": float(np.mean(vae[-100:])) if vae else None,
        "unet_loss_last_100": float(np.mean(unet[-100:])) if unet else None,
        "seconds": round(state["seconds"], 1),
        "vae_seconds": round(state.get("vae", {}).get("seconds", 0.0), 1),
        "unet_seconds": round(state.get("unet", {}).get("seconds", 0.0), 1),
        "torch": torch.__version__,
        "curves": {"every": 50, "vae_mse": curve(vae), "unet_loss": curve(unet)},
    }
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
