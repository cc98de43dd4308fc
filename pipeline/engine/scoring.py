"""Scoring edits for dataset curation (issue 24): CLIP similarities of each edit, as the public
generators of instruction-editing sets score theirs, and a structure score that needs no weights.

InstructPix2Pix's generator (timothybrooks/instruct-pix2pix, ``metrics/clip_similarity.py``)
scores a candidate pair (input image 0, edited image 1; input caption 0, output caption 1) with
L2-normalised CLIP features:

- ``clip_sim_0`` = cos(image 0, caption 0), ``clip_sim_1`` = cos(image 1, caption 1),
- ``clip_sim_dir`` = cos(image 1 - image 0, caption 1 - caption 0): the change of the image
  against the change of the text,
- ``clip_sim_image`` = cos(image 0, image 1),

its images resized bicubic (no antialiasing) to the encoder's side and normalised by CLIP's mean
and std, its text truncated at CLIP's 77 tokens. ``clip_similarities`` is that computation, from
features, so a stage can encode each input and each prompt once however many edits share them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.engine.checkpoints import Layout, fetch_checkpoint
from pipeline.engine.models import resolve_device, resolve_dtype
from pipeline.errors import ModelError
from schemas.results import SCORES  # what each score means

# The default scorer: the CLIP InstructPix2Pix and UltraEdit score with (ViT-L/14, 224 px).
DEFAULT_SCORER = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_scorer(folder: Path, ref: str, weights: bool = True) -> None:
    """Refuse a folder that is not a transformers CLIP checkpoint with safetensors weights (with
    ``weights``; without, its configs and tokenizer alone)."""
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        missing.append("tokenizer.json or vocab.json")
    if missing:
        listed = ", ".join(missing)
        raise ModelError(f"scorer {ref!r} is not a transformers CLIP checkpoint: missing {listed}")
    if weights and not any(folder.glob("*.safetensors")):
        raise ModelError(
            f"scorer {ref!r} has no safetensors weights; pickled weights are never loaded "
            "(convert them with transformers' save_pretrained(safe_serialization=True))"
        )


# A transformers CLIP checkpoint (hub, object store or folder): weights in safetensors only.
CLIP_LAYOUT = Layout(
    files=(
        "config.json",
        "preprocessor_config.json",
        "*.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    ),
    not_files=("*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5"),
    marker="config.json",
    check=check_scorer,
)


def normalized(features: Tensor) -> Tensor:
    """Features scaled to unit length, as the reference does before any similarity."""
    return features / features.norm(dim=-1, keepdim=True)


def clip_similarities(image_0: Tensor, image_1: Tensor, text_0: Tensor, text_1: Tensor) -> dict[str, Tensor]:
    """The four scores of InstructPix2Pix's ``ClipSimilarity.forward`` per row, from normalised
    features ``[B, D]`` of the input and edited images and of the input and output captions.
    ``F.cosine_similarity`` as the reference: an edit that changes nothing has ``clip_sim_dir``
    0 (its norm is clamped by eps), not NaN."""
    return {
        "clip_sim_0": F.cosine_similarity(image_0, text_0),
        "clip_sim_1": F.cosine_similarity(image_1, text_1),
        "clip_sim_dir": F.cosine_similarity(image_1 - image_0, text_1 - text_0),
        "clip_sim_image": F.cosine_similarity(image_0, image_1),
    }


@dataclass
class Scorer:
    """A CLIP model and its tokenizer, on one device, encoding images and prompts as the
    reference does (see the module's docstring)."""

    model: "object"  # transformers.CLIPModel
    tokenizer: "object"  # transformers.CLIPTokenizer
    side: int  # the image encoder's input side (224 for ViT-L/14)
    mean: Tensor  # [3, 1, 1], CLIP's normalisation
    std: Tensor

    @classmethod
    def of(cls, model, tokenizer, processor: dict) -> Scorer:
        """A scorer of a CLIP model on its device, with the side, mean and std of its image
        processor's config (``preprocessor_config.json``)."""
        side = processor.get("crop_size", model.config.vision_config.image_size)
        side = side["height"] if isinstance(side, dict) else int(side)
        mean, std = (
            torch.tensor(processor.get(key, default), device=model.device).reshape(3, 1, 1)
            for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD))
        )
        return cls(model, tokenizer, side, mean, std)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def pixel_values(self, pixels: Tensor) -> Tensor:
        """The encoder's input for RGB images ``[B, 3, H, W]`` in ``[0, 1]``: resized bicubic to
        ``side`` (square, no antialiasing) and normalised, as the reference does. By hand because
        transformers' ``CLIPImageProcessor`` resizes on the CPU through PIL, one image at a time,
        and its fast variant needs torchvision. (The world's CLIP trains on exactly this.)"""
        images = F.interpolate(pixels.to(self.device, torch.float32), size=self.side, mode="bicubic")
        return ((images - self.mean) / self.std).to(self.model.dtype)

    def input_ids(self, prompts: list[str]) -> Tensor:
        """Prompts' tokens, truncated at the encoder's 77 tokens and padded to them, for use
        without an attention mask, as the reference's ``clip.tokenize``: the causal encoder's
        features at the end token never see the padding after it."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def image_features(self, pixels: Tensor) -> Tensor:
        """Normalised features ``[B, D]`` of RGB images ``[B, 3, H, W]`` in ``[0, 1]`` (with
        gradients: what the world's CLIP trains on)."""
        return normalized(_projected(self.model.get_image_features(pixel_values=self.pixel_values(pixels))))

    def text_features(self, input_ids: Tensor) -> Tensor:
        """Normalised features ``[B, D]`` of tokenised prompts (``input_ids``)."""
        return normalized(_projected(self.model.get_text_features(input_ids=input_ids)))

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        return self.image_features(pixels)

    @torch.no_grad()
    def encode_texts(self, prompts: list[str]) -> Tensor:
        return self.text_features(self.input_ids(prompts))


def _projected(output) -> Tensor:
    """The projected features of ``CLIPModel.get_*_features``, in float32: transformers 5 returns
    them as the output's ``pooler_output``, earlier versions as a tensor."""
    return (output if isinstance(output, Tensor) else output.pooler_output).float()


def scorer_folder(
    ref: str, storage_options: dict | None = None, cache_dir: Path | None = None, weights: bool = True
) -> Path:
    """The local folder of scorer ``ref`` (fetched into the cache once), checked to be a CLIP
    checkpoint; a ``ModelError`` naming ``ref`` otherwise. The driver calls it before any work."""
    folder = fetch_checkpoint(ref, cache_dir, storage_options, layout=CLIP_LAYOUT)
    check_scorer(folder, ref, weights)
    return folder


def load_scorer(
    ref: str = DEFAULT_SCORER,
    device: str = "auto",
    dtype: str = "auto",
    storage_options: dict | None = None,
    cache_dir: Path | None = None,
    weights: bool = True,
) -> Scorer:
    """A CLIP scorer from a hub id, a local folder or an object-store URI (transformers layout,
    safetensors); a ``ModelError`` naming ``ref`` when it cannot be reached or is not one.
    ``weights=False`` builds the model from its config alone, with random weights (seed 0) made on
    the device (on ``meta``: shapes alone), as ``models.load_stable_diffusion`` does."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = scorer_folder(ref, storage_options, cache_dir, weights)
    torch_device = resolve_device(device)
    try:
        if weights:
            model = CLIPModel.from_pretrained(folder, use_safetensors=True)
        else:
            torch.manual_seed(0)
            with torch_device:
                model = CLIPModel(CLIPConfig.from_pretrained(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(f"cannot load scorer {ref!r}: {type(exc).__name__}: {exc}") from exc
    model = model.to(torch_device, resolve_dtype(dtype, torch_device)).eval().requires_grad_(False)
    return Scorer.of(model, tokenizer, json.loads((folder / "preprocessor_config.json").read_text()))


def edit_scores(
    scorer: Scorer,
    edited: Tensor,
    targets: list[str],
    inputs: Tensor | None = None,
    image_of: list[int] | None = None,
    sources: list[str | None] | None = None,
) -> dict[str, list[float | None]]:
    """The scores of a batch of edits (``schemas/results.py`` names them): ``edited`` ``[E, 3, H,
    W]`` in ``[0, 1]`` with each edit's target prompt; ``inputs`` ``[B, 3, H, W]`` the input images
    (None: not stored, so only ``clip_sim_1`` is defined), ``image_of[e]`` edit ``e``'s input and
    ``sources[b]`` input ``b``'s source prompt (None: no caption, so no ``clip_sim_0`` or
    ``clip_sim_dir``). Each image and prompt is encoded once however many edits share it. A score
    that is not defined is None; one that is NaN or inf stays so, for the caller to refuse."""
    from pipeline.engine.metrics import ssim

    count = len(edited)
    edit_features = scorer.encode_images(edited)
    text_1 = _encode_each_once(scorer, targets)
    scores: dict[str, list] = {name: [None] * count for name in SCORES}
    scores["clip_sim_1"] = F.cosine_similarity(edit_features, text_1).tolist()
    if inputs is None:
        return scores
    image_0 = scorer.encode_images(inputs)[image_of]
    scores["clip_sim_image"] = F.cosine_similarity(image_0, edit_features).tolist()
    scores["input_ssim"] = ssim(edited.float().cpu(), inputs[image_of].float().cpu()).tolist()
    captioned = [e for e in range(count) if sources[image_of[e]] is not None]
    if captioned:
        text_0 = _encode_each_once(scorer, [sources[image_of[e]] for e in captioned])
        pairs = clip_similarities(image_0[captioned], edit_features[captioned], text_0, text_1[captioned])
        for name in ("clip_sim_0", "clip_sim_dir"):
            for e, value in zip(captioned, pairs[name].tolist()):
                scores[name][e] = value
    return scores


def _encode_each_once(scorer: Scorer, prompts: list[str]) -> Tensor:
    """Features of ``prompts`` in order, each distinct prompt encoded once."""
    distinct = list(dict.fromkeys(prompts))
    return scorer.encode_texts(distinct)[[distinct.index(p) for p in prompts]]
