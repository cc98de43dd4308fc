"""deploy/: the manifests run the project's image on the Ray it pins, their entrypoints accept
their arguments, and the image installs the way CI does, without model weights."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.batch.nightly import resolve
from pipeline.batch.config import SECTIONS, RunConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY_PIN = next(
    re.fullmatch(r"ray\[[a-z,]+\]==(\S+)", d).group(1)
    for d in PYPROJECT["project"]["dependencies"]
    if d.startswith("ray[")
)
IMAGE = re.search(r"^IMAGE=(\S+)$", (DEPLOY / "image.env").read_text(), re.M).group(1)
RAY_KINDS = ("RayJob", "RayCronJob", "RayCluster")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kuberay(kind: str) -> dict:
    (found,) = [d for p in sorted(DEPLOY.rglob("*.yaml")) for d in documents(p) if d.get("kind") == kind]
    return found


def cluster_spec(document: dict) -> dict:
    spec = document["spec"]
    return {
        "RayCluster": lambda: spec,
        "RayJob": lambda: spec["rayClusterSpec"],
        "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"],
    }[document["kind"]]()


def values(node, key: str) -> list:
    """Every value of ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in values(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in values(v, key)]
    return []


def configmap_files() -> dict[str, str]:
    """The jobs' config files as the head Pod sees them: mount path -> content."""
    config = kuberay("ConfigMap")
    return {f"/home/ray/pti-config/{name}": text for name, text in config["data"].items()}


def test_the_image_tag_is_the_package_version_on_the_pinned_ray():
    assert IMAGE.rsplit(":", 1)[1] == f"{PYPROJECT['project']['version']}-ray{RAY_PIN}"
    import ray

    assert RAY_PIN == ray.__version__, "pyproject.toml pins the Ray the tests run on"


