"""The layers import downward only, and the engine imports without Ray or object-store clients."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE_LENGTH = 110  # pyproject.toml, [tool.ruff]

# What each part of the library may import from the project: every other project import is upward.
ALLOWED = {
    "pipeline": set(),
    "schemas": {"schemas"},
    "pipeline.errors": set(),
    "pipeline.faults": set(),
    "pipeline.engine": {"pipeline.errors", "pipeline.engine", "schemas"},
    "pipeline.io": {"pipeline.errors", "pipeline.io", "schemas"},
    "pipeline.editing": {"pipeline.errors", "pipeline.engine", "pipeline.io"},
    "pipeline.world": {
        "pipeline.errors",
        "pipeline.faults",
        "pipeline.engine",
        "pipeline.io",
        "pipeline.world",
    },
    "pipeline.batch": {
        "pipeline.errors",
        "pipeline.faults",
        "pipeline.engine",
        "pipeline.io",
        "pipeline.batch",
        "schemas",
    },
}
PROJECT = ("pipeline", "schemas", "jobs", "benchmarks")
# Third-party packages the engine must not need: it runs inside any process (a Ray actor, a GPU
# machine without Ray, a notebook).
NOT_IN_ENGINE = ("ray", "s3fs", "boto3", "botocore")
# A library file holds one concern: past this, it holds two (issue 29 cut four files along their seams).
MAX_LIBRARY_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def layer_of(module: str) -> str | None:
    return max(
        (layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")),
        key=len,
        default=None,
    )


def upward_imports(path: Path, layer: str) -> list[str]:
    """The project modules ``path`` imports that its layer may not."""

    def allowed(name: str) -> bool:
        return any(name == a or name.startswith(a + ".") for a in ALLOWED[layer])

    return sorted(n for n in imports(path) if n.split(".")[0] in PROJECT and not allowed(n))


LIBRARY = sorted(p for d in ("pipeline", "schemas") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_only_its_own_layer_and_those_below(path):
    module = module_name(path)
    layer = layer_of(module)
    assert layer is not None, f"{module} belongs to no layer: add it to ALLOWED"
    assert not upward_imports(path, layer), f"{module} ({layer}) imports {upward_imports(path, layer)}"


def test_an_upward_import_inside_a_function_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from pipeline.engine import algorithm\n\ndef f():\n    from jobs.common import main\n")
    assert upward_imports(bad, "pipeline.engine") == ["jobs.common", "jobs.common.main"]
    assert upward_imports(bad, "pipeline.batch") == ["jobs.common", "jobs.common.main"]
    assert upward_imports(bad, "pipeline.io") == [
        "jobs.common",
        "jobs.common.main",
        "pipeline.engine",
        "pipeline.engine.algorithm",
    ]


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline" / "engine").rglob("*.py")), ids=lambda p: p.name)
def test_the_engine_names_no_cluster_or_object_store_client(path):
    assert not {n for n in imports(path) if n.split(".")[0] in NOT_IN_ENGINE}


def test_the_engine_imports_without_ray_storage_or_the_batch_layer():
    code = (
        "import sys; import pipeline.engine.engine, pipeline.engine.stored, pipeline.engine.algorithm; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 's3fs', 'jobs') "
        "or m.startswith(('pipeline.batch', 'pipeline.io'))))"
    )
    assert python(code) == "[]"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_file_holds_more_than_one_concern_s_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LIBRARY_LINES, f"{lines} lines: cut it along its seams"


def test_the_driver_and_the_checkpoint_reader_import_without_torch():
    """The driver (a Ray job's entrypoint, on a CPU head node) reads configs, manifests and model
    configs without loading torch: that is the actors' business."""
    code = (
        "import sys; import pipeline.batch.driver, pipeline.batch.config, pipeline.engine.checkpoints; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))"
    )
    assert python(code) == "[]"


def test_the_engine_inverts_and_edits_without_ray_or_s3fs():
    """The engine (and its benchmarks) run where Ray and s3fs are not installed, as on the GPU
    machine: a case of ``benchmarks.engine`` (stage 1 and an edit on the tiny model) loads neither."""
    code = (
        "import sys; from benchmarks.engine import run_case; run_case(dict(model='tiny', lever='baseline', "
        "pti=dict(steps=1, inner_steps=1), edits=1, batch=1, device='cpu', dtype='float32')); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 's3fs')))"
    )
    assert python(code).splitlines()[-1] == "[]"


def test_a_stage_actor_starts_without_torchmetrics_and_measures_with_it():
    """torchmetrics (which loads scipy.signal and every metric family) is imported when stage 1
    first measures a reconstruction, not when an actor or the driver starts."""
    code = (
        "import sys, torch; import pipeline.batch.stages, pipeline.engine.engine; "
        "from pipeline.engine.metrics import psnr; print('torchmetrics' in sys.modules, end=' '); "
        "a = torch.zeros(1, 3, 8, 8); psnr(a, a + 0.1); print('torchmetrics' in sys.modules)"
    )
    assert python(code) == "False True"


def python(code: str) -> str:
    """What ``code`` prints in a fresh interpreter (its imports start from nothing)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


CODE = sorted(
    p for d in ("pipeline", "jobs", "schemas", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")
)


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_keeps_to_the_line_length_without_formatter_escapes(path):
    lines = path.read_text().splitlines()
    long = [n for n, line in enumerate(lines, 1) if len(line) > LINE_LENGTH]
    skipped = [n for n, line in enumerate(lines, 1) if line.rstrip().endswith("# fmt: skip")]
    assert not long, f"lines over {LINE_LENGTH} characters: {long}"
    assert not skipped, f"'# fmt: skip' on lines {skipped}: format the code instead"
