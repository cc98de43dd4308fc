"""The training set ``jobs.dataset`` writes: one row per kept edit selected from the results table
(``pipeline/batch/dataset.py``), as Parquet that ``datasets.load_dataset("parquet", ...)`` decodes
to PIL images and plain pyarrow reads.

The image columns are Hugging Face ``datasets`` ``Image`` features, the Arrow struct ``{bytes,
path}``: the PNG's bytes (a self-contained set: a trainer reads no other store) and, for the edit,
its URI in the output. The schema carries the ``"huggingface"`` metadata that makes
``load_dataset`` decode them (``datasets.Features.from_arrow_schema``). The column names are those
diffusers' ``examples/instruct_pix2pix/train_instruct_pix2pix.py`` reads by default
(``input_image``, ``edited_image``, ``edit_prompt``), then the captions, scores and settings, as
UltraEdit releases them.
"""

from __future__ import annotations

import pyarrow as pa

from schemas import results as res

INPUT_IMAGE = "input_image"  # the input as stage 1 saw it (the edits' size), PNG; path null
EDITED_IMAGE = "edited_image"  # the edit, PNG; path: its URI in the output's images/
EDIT_PROMPT = "edit_prompt"  # the instruction where the manifest gives one, else the target prompt
INSTRUCTION = res.INSTRUCTION  # the manifest's instruction for this target; null where it gives none
SOURCE_PROMPT = "source_prompt"  # the input's caption (null: the manifest gave none)
TARGET_PROMPT = res.TARGET_PROMPT  # the edit's caption
RANK = "rank"  # 1 for the best kept edit of its (id, target_index) by the ranking score, then 2, ...
METHOD = "method"  # how the image was inverted (pti, ddim, nti, npi)
MODEL = "model"  # the checkpoint that made the edit, as the run named it

# Columns in order; the image features are datasets.Image(), the rest plain values.
IMAGES = (INPUT_IMAGE, EDITED_IMAGE)
VALUES = {
    res.ID: "string",
    res.TARGET_INDEX: "int32",
    EDIT_PROMPT: "string",
    INSTRUCTION: "string",
    SOURCE_PROMPT: "string",
    TARGET_PROMPT: "string",
    RANK: "int32",
    **{score: "float32" for score in res.SCORES},
    res.ETA: "float32",
    res.GUIDANCE: "float32",
    METHOD: "string",
    MODEL: "string",
    res.CONFIG_FINGERPRINT: "string",
}


def features():
    """The set's ``datasets.Features``: its Arrow schema (``.arrow_schema``) carries the
    ``"huggingface"`` metadata key that makes ``load_dataset`` decode the images."""
    import datasets  # the writer's only: reading the set needs pyarrow alone

    return datasets.Features(
        {
            **{name: datasets.Image() for name in IMAGES},
            **{name: datasets.Value(dtype) for name, dtype in VALUES.items()},
        }
    )


def dataset_schema() -> pa.Schema:
    """The Arrow schema of every file of the set, with its ``"huggingface"`` metadata."""
    return features().arrow_schema