def test_every_yaml_parses_and_every_ray_node_runs_the_image_on_the_pinned_ray():
    ray_files = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs = documents(path)  # parses, or fails here
        nodes = [d for d in docs if d.get("kind") in RAY_KINDS or "available_node_types" in d]
        if not nodes:
            continue
        ray_files.append(path.relative_to(DEPLOY).as_posix())
        images = {i for d in nodes for i in values(d, "image")}
        assert images == {IMAGE}, (
            f"{path.name} runs {images}, not the project's image {IMAGE} (deploy/image.env)"
        )
        for d in nodes:
            if d.get("kind") in RAY_KINDS:
                assert cluster_spec(d)["rayVersion"] == RAY_PIN, (
                    f"{path.name}: rayVersion is not the pinned {RAY_PIN}"
                )
    assert ray_files == [
        "cluster-launcher/aws-gpu.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/raycronjob-nightly.yaml",
        "kuberay/rayjob.yaml",
    ]


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_the_entrypoint_is_a_job_module_that_accepts_its_arguments_and_config(kind, tmp_path):
    job = kuberay(kind)["spec"]
    entrypoint = shlex.split((job.get("jobTemplate") or job)["entrypoint"])
    assert entrypoint[:2] == ["python", "-m"] and entrypoint[2].startswith("jobs."), entrypoint
    module, args = entrypoint[2], entrypoint[3:]
    assert importlib.util.find_spec(module) is not None, f"{module} does not exist"
    # The config files the arguments name are the mounted ConfigMap's: give the job those.
    mounted = configmap_files()
    for i, arg in enumerate(args):
        if arg.startswith("/home/ray/pti-config/"):
            assert arg in mounted, f"{arg} is not a key of the ConfigMap pti-config"
            local = tmp_path / Path(arg).name
            local.write_text(mounted[arg])
            args[i] = str(local)
    run = subprocess.run(
        [sys.executable, "-m", module, *args, "--print-config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    config = RunConfig.from_dict(yaml.safe_load(run.stdout))
    if module == "jobs.nightly":
        assert resolve(config).nightly.run_id  # a prefix of manifests, and outputs outside it
    else:
        assert config.manifest and config.output


def test_every_ray_cluster_has_the_same_spec_gpu_workers_credentials_and_config():
    specs = {kind: cluster_spec(kuberay(kind)) for kind in RAY_KINDS}
    assert specs["RayJob"] == specs["RayCronJob"] == specs["RayCluster"], (
        "one cluster shape in all three manifests"
    )
    spec = specs["RayJob"]
    (gpu,) = spec["workerGroupSpecs"]
    worker = gpu["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert (
        spec["enableInTreeAutoscaling"] and 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    )
    assert spec["authOptions"]["mode"] == "token"  # the dashboard runs code for whoever reaches it
    # The largest cluster holds every GPU actor of every config at once.
    for text in configmap_files().values():
        config = RunConfig.from_dict(yaml.safe_load(text))
        assert (
            config.gpus_per_actor * (config.tune_actors + config.edit_actors)
            <= gpu["maxReplicas"] * resources["limits"]["nvidia.com/gpu"]
        )
    account = kuberay("ServiceAccount")["metadata"]["name"]
    head = spec["headGroupSpec"]["template"]["spec"]
    for pod in (head, worker):
        assert pod["serviceAccountName"] == account
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "pti-storage", "optional": True}}]
    (config_volume,) = [v for v in head["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == kuberay("ConfigMap")["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts[config_volume["name"]] == "/home/ray/pti-config"
    assert {"name": "PTI_CACHE", "value": "/mnt/pti-cache"} in worker["containers"][0]["env"]

    cron = kuberay("RayCronJob")["spec"]
    assert re.fullmatch(r"(\S+ ){4}\S+", cron["schedule"]) and cron["timeZone"] == "Etc/UTC"
    # A night (and its retry) ends on the date it started: its run id, so a retry resumes it.
    hour, minute = int(cron["schedule"].split()[1]), int(cron["schedule"].split()[0])
    assert hour * 3600 + minute * 60 + cron["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


def test_the_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = documents(DEPLOY / "cluster-launcher" / "aws-gpu.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu = config["available_node_types"]["ray.worker.gpu"]
    assert 1 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []


def make_dry_run(*args: str) -> str:
    """What ``make`` would run, as a fresh ``make`` in the repository would: not as a sub-make of
    ``make test`` (whose variables and directory messages would leak in), with the Makefile's defaults."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH_SPEC", "VENV")
    }
    return subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_the_image_installs_with_the_script_make_install_and_ci_run():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    install = make_dry_run("install", "VENV=/nonexistent/venv")
    assert "pip install" not in install
    (make_call,) = [shlex.split(line) for line in install.splitlines() if "deploy/install.sh" in line]
    assert make_call == ["bash", "deploy/install.sh", "/nonexistent/venv/bin/python", "torch==2.13.0", "test"]

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    assert "pip install" not in dockerfile
    (run,) = re.findall(r"^RUN (.+?)(?:\s*\\\n|$)", dockerfile, re.M)
    docker_call = shlex.split(run.replace("${TORCH_SPEC}", args["TORCH_SPEC"]))
    assert docker_call == ["bash", "deploy/install.sh", "python", make_call[3]], (
        "the same script and torch; no test extras"
    )
    base = (
        re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1).replace("${RAY_VERSION}", args["RAY_VERSION"])
    )
    assert base.replace("${PYTHON_TAG}", args["PYTHON_TAG"]) == f"rayproject/ray:{RAY_PIN}-py311-gpu"
    image = shlex.split(make_dry_run("image"))
    assert (
        image[:4] == ["docker", "build", "-f", "deploy/Dockerfile"] and image[image.index("-t") + 1] == IMAGE
    )
    assert f"TORCH_SPEC={make_call[3]}" in image


def dockerignored(path: str, rules: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last rule that matches it or
    a folder above it wins; ``!`` rules send it."""
    parts = path.split("/")
    left_out = False
    for rule in rules:
        pattern = rule.removeprefix("!").strip("/")
        if any(fnmatch.fnmatch("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            left_out = not rule.startswith("!")
    return left_out


def test_the_image_gets_the_package_and_its_install_script_but_no_weights_tests_or_outputs():
    rules = [
        r.strip()
        for r in (REPO / ".dockerignore").read_text().splitlines()
        if r.strip() and not r.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = [
        f
        for f in tracked
        if f.split("/")[0] in packages or f in ("pyproject.toml", "README.md", "deploy/install.sh")
    ]
    assert {f.split("/")[0] for f in needed} >= packages
    assert [f for f in needed if dockerignored(f, rules) and not f.endswith(".pyc")] == []
    assert [f for f in tracked if f.startswith("models/") and not dockerignored(f, rules)] == [], (
        "no model weights in the image"
    )
    for other in (
        "tests/conftest.py",
        "benchmarks/edit_quality.py",
        ".venv/bin/python",
        "outputs/demo/contact_sheet.png",
    ):
        assert dockerignored(other, rules), other


def test_run_example_lists_every_config_field():
    example = yaml.safe_load((DEPLOY / "run.example.yaml").read_text())
    assert set(example) == {f.name for f in dataclasses.fields(RunConfig)}
    for name, kind in SECTIONS.items():
        assert set(example[name]) <= {f.name for f in dataclasses.fields(kind)}
    assert set(example["nightly"]) == {f.name for f in dataclasses.fields(SECTIONS["nightly"])}
    RunConfig.from_dict(example)  # and it loads
