"""Stable Diffusion components: loading a checkpoint from anywhere, and the UNet as ``eps``.

A checkpoint is a diffusers-layout folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; SDXL adds ``text_encoder_2/`` and
``tokenizer_2/``) with safetensors weights; pickled weights are never loaded. It can be a local
folder, an fsspec URI (copied once into a local cache) or a hub id.

Two families: ``sd`` (SD 1.x/2.x: one CLIP text encoder) and ``sdxl`` (two text encoders and the
UNet's ``text_time`` added conditioning). SDXL's conditional embedding is a pair, token embeddings
``[L, D]`` and a pooled embedding ``[P]``; everywhere inside the engine it travels as one tensor
``[L + 1, D]`` whose last row holds the pooled embedding, zero-padded (``join_pooled``). Every step
of the algorithm is row-wise or linear (guidance, interpolation, Adam), so the pair is tuned
jointly and interpolated with the same ``eta`` by the SD 1.x code unchanged, and the padding stays
exactly zero (its gradient is zero); the UNet call splits the pair again (``split_pooled``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from pipeline.errors import ModelError

log = logging.getLogger(__name__)

WEIGHTED = ("unet", "vae", "text_encoder")
FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL"}


def family_of(unet_config: dict) -> str:
    """``sdxl`` for a UNet with SDXL's added text-and-time conditioning, else ``sd``."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"


def weighted_parts(family: str) -> tuple[str, ...]:
    return (*WEIGHTED, "text_encoder_2") if family == "sdxl" else WEIGHTED


def join_pooled(tokens: Tensor, pooled: Tensor) -> Tensor:
    """SDXL's pair as one tensor: ``tokens [..., L, D]`` and ``pooled [..., P]`` (``P <= D``) to
    ``[..., L + 1, D]``, the pooled embedding zero-padded in the last row."""
    row = torch.nn.functional.pad(pooled, (0, tokens.shape[-1] - pooled.shape[-1]))
    return torch.cat([tokens, row.unsqueeze(-2).to(tokens)], dim=-2)


