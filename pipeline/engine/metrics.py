"""Reconstruction quality, per image, from torchmetrics."""

from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB per image of two ``[B, 3, H, W]`` batches in ``[0, 1]``."""
    return peak_signal_noise_ratio(
        a.float(), b.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    ).reshape(-1)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per image of two ``[B, 3, H, W]`` batches in ``[0, 1]``."""
    return structural_similarity_index_measure(
        a.float(), b.float(), data_range=1.0, reduction="none"
    ).reshape(-1)
