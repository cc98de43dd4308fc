"""Stored bytes per image of stage 1's embeddings table, per model family, measured by writing it.

    python -m benchmarks.storage                  # T = 50, float16 stacks (the defaults)
    python -m benchmarks.storage --steps 25 --embedding-dtype float32

Each family's table is written by the pipeline's own writer (``stored.inversion_to_arrow``, then
``pyarrow.parquet.write_table`` with its defaults) at its real shapes: SD 1.5 ``[T, 77, 768]`` and
``z_T [4, 64, 64]``; SD 2.1 ``[T, 77, 1024]``, ``[4, 96, 96]``; SDXL ``[T, 77, 2048]`` plus the
pooled ``[T, 1280]``, ``[4, 128, 128]``; SD3.5 (Medium and Large share it) ``[T, 77 + 256, 4096]``
plus the pooled ``[T, 2048]``, ``[16, 128, 128]``. The values are drawn from a normal
distribution: float16 mantissas of tuned embeddings are as incompressible, so the
bytes are those of real runs to within the small metadata columns.
"""

from __future__ import annotations

import argparse
import io
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import append_record, markdown_table

FAMILIES = {  # name: (stack [L, D], pooled width or None, latent side, latent channels, family)
    "SD 1.5 (512 px)": ((77, 768), None, 64, 4, "sd"),
    "SD 2.1 (768 px)": ((77, 1024), None, 96, 4, "sd"),
    "SDXL (1024 px)": ((77, 2048), 1280, 128, 4, "sdxl"),
    "SD3.5 Medium or Large (1024 px)": ((77 + 256, 4096), 2048, 128, 16, "sd3"),
}


def stored_table(
    rows: int, steps: int, stack, pooled: int | None, side: int, channels: int, family: str, dtype: str
) -> pa.Table:
    """``rows`` images' stage-1 rows as the pipeline writes them (``stored.inversion_to_arrow``, the
    writer itself), from normal values at the family's shapes. The writer reads only these fields of
    the engine, so a namespace of them stands in for a model that would take minutes to build."""
    import torch

    from pipeline.engine.config import PTIConfig
    from pipeline.engine.engine import Inversion
    from pipeline.engine.stored import inversion_to_arrow

    g = torch.Generator().manual_seed(0)
    length, width = stack
    engine = SimpleNamespace(
        config=PTIConfig(steps=steps, embedding_dtype=dtype),
        sd=SimpleNamespace(family=family, pooled_dim=pooled, fingerprint="0" * 16),
        schedule=SimpleNamespace(timesteps=list(range(steps + 1))),
        fingerprint="0" * 16,
    )
    inversion = Inversion(
        z_T=torch.randn(rows, channels, side, side, generator=g),
        cond=torch.randn(rows, steps, length + bool(pooled), width, generator=g),  # pooled: the last row
        psnr=torch.full((rows,), 30.0),
        ssim=torch.full((rows,), 0.9),
        final_loss=torch.full((rows, steps), 1e-4),
        seconds={"tune": float(rows)},
    )
    return inversion_to_arrow(engine, inversion, [f"image-{i:06d}" for i in range(rows)], ["a photo"] * rows)


def bytes_per_image(table: pa.Table) -> float:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return len(buffer.getvalue()) / len(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--embedding-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--rows", type=int, default=8, help="images per written table (a tuning batch)")
    parser.add_argument("--no-record", dest="record", action="store_false")
    args = parser.parse_args(argv)
    rows = []
    for name, shapes in FAMILIES.items():
        table = stored_table(args.rows, args.steps, *shapes, args.embedding_dtype)
        rows.append({"family": name, "mb": bytes_per_image(table) / 1e6})
    for row in rows:
        row["ratio"] = f"x{row['mb'] / rows[0]['mb']:.2f}"
        row["tb_per_night"] = row["mb"]  # 1M images: MB per image = TB per night
    table = markdown_table(
        rows,
        {
            "family": "model",
            "mb": "stored MB per image",
            "ratio": "against SD 1.5",
            "tb_per_night": "TB per 1M images",
        },
    )
    setting = (
        f"T={args.steps}, {args.embedding_dtype} stacks, {args.rows} images per Parquet file, "
        "pyarrow's default compression"
    )
    print(f"\n{setting}\n\n{table}")
    if args.record:
        append_record("benchmarks.storage", "Stored embeddings per image", f"{setting}.\n\n{table}")


if __name__ == "__main__":
    main()
