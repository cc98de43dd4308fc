"""The wheels the GPU machine lacks, for one device ``run`` (docs/gpu.md): diffusers and Ray at this
environment's exact versions, and what they need that the machine's image does not hold, for
Python 3.12 on manylinux x86_64, downloaded into ``.whl/`` (which git ignores).

    bash benchmarks/gpu_wheels.sh              # every part of the GPU check
    bash benchmarks/gpu_wheels.sh --no-ray     # diffusers only: the check's pipeline part skips itself

Ray's wheel (76 MiB) would not fit in the 64 MiB a call carries with the tree, so it is repacked
without its Java workers (``ray/jars``) and the dashboard's web client (``ray/dashboard/client``),
neither of which a local Python job loads, its RECORD rewritten to match. The total of the tree and
the wheels is checked against that limit.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# What the GPU image lacks (device KINDS.md's package list), and who needs it.
NEEDED = {
    "diffusers": "the models",
    "importlib-metadata": "diffusers",
    "ray": "the pipeline part",
    "jsonschema": "Ray",
    "jsonschema-specifications": "jsonschema",
    "referencing": "jsonschema",
    "rpds-py": "referencing",
}
FOR_RAY = {"ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"}
DROPPED = {"ray": ("ray/jars/", "ray/dashboard/client/")}  # what a local Python job never loads
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
LIMIT = 64 * 2**20  # what one device call carries: the tree and the wheels together


def download(name: str, version: str, folder: Path) -> Path:
    """One wheel for CPython 3.12 on manylinux x86_64, without its dependencies."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms]
    with tempfile.TemporaryDirectory() as staging:
        subprocess.run([*command, "-d", staging, f"{name}=={version}"], check=True)
        (wheel,) = Path(staging).glob("*.whl")
        return Path(shutil.move(str(wheel), folder / wheel.name))


def slim(wheel: Path, prefixes: tuple[str, ...]) -> None:
    """Repack ``wheel`` in place without the files under ``prefixes``, and without their lines in
    its RECORD, so pip installs it as it would the whole wheel."""
    repacked = wheel.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if item.filename.startswith(prefixes):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = kept_record(data.decode(), prefixes).encode()
            target.writestr(item, data)  # the same ZipInfo: names, dates and modes (executables) kept
    repacked.replace(wheel)


def kept_record(record: str, prefixes: tuple[str, ...]) -> str:
    rows = [row for row in csv.reader(io.StringIO(record)) if row and not row[0].startswith(prefixes)]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def tree_bytes(root: Path) -> int:
    """What a device call sends besides carried paths: tracked files and untracked ones git does
    not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.decode()
    return sum(
        (root / name).stat().st_size for name in listed.split("\0") if name and (root / name).is_file()
    )


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-ray", action="store_true", help="diffusers only; the pipeline part then skips")
    parser.add_argument("--dest", default=".whl", help="the folder (default .whl, which git ignores)")
    args = parser.parse_args(argv)
    folder = Path(args.dest)
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.whl"):  # two versions of one package stop the whole install there
        old.unlink()
    sizes = {}
    for name, why in NEEDED.items():
        if args.no_ray and name in FOR_RAY:
            continue
        version = importlib.metadata.version(name)
        wheel = download(name, version, folder)
        if name in DROPPED:
            slim(wheel, DROPPED[name])
        sizes[wheel.name] = wheel.stat().st_size
        print(f"{wheel.name}: {mib(sizes[wheel.name])} ({why})")
    tree, wheels = tree_bytes(Path.cwd()), sum(sizes.values())
    total = tree + wheels
    print(f"wheels {mib(wheels)} + tree {mib(tree)} = {mib(total)} of the {mib(LIMIT)} a call carries")
    if total > LIMIT:
        print(
            "too large for one call: run with --no-ray (the pipeline part then skips itself)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
