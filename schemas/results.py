"""The results table: one row per (id, target prompt, eta) edit written."""

from __future__ import annotations

import pyarrow as pa

ID = "id"
TARGET_INDEX = "target_index"
TARGET_PROMPT = "target_prompt"
INSTRUCTION = "instruction"  # the manifest's instruction for this target (its instructions); null: none
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
# The edit's scores, with a scorer (RunConfig.scorer; null without one). The four CLIP
# similarities are InstructPix2Pix's (pipeline/engine/scoring.py), cosines of L2-normalised CLIP
# features in [-1, 1], higher is more alike:
CLIP_SIM_0 = "clip_sim_0"  # the input image against the source prompt: does the caption fit the input?
CLIP_SIM_1 = "clip_sim_1"  # the edit against its target prompt: does it show the target?
CLIP_SIM_DIR = "clip_sim_dir"  # the image's change against the prompts' change: did it change as asked?
CLIP_SIM_IMAGE = "clip_sim_image"  # the edit against the input: how much of the image it keeps
# SSIM of the edit against the input, in [-1, 1] (1: unchanged), no weights: structure kept.
INPUT_SSIM = "input_ssim"
# clip_sim_0 and clip_sim_dir are null for a row without a source prompt; all but clip_sim_1 are
# null for an image whose stored stage-1 row predates stored inputs (schemas/embeddings.py IMAGE).
SCORES = (CLIP_SIM_0, CLIP_SIM_1, CLIP_SIM_DIR, CLIP_SIM_IMAGE, INPUT_SSIM)
# The edit's verdict by the run's thresholds (RunConfig.curate, pipeline/batch/curate.py): kept
# for a training set or not (null: no scores), and each score under its threshold when not.
KEPT = "kept"
REJECTED_BY = "rejected_by"  # e.g. "clip_sim_dir 0.13 < 0.2; clip_sim_image 0.62 < 0.7"

# What names one edit (its image is images/{id}/{target_index}-{eta}.png): one row per key.
KEY = (ID, TARGET_INDEX, ETA)

RESULTS_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(TARGET_INDEX, pa.int32(), nullable=False),
        pa.field(TARGET_PROMPT, pa.string(), nullable=False),
        pa.field(INSTRUCTION, pa.string()),
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
        *(pa.field(name, pa.float32()) for name in SCORES),
        pa.field(KEPT, pa.bool_()),
        pa.field(REJECTED_BY, pa.string()),
    ]
)
