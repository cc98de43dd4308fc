"""Stable Diffusion components: loading a checkpoint onto a device, and the UNet as ``eps``.

Where a checkpoint comes from and what it holds (its layout and family, fetched from a folder, an
fsspec URI or a hub id) is ``checkpoints``, which the driver reads without torch; this module loads
one onto a device, in a dtype, for the processes that run it.

SDXL's conditional embedding is a pair, token embeddings ``[L, D]`` and a pooled embedding
``[P]``; everywhere inside the engine it travels as one tensor ``[L + 1, D]`` whose last row holds
the pooled embedding, zero-padded (``join_pooled``). Every step of the algorithm is row-wise or
linear (guidance, interpolation, Adam), so the pair is tuned jointly and interpolated with the same
``eta`` by the SD 1.x code unchanged, and the padding stays exactly zero (its gradient is zero);
the UNet call splits the pair again (``split_pooled``). SD3's pair is the joint prompt embedding
(``[77 + 256, D]``: both CLIPs' tokens, zero-padded to T5's width, then T5's) and the pooled
projection: it travels the same way, and its transformer takes the place of the UNet (``unet``).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor

from pipeline.engine.checkpoints import check_checkpoint, denoiser_part, fetch_checkpoint, fingerprint_files
from pipeline.errors import ModelError

log = logging.getLogger(__name__)


def join_pooled(tokens: Tensor, pooled: Tensor) -> Tensor:
    """SDXL's pair as one tensor: ``tokens [..., L, D]`` and ``pooled [..., P]`` (``P <= D``) to
    ``[..., L + 1, D]``, the pooled embedding zero-padded in the last row."""
    row = torch.nn.functional.pad(pooled, (0, tokens.shape[-1] - pooled.shape[-1]))
    return torch.cat([tokens, row.unsqueeze(-2).to(tokens)], dim=-2)


def split_pooled(emb: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of ``join_pooled``: ``(tokens [..., L, D], pooled [..., P])``."""
    return emb[..., :-1, :], emb[..., -1, :pooled_dim]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for, but torch sees no CUDA device")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on the CPU and fp16 on CUDA; half precision on the CPU is refused."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype != "float32":
        raise ModelError(f"dtype {dtype} needs a CUDA device; the CPU runs float32")
    return DTYPES[dtype]


def vae_dtype(folder: Path, dtype: torch.dtype) -> torch.dtype:
    """float32 for a VAE whose config says ``force_upcast`` (diffusers' default when the key is
    absent, as in SD 1.x's configs; SDXL's VAE overflows in float16), else the model's dtype."""
    config = json.loads((folder / "vae" / "config.json").read_text())
    return torch.float32 if config.get("force_upcast", True) else dtype


@contextmanager
def computing_in_float32(sd: "StableDiffusion"):
    """``sd`` computing in float32 inside the block: its modules get float32 copies of their
    weights, and their own tensors back after, untouched (the same storage, so a CUDA graph or a
    compiled module that captured them stays valid). Half-precision weights are float32 values
    exactly; what overflows in half precision is the activations, which then stay in float32."""
    tensors = [
        t
        for module in (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2, sd.text_encoder_3)
        if module is not None
        for t in chain(module.parameters(), module.buffers())
        if t.is_floating_point()
    ]
    originals = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.float()
        yield replace(sd, dtype=torch.float32)
    finally:
        for t, original in zip(tensors, originals):
            t.data = original


# T5's tokens in SD3's prompt embedding: StableDiffusion3Pipeline's default ``max_sequence_length``.
SD3_T5_TOKENS = 256


