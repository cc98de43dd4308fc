"""Reconstruction quality, per image, from torchmetrics.

torchmetrics is imported on first use, not with this module: importing it loads every metric
family and scipy.signal (and matplotlib where installed), 1 to 3 s of a process's start that an
editing actor, which never measures, and the driver need not pay."""

from __future__ import annotations

from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB per image of two ``[B, 3, H, W]`` batches in ``[0, 1]``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        a.float(), b.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    ).reshape(-1)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per image of two ``[B, 3, H, W]`` batches in ``[0, 1]``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        a.float(), b.float(), data_range=1.0, reduction="none"
    ).reshape(-1)
