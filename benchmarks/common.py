"""What every benchmark shares: the machine it ran on, Markdown tables, and the record in
``docs/benchmarks.md`` that each run appends to."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
from pathlib import Path

RECORD = Path("docs/benchmarks.md")


def machine() -> str:
    """The CPU (or GPU), cores and library versions, in one line."""
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        parts.insert(0, f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}"
    )
    try:  # its version, without loading Ray into a process that does not use it
        versions += f", ray {importlib.metadata.version('ray')}"
    except importlib.metadata.PackageNotFoundError:
        pass
    return f"{'; '.join(parts)}; {versions}"


def model_folder(name: str) -> str:
    """A checkpoint folder: ``tiny`` (``tiny-sdxl``) is the seeded random tiny SD (SDXL), built in
    a temporary folder."""
    if name not in ("tiny", "tiny-sdxl"):
        return name
    import tempfile

    from pipeline.world.tiny import build_tiny_model

    family = "sdxl" if name == "tiny-sdxl" else "sd"
    return str(build_tiny_model(Path(tempfile.mkdtemp(prefix="pti-bench-")) / name, seed=0, family=family))


def resident_mb() -> float:
    """This process's resident memory now, in MiB (Linux)."""
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_resident_mb() -> float:
    """This process's peak resident memory so far (or since ``reset_peak_resident``), in MiB (Linux
    reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def reset_peak_resident() -> bool:
    """Start this process's peak resident memory afresh from what it holds now (Linux 4.0+: ``5``
    to ``/proc/self/clear_refs``), as ``torch.cuda.reset_peak_memory_stats`` does on CUDA; False
    where the system does not allow it (the peak then stays the process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """``columns`` maps a row key to its heading; floats are shown with 3 significant digits."""

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def append_record(module: str, title: str, body: str, record: Path = RECORD) -> None:
    """Append one run of ``python -m module`` (its command line, machine, date and results) to the
    benchmark record."""
    command = " ".join(["python -m", module, *(shlex.quote(a) for a in sys.argv[1:])])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {title}\n\n`{command}`, {stamp}\n\nMachine: {machine()}\n\n{body.strip()}\n"
    if not record.exists():
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            "# Benchmark record\n\nEach run of a benchmark in `benchmarks/` appends its results here.\n"
        )
    with open(record, "a") as f:
        f.write(section)