def split_pooled(emb: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of ``join_pooled``: ``(tokens [..., L, D], pooled [..., P])``."""
    return emb[..., :-1, :], emb[..., -1, :pooled_dim]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("PTI_CACHE", Path.home() / ".cache" / "pti"))


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


def check_checkpoint(folder: Path, ref: str) -> str:
    """The family of a diffusers Stable Diffusion checkpoint with safetensors; anything else is
    refused, naming what is missing."""
    unet = folder / "unet" / "config.json"
    family = family_of(json.loads(unet.read_text())) if unet.is_file() else "sd"
    weighted = weighted_parts(family)
    missing = [
        name
        for name in ("model_index.json", *(f"{c}/config.json" for c in weighted))
        if not (folder / name).is_file()
    ]
    tokenizers = ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)
    missing += [c + "/" for c in (*tokenizers, "scheduler") if not (folder / c).is_dir()]
    if missing:
        raise ModelError(
            f"{ref!r} is not a diffusers Stable Diffusion checkpoint: missing {', '.join(missing)}"
        )
    unsafe = [c for c in weighted if not any((folder / c).glob("*.safetensors"))]
    if unsafe:
        raise ModelError(
            f"{ref!r} has no safetensors weights for {', '.join(unsafe)}; pickled weights are "
            "never loaded (convert them with diffusers' save_pretrained(safe_serialization=True))"
        )
    return family


@dataclass(frozen=True)
class Layout:
    """What one kind of checkpoint holds: the files a load needs (patterns, as
    ``huggingface_hub.snapshot_download`` takes them, for the hub and object stores alike), the
    files it never takes, a file every finished copy holds, and the check of a copied folder."""

    files: tuple[str, ...]
    not_files: tuple[str, ...]
    marker: str
    check: Callable[[Path, str], object]

    def needs(self, relative: str) -> bool:
        """Whether a load needs the file at ``relative`` (a path inside the checkpoint)."""
        return any(fnmatch.fnmatch(relative, p) for p in self.files) and not any(
            fnmatch.fnmatch(relative, p) for p in self.not_files
        )


# A diffusers Stable Diffusion checkpoint: no pickled or single-file checkpoints, fp16 or non-EMA
# variants, nor the safety checker.
STABLE_DIFFUSION = Layout(
    files=(
        "model_index.json", "*/config.json", "*/*.safetensors", "tokenizer/*", "tokenizer_2/*",
        "scheduler/*",
    ),
    not_files=("*.bin", "*.ckpt", "*.pt", "*.pth", "*non_ema*", "*.fp16.*", "safety_checker/*"),
    marker="model_index.json",
    check=check_checkpoint,
)


def needed_file(relative: str) -> bool:
    """Whether a diffusers load of a Stable Diffusion checkpoint needs the file at ``relative``."""
    return STABLE_DIFFUSION.needs(relative)


def fetch_checkpoint(
    ref: str,
    cache_dir: Path | None = None,
    storage_options: dict | None = None,
    layout: Layout = STABLE_DIFFUSION,
) -> Path:
    """A local folder for ``ref``: a folder path, an fsspec URI or a hub id."""
    cache_dir = Path(cache_dir or default_cache_dir())
    if Path(ref).expanduser().is_dir():
        return Path(ref).expanduser()
    if "://" in ref:
        dest = cache_dir / "models" / hashlib.sha256(ref.encode()).hexdigest()[:16]
        return _copy_from_uri(ref, dest, storage_options or {}, layout)
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelError(f"model {ref!r} is neither an existing folder, a URI nor a hub id (owner/name)")
    return _download_from_hub(ref, cache_dir, layout)


def _copy_from_uri(uri: str, dest: Path, storage_options: dict, layout: Layout) -> Path:
    """Copy a checkpoint from object storage once; a finished copy is renamed into place."""
    if (dest / layout.marker).is_file():
        return dest
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri, **storage_options)
        files = [f for f in fs.find(root) if layout.needs(os.path.relpath(f, root.rstrip("/")))]
    except Exception as exc:
        raise ModelError(f"cannot reach model {uri!r}: {type(exc).__name__}: {exc}") from exc
    if not files:
        raise ModelError(f"model {uri!r} is empty or does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    try:
        for remote in files:
            local = staging / os.path.relpath(remote, root.rstrip("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        layout.check(staging, uri)
        staging.rename(dest)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, ModelError) or (dest / layout.marker).is_file():
            if (dest / layout.marker).is_file():
                return dest  # another process finished the same copy first
            raise
        raise ModelError(f"cannot copy model {uri!r}: {type(exc).__name__}: {exc}") from exc
    return dest


def _download_from_hub(repo_id: str, cache_dir: Path, layout: Layout) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                local_files_only=_hub_offline(),
                cache_dir=cache_dir / "hub",
                allow_patterns=list(layout.files),
                ignore_patterns=list(layout.not_files),
            )
        )
    except Exception as exc:
        raise ModelError(
            f"cannot reach model {repo_id!r} on the hub ({type(exc).__name__}: {exc}). "
            "This machine may be offline: pass a local folder or an s3:// URI with --model"
        ) from exc


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
        for module in (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2)
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


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE``, read now: huggingface_hub reads it once, at import, so a later setting
    would not count."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_resolution(ref: str, cache_dir: Path | None = None, storage_options: dict | None = None) -> int:
    """The image size a checkpoint was trained at, from two config files alone: no weights are
    read or downloaded (the driver calls this; only the actors load models)."""
    unet, vae = (read_model_config(ref, name, cache_dir, storage_options) for name in ("unet", "vae"))
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def model_family(ref: str, cache_dir: Path | None = None, storage_options: dict | None = None) -> str:
    """A checkpoint's family (``FAMILIES``), from its UNet's config alone (for the driver)."""
    return family_of(read_model_config(ref, "unet", cache_dir, storage_options))


def read_model_config(
    ref: str, component: str, cache_dir: Path | None = None, storage_options: dict | None = None
) -> dict:
    """``{component}/config.json`` of a checkpoint: read from a folder or an fsspec URI, or for a
    hub id that one file downloaded (into the same cache as the model)."""
    name = f"{component}/config.json"
    if "://" in ref or Path(ref).expanduser().is_dir():
        import fsspec

        uri = ref if "://" in ref else str(Path(ref).expanduser())
        try:
            with fsspec.open(f"{uri.rstrip('/')}/{name}", "r", **(storage_options or {})) as f:
                return json.load(f)
        except Exception as exc:
            raise ModelError(f"cannot read {name} of model {ref!r}: {type(exc).__name__}: {exc}") from exc
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelError(f"model {ref!r} is neither an existing folder, a URI nor a hub id (owner/name)")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            ref,
            name,
            cache_dir=Path(cache_dir or default_cache_dir()) / "hub",
            local_files_only=_hub_offline(),
        )
        return json.loads(Path(path).read_text())
    except Exception as exc:
        raise ModelError(
            f"cannot read {name} of model {ref!r} from the hub ({type(exc).__name__}: {exc}). "
            "This machine may be offline: pass a local folder or an s3:// URI with --model"
        ) from exc


def fingerprint_files(folder: Path) -> str:
    """A content hash of a checkpoint's configs, tokenizer and weights."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix not in {".json", ".txt", ".safetensors"}:
            continue
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass
class StableDiffusion:
    """The separate components of one checkpoint, on one device, in inference mode. ``dtype`` is
    the UNet's and the text encoders'; the VAE's is ``vae.dtype`` (float32 where its config says
    ``force_upcast``: see ``vae_dtype``). SDXL has a second text encoder and tokenizer, and may ask
    for zeros as the empty prompt's embedding (``force_zeros_for_empty_prompt``)."""

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

    @property
    def family(self) -> str:
        return "sd" if self.text_encoder_2 is None else "sdxl"

    @property
    def pooled_dim(self) -> int | None:
        """SDXL's pooled embedding width (the second encoder's projection), else None."""
        return None if self.text_encoder_2 is None else int(self.text_encoder_2.config.projection_dim)

    @property
    def token_embedding_shape(self) -> tuple[int, int]:
        """``(L, D)`` of one embedding's token part, as stored (SDXL's pooled row apart)."""
        return int(self.text_encoder.config.max_position_embeddings), int(
            self.unet.config.cross_attention_dim
        )

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
) -> StableDiffusion:
    """Load a Stable Diffusion 1.x/2.x or SDXL checkpoint from a folder, an fsspec URI or a hub id."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = fetch_checkpoint(ref, cache_dir, storage_options)
    family = check_checkpoint(folder, ref)
    second = {}
    try:
        kwargs = dict(torch_dtype=torch_dtype, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", **{**kwargs, "torch_dtype": vae_dtype(folder, torch_dtype)}
        )
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        if family == "sdxl":
            second = dict(
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    folder, subfolder="text_encoder_2", **kwargs
                ),
                tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
                force_zeros_for_empty_prompt=bool(
                    json.loads((folder / "model_index.json").read_text()).get("force_zeros_for_empty_prompt")
                ),
            )
    except Exception as exc:
        raise ModelError(f"cannot load model {ref!r} from {folder}: {type(exc).__name__}: {exc}") from exc
    for module in (unet, vae, text_encoder, second.get("text_encoder_2")):
        if module is not None:
            module.requires_grad_(False).eval().to(torch_device)
    if family == "sdxl" and second["text_encoder_2"].config.projection_dim > unet.config.cross_attention_dim:
        raise ModelError(f"model {ref!r}: its pooled embedding is wider than its token embeddings")
    return StableDiffusion(
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


class NoisePredictor:
    """The UNet as the algorithm's ``eps(z, t, emb)``: the latents' dtype (float32) in and out,
    the model's dtype inside.

    v-prediction checkpoints (SD 2.x at 768) are turned into epsilon predictions. ``calls`` counts
    UNet calls (a batch is one call) and ``evaluations`` the batch rows they evaluated, for the cost
    accounting of ALGORITHM.md.
    """

    def __init__(self, sd: StableDiffusion):
        self.unet, self.dtype, self.pooled_dim = sd.unet, sd.dtype, sd.pooled_dim
        # SDXL's size conditioning is the same at every call: made once, not a host-to-device copy per call.
        self.time_ids = None if sd.pooled_dim is None else sd.add_time_ids(1)
        self.prediction_type = sd.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"prediction_type {self.prediction_type!r} is not supported")
        self.alphas_cumprod = sd.scheduler.alphas_cumprod
        self.calls = self.evaluations = 0

    def __call__(self, z: Tensor, t: int, emb: Tensor) -> Tensor:
        self.calls += 1
        self.evaluations += len(z)
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