@dataclass
class StableDiffusion:
    """The separate components of one checkpoint, on one device, in inference mode. ``dtype`` is
    the UNet's and the text encoders'; the VAE's is ``vae.dtype`` (float32 where its config says
    ``force_upcast``: see ``vae_dtype``). SDXL has a second text encoder and tokenizer, and may ask
    for zeros as the empty prompt's embedding (``force_zeros_for_empty_prompt``). SD3 has three
    (CLIP-L, CLIP-G, T5), and its transformer in ``unet``: the model that predicts."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    ref: str
    fingerprint: str
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = False
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object = None

    @property
    def family(self) -> str:
        if "joint_attention_dim" in self.unet.config:
            return "sd3"
        return "sd" if self.text_encoder_2 is None else "sdxl"

    @property
    def pooled_dim(self) -> int | None:
        """The pooled embedding's width (SDXL: the second encoder's projection; SD3: the
        transformer's pooled projection, both CLIPs'), or None for SD 1.x/2.x."""
        if self.family == "sd3":
            return int(self.unet.config.pooled_projection_dim)
        return None if self.text_encoder_2 is None else int(self.text_encoder_2.config.projection_dim)

    @property
    def token_embedding_shape(self) -> tuple[int, int]:
        """``(L, D)`` of one embedding's token part, as stored (the pooled row apart)."""
        clip = int(self.text_encoder.config.max_position_embeddings)
        if self.family == "sd3":
            return clip + SD3_T5_TOKENS, int(self.unet.config.joint_attention_dim)
        return clip, int(self.unet.config.cross_attention_dim)

    def add_time_ids(self, batch: int) -> Tensor:
        """SDXL's size and crop conditioning: original = target = the model's resolution, crop
        (0, 0), as ``StableDiffusionXLPipeline`` at its default size; ``[batch, 6]``."""
        side = self.resolution
        ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=self.dtype, device=self.device)
        return ids.expand(batch, -1)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was trained at (512 for SD 1.x)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def load_stable_diffusion(
    ref: str,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    storage_options: dict | None = None,
    weights: bool = True,
) -> StableDiffusion:
    """Load a Stable Diffusion 1.x/2.x or SDXL checkpoint from a folder, an fsspec URI or a hub id.

    ``weights=False`` builds each part from its config alone, with random weights (seed 0) made on
    the device (on ``meta``: shapes without memory), from a folder that may hold no weights
    (``pipeline.world.architectures``): what the cost benchmarks measure."""
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
    from transformers import T5Tokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = fetch_checkpoint(ref, cache_dir, storage_options)
    family = check_checkpoint(folder, ref, weights)
    if not weights:
        torch.manual_seed(0)  # the random weights' seed: the parts are made in the order below

    def part(cls, subfolder: str, part_dtype: torch.dtype = torch_dtype):
        if weights:
            return cls.from_pretrained(
                folder, subfolder=subfolder, torch_dtype=part_dtype, use_safetensors=True
            )
        with torch_device:  # made where they run: faster than on the CPU, then moving; no memory on meta
            if hasattr(cls, "load_config"):  # diffusers
                module = cls.from_config(cls.load_config(folder, subfolder=subfolder))
            else:
                module = cls(cls.config_class.from_pretrained(folder, subfolder=subfolder))
        return module if module.dtype == part_dtype else module.to(part_dtype)

    second = {}
    sd3 = family == "sd3"
    try:
        unet = part(SD3Transformer2DModel if sd3 else UNet2DConditionModel, denoiser_part(family))
        vae = part(AutoencoderKL, "vae", vae_dtype(folder, torch_dtype))
        text_encoder = part(CLIPTextModelWithProjection if sd3 else CLIPTextModel, "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        scheduler = (FlowMatchEulerDiscreteScheduler if sd3 else DDIMScheduler).from_pretrained(
            folder, subfolder="scheduler"
        )
        if sd3:
            second = dict(
                text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2"),
                tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
                text_encoder_3=part(T5EncoderModel, "text_encoder_3"),
                tokenizer_3=T5Tokenizer.from_pretrained(folder, subfolder="tokenizer_3"),
            )
        if family == "sdxl":
            second = dict(
                text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2"),
                tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
                force_zeros_for_empty_prompt=bool(
                    json.loads((folder / "model_index.json").read_text()).get("force_zeros_for_empty_prompt")
                ),
            )
    except Exception as exc:
        raise ModelError(f"cannot load model {ref!r} from {folder}: {type(exc).__name__}: {exc}") from exc
    for module in (unet, vae, text_encoder, second.get("text_encoder_2"), second.get("text_encoder_3")):
        if module is not None:
            module.requires_grad_(False).eval().to(torch_device)
    sd = StableDiffusion(
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        torch_device,
        torch_dtype,
        ref,
        fingerprint_files(folder),
        **second,
    )
    # The pooled embedding travels as a last row of the token embeddings (join_pooled).
    if sd.pooled_dim is not None and sd.pooled_dim > sd.token_embedding_shape[1]:
        raise ModelError(f"model {ref!r}: its pooled embedding is wider than its token embeddings")
    return sd


class NoisePredictor:
    """The UNet as the algorithm's ``eps(z, t, emb)``: the latents' dtype (float32) in and out,
    the model's dtype inside.

    v-prediction checkpoints (SD 2.x at 768) are turned into epsilon predictions. ``calls`` counts
    UNet calls (a batch is one call) and ``evaluations`` the batch rows they evaluated, for the cost
    accounting of ALGORITHM.md.
    """

    def __init__(self, sd: StableDiffusion):
        self.unet, self.dtype, self.pooled_dim = sd.unet, sd.dtype, sd.pooled_dim
        self.flow = sd.family == "sd3"  # SD3's transformer predicts the flow's velocity, as is
        # SDXL's size conditioning is the same at every call: made once, not a host-to-device copy per call.
        self.time_ids = None if sd.family != "sdxl" else sd.add_time_ids(1)
        self.prediction_type = "flow" if self.flow else sd.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "flow"):
            raise ModelError(f"prediction_type {self.prediction_type!r} is not supported")
        self.alphas_cumprod = None if self.flow else sd.scheduler.alphas_cumprod
        self.calls = self.evaluations = 0

    def __call__(self, z: Tensor, t: float, emb: Tensor) -> Tensor:
        self.calls += 1
        self.evaluations += len(z)
        if self.flow:  # as StableDiffusion3Pipeline calls its transformer: the timestep per row
            tokens, pooled = split_pooled(emb, self.pooled_dim)
            timestep = torch.full((len(z),), float(t), device=z.device)  # float32, as the scheduler's
            out = self.unet(
                hidden_states=z.to(self.dtype),
                encoder_hidden_states=tokens.to(self.dtype),
                pooled_projections=pooled.to(self.dtype),
                timestep=timestep,
            ).sample
            return out.to(z.dtype)
        added = {}  # SD 1.x: none, so a wrapped UNet (benchmarks' compiled or graphed) takes the call
        if self.pooled_dim is not None:  # SDXL: the pair travels as one tensor (see join_pooled)
            emb, pooled = split_pooled(emb, self.pooled_dim)
            time_ids = self.time_ids.expand(len(z), -1)
            added = {"added_cond_kwargs": {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids}}
        out = self.unet(z.to(self.dtype), t, encoder_hidden_states=emb.to(self.dtype), **added).sample.to(
            z.dtype
        )
        if self.prediction_type == "v_prediction":
            a = float(self.alphas_cumprod[t])
            out = a**0.5 * out + (1 - a) ** 0.5 * z
        return out
