"""The rows that flow between the batch stages (Ray blocks, never stored): what the read stage
hands to tuning, and what editing hands to the image writer. Each carries the error columns of
``schemas.errors``: the row's place in its manifest, and its error (null while the row is good)."""

from __future__ import annotations

import pyarrow as pa

from schemas import manifest as man
from schemas import results as res
from schemas.errors import ERROR_FIELDS

PIXELS = "pixels"  # decoded RGB, uint8 [R, R, 3], as raw bytes between the read and tune stages
EDITED = "edited"  # an edit's RGB, uint8 [R, R, 3] raw bytes, between the edit and write stages

PREPARED_SCHEMA = pa.schema(
    [
        pa.field(man.ID, pa.string()),
        pa.field(man.SOURCE_PROMPT, pa.string()),
        pa.field(man.TARGET_PROMPTS, pa.list_(pa.string())),
        pa.field(man.ETA, pa.list_(pa.float64())),
        pa.field(man.GUIDANCE, pa.float64()),
        pa.field(man.SEED, pa.int64()),
        pa.field(man.BLEND_WORDS, pa.list_(pa.string())),
        pa.field(man.REWEIGHT, pa.map_(pa.string(), pa.float64())),
        pa.field(man.INSTRUCTIONS, pa.list_(pa.string())),
        pa.field(PIXELS, pa.binary()),
        *ERROR_FIELDS,
    ]
)
# Manifest columns stage 2 needs, carried past stage 1 beside the stored embeddings.
CARRIED = [
    PREPARED_SCHEMA.field(c)
    for c in (man.TARGET_PROMPTS, man.ETA, man.BLEND_WORDS, man.REWEIGHT, man.INSTRUCTIONS)
]

EDITED_SCHEMA = pa.schema(
    [*(f.with_nullable(True) for f in res.RESULTS_SCHEMA), pa.field(EDITED, pa.binary()), *ERROR_FIELDS]
)
