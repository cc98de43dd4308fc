"""The results table: one row per (id, target prompt, eta) edit written."""

from __future__ import annotations

import pyarrow as pa

ID = "id"
TARGET_INDEX = "target_index"
TARGET_PROMPT = "target_prompt"
ETA = "eta"
GUIDANCE = "guidance"
IMAGE_URI = "image_uri"
RECONSTRUCTION_PSNR = "reconstruction_psnr"  # of the image's stage-1 reconstruction, dB
RECONSTRUCTION_SSIM = "reconstruction_ssim"
TUNE_SECONDS = "tune_seconds"  # the image's share of its stage-1 batch
EDIT_SECONDS = "edit_seconds"  # the edit's share of its stage-2 call
CONFIG_FINGERPRINT = "config_fingerprint"
TUNE_WORKER = "tune_worker"  # the Ray actor that tuned the image
EDIT_WORKER = "edit_worker"  # the Ray actor that made the edit

# What names one edit (its image is images/{id}/{target_index}-{eta}.png): one row per key.
KEY = (ID, TARGET_INDEX, ETA)

RESULTS_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(TARGET_INDEX, pa.int32(), nullable=False),
        pa.field(TARGET_PROMPT, pa.string(), nullable=False),
        pa.field(ETA, pa.float32(), nullable=False),
        pa.field(GUIDANCE, pa.float32(), nullable=False),
        pa.field(IMAGE_URI, pa.string(), nullable=False),
        pa.field(RECONSTRUCTION_PSNR, pa.float32()),
        pa.field(RECONSTRUCTION_SSIM, pa.float32()),
        pa.field(TUNE_SECONDS, pa.float32()),
        pa.field(EDIT_SECONDS, pa.float32()),
        pa.field(CONFIG_FINGERPRINT, pa.string(), nullable=False),
        pa.field(TUNE_WORKER, pa.string()),
        pa.field(EDIT_WORKER, pa.string()),
    ]
)
