"""Stable Diffusion checkpoints: where one comes from and what it is, readable without torch.

A checkpoint is a diffusers-layout folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; SDXL adds ``text_encoder_2/`` and
``tokenizer_2/``; SD3 has ``transformer/`` for ``unet/`` and three text encoders and tokenizers)
with safetensors weights; pickled weights are never loaded. It can be a local folder, an fsspec
URI (copied once into a local cache) or a hub id.

Three families: ``sd`` (SD 1.x/2.x: one CLIP text encoder), ``sdxl`` (two text encoders and the
UNet's ``text_time`` added conditioning), told apart by the UNet's config, and ``sd3`` (SD3 and
3.5: a flow-matching transformer, two CLIP encoders and T5), by its ``transformer/``. Nothing here imports
torch, diffusers or transformers: the driver reads a checkpoint's family and resolution from its
config files alone (``model_family``, ``model_resolution``); only the actors load one
(``models.load_stable_diffusion``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import ModelError

WEIGHTED = ("unet", "vae", "text_encoder")
FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3"}


def family_of(denoiser_config: dict) -> str:
    """``sd3`` for SD3's joint-attention transformer, ``sdxl`` for a UNet with SDXL's added
    text-and-time conditioning, else ``sd``."""
    if "joint_attention_dim" in denoiser_config:
        return "sd3"
    return "sdxl" if denoiser_config.get("addition_embed_type") == "text_time" else "sd"


def denoiser_part(family: str) -> str:
    """The folder of the model that predicts: SD3's transformer, the others' UNet."""
    return "transformer" if family == "sd3" else "unet"


def weighted_parts(family: str) -> tuple[str, ...]:
    if family == "sd3":
        return ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    return (*WEIGHTED, "text_encoder_2") if family == "sdxl" else WEIGHTED


def tokenizer_parts(family: str) -> tuple[str, ...]:
    return ("tokenizer", "tokenizer_2", "tokenizer_3")[: {"sd": 1, "sdxl": 2, "sd3": 3}[family]]


def control_problem(family: str, control: str) -> str | None:
    """Why ``control`` cannot run on a model of ``family``, or None: Prompt-to-Prompt control works
    on the UNets' cross-attention (SD 1.x/2.x, SDXL); SD3's joint attention is not supported."""
    if control == "none" or family != "sd3":
        return None
    return (
        f"attention control (control={control}) works on the UNet families (sd, sdxl), not on "
        f"{FAMILIES[family]}'s joint-attention transformer: use control=none with this model"
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("PTI_CACHE", Path.home() / ".cache" / "pti"))


def check_checkpoint(folder: Path, ref: str, weights: bool = True) -> str:
    """The family of a diffusers Stable Diffusion checkpoint with safetensors (with ``weights``;
    without, its configs alone); anything else is refused, naming what is missing."""
    configs = [folder / part / "config.json" for part in ("unet", "transformer")]
    found = [c for c in configs if c.is_file()]
    family = family_of(json.loads(found[0].read_text())) if found else "sd"
    weighted = weighted_parts(family)
    missing = [
        name
        for name in ("model_index.json", *(f"{c}/config.json" for c in weighted))
        if not (folder / name).is_file()
    ]
    missing += [c + "/" for c in (*tokenizer_parts(family), "scheduler") if not (folder / c).is_dir()]
    if missing:
        raise ModelError(
            f"{ref!r} is not a diffusers Stable Diffusion checkpoint: missing {', '.join(missing)}"
        )
    unsafe = [c for c in weighted if weights and not any((folder / c).glob("*.safetensors"))]
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


# A diffusers Stable Diffusion checkpoint (SD3's T5 in shards, with their index): no pickled or
# single-file checkpoints, fp16 or non-EMA variants, nor the safety checker.
STABLE_DIFFUSION = Layout(
    files=(
        "model_index.json",
        "*/config.json",
        "*/*.safetensors",
        "*/*.safetensors.index.json",
        "tokenizer/*",
        "tokenizer_2/*",
        "tokenizer_3/*",
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


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE``, read now: huggingface_hub reads it once, at import, so a later setting
    would not count."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_resolution(ref: str, cache_dir: Path | None = None, storage_options: dict | None = None) -> int:
    """The image size a checkpoint was trained at, from three small files alone (its index, its
    denoiser's and its VAE's configs): no weights are read or downloaded (the driver calls this;
    only the actors load models)."""
    denoiser = denoiser_config(ref, cache_dir, storage_options)
    vae = read_model_json(ref, "vae/config.json", cache_dir, storage_options)
    return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def model_family(ref: str, cache_dir: Path | None = None, storage_options: dict | None = None) -> str:
    """A checkpoint's family (``FAMILIES``), from its denoiser's config alone (for the driver)."""
    return family_of(denoiser_config(ref, cache_dir, storage_options))


def denoiser_config(ref: str, cache_dir: Path | None = None, storage_options: dict | None = None) -> dict:
    """The config of a checkpoint's UNet, or of SD3's transformer where ``model_index.json`` lists one."""
    index = read_model_json(ref, "model_index.json", cache_dir, storage_options)
    part = "transformer" if "transformer" in index else "unet"
    return read_model_json(ref, f"{part}/config.json", cache_dir, storage_options)


def read_model_json(
    ref: str, name: str, cache_dir: Path | None = None, storage_options: dict | None = None
) -> dict:
    """The JSON file ``name`` of a checkpoint (``vae/config.json``): read from a folder or an fsspec
    URI, or for a hub id that one file downloaded (into the same cache as the model)."""
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
