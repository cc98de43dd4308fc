"""What every benchmark shares: the machine it ran on, a case run in its own process, Markdown
tables, and the record in ``docs/benchmarks.md`` that each run appends to."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
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


def measured_by(module: str, argv: list[str]) -> str:
    """A results page's "Measured by" line: the command, the machine, its CPU threads and torch."""
    import torch

    return (
        f"Measured by `python -m {module} {' '.join(argv)}` on {platform.machine()} "
        f"({torch.get_num_threads()} CPU threads, torch {torch.__version__})"
    )


def model_folder(name: str) -> str:
    """A checkpoint folder: ``tiny`` (``tiny-sdxl``, ``tiny-sd3``) is the seeded random tiny SD
    (SDXL, SD3), and the names of ``pipeline.world.architectures`` (``sd15``, ``sdxl``, ...) are
    published architectures without weights (load them with ``weights=False``), each built in a
    temporary folder; anything else is already a folder."""
    import tempfile

    from pipeline.world.architectures import ARCHITECTURES, write_architecture
    from pipeline.world.tiny import build_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="pti-bench-")) / name
    if name in ARCHITECTURES:
        return str(write_architecture(name, folder))
    families = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3"}
    if name in families:
        return str(build_tiny_model(folder, seed=0, family=families[name]))
    return name


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


def run_child(args: list[str], budget: float | None = None, env: dict | None = None, capture: bool = False):
    """``python *args`` in a fresh process (so its peak memory is its own). With a ``budget`` it runs
    in its own process group and is stopped with every process it started (compile workers, Ray,
    the cases of a benchmark it runs) at ``budget`` seconds, or when this run is cut off. Returns its
    ``status`` (done, failed or stopped), the ``reason``, ``seconds`` and, with ``capture``, its
    ``stdout`` and ``stderr``."""
    started = time.perf_counter()
    pipe = subprocess.PIPE if capture else None
    # Its own process group, in the run's session: a session ends with its command, so a child
    # outlives neither its budget nor a run killed outright.
    group = 0 if budget is not None else None
    child = subprocess.Popen(
        [sys.executable, *args], process_group=group, env=env, stdout=pipe, stderr=pipe, text=True
    )
    try:
        stdout, stderr = child.communicate(timeout=budget)
        code = child.returncode
        status = {"status": "done"} if code == 0 else {"status": "failed", "reason": f"exit status {code}"}
    except subprocess.TimeoutExpired:
        stdout = stderr = None
        status = {"status": "stopped", "reason": f"over its budget of {budget:.0f} s"}
    finally:  # over its budget, or the run cut off (SIGTERM, ^C): nothing of it runs on
        if group is not None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it and everything it started have already ended
        else:
            child.kill()
        child.wait()
    return {**status, "seconds": time.perf_counter() - started, "stdout": stdout, "stderr": stderr}


def child_rows(args: list[str]):
    """Each JSON line that ``python *args`` prints (a benchmark's cases in their own process), as it
    prints it, so a run cut short keeps what finished; its stderr goes to this run's."""
    child = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.startswith("{"):
                yield json.loads(line)
    finally:
        child.stdout.close()
        if child.wait() != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed with exit status {child.returncode}")


def write_rows(path: str | Path | None, rows: list[dict]) -> None:
    """Append ``rows`` to ``path`` as JSON lines (nothing without a path), and print them."""
    for row in rows:
        print(json.dumps(row, default=str), flush=True)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")


def read_rows(path: Path) -> list[dict]:
    """Every whole JSON line of ``path`` (a process killed mid-write leaves a partial last line)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def add_set_option(parser, default: tuple[str, ...] = ()) -> None:
    """The benchmarks' one config dialect: ``--set pti.FIELD=VALUE ...``, read by ``pti_settings``."""
    help = "the engine's config, as the jobs' --set (PTIConfig's defaults otherwise)"
    parser.add_argument("--set", nargs="+", default=list(default), metavar="pti.FIELD=VALUE", help=help)


def pti_settings(items: list[str]) -> dict:
    """``pti.FIELD=VALUE`` items (or ``FIELD=VALUE``) read as the jobs read ``--set`` (``RunConfig.load``:
    the same typing, bounds and errors): the fields they set, with their values."""
    from pipeline.batch.config import RunConfig

    items = [item if item.startswith("pti.") else f"pti.{item}" for item in items if item]
    pti = RunConfig.load(None, items).pti
    return {name: getattr(pti, name) for name in (item[4:].partition("=")[0] for item in items)}


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


FINDINGS = "<!-- findings: kept across runs -->"


def write_page(path: Path, text: str) -> None:
    """Write a results page; what was written by hand below its ``FINDINGS`` marker survives."""
    kept = path.read_text().split(FINDINGS, 1)[1] if path.exists() and FINDINGS in path.read_text() else "\n"
    path.write_text(text + "\n" + FINDINGS + kept)


def commit() -> str:
    """The checkout's commit (``+`` with uncommitted changes), so a record stays reproducible after the
    code it ran moves on; ``unknown`` outside a git checkout."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty=+"], capture_output=True, text=True
        )
    except OSError:  # no git
        return "unknown"
    return described.stdout.strip() or "unknown"


def append_record(module: str, title: str, body: str, record: Path = RECORD) -> None:
    """Append one run of ``python -m module`` (its command line, commit, machine, date and results)
    to the benchmark record."""
    command = " ".join(["python -m", module, *(shlex.quote(a) for a in sys.argv[1:])])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"\n## {title}\n\n`{command}` at commit `{commit()}`, {stamp}\n\nMachine: {machine()}\n\n"
        f"{body.strip()}\n"
    )
    if not record.exists():
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            "# Benchmark record\n\nEach run of a benchmark in `benchmarks/` appends its results here.\n"
        )
    with open(record, "a") as f:
        f.write(section)
