"""deploy/: the manifests run the project's image on the Ray it pins, their entrypoints accept
their arguments, their clusters start without GPUs, keep Ray's object store in memory and go once
their job ends; the image installs its lock file the way CI's install does, with one CUDA (torch's),
without model weights; and a job waits for an autoscaler's GPUs but refuses a fixed cluster at once."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.metadata
import importlib.util
import logging
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.batch.cluster import check_gpus
from pipeline.batch.nightly import resolve
from pipeline.batch.config import SECTIONS, RunConfig
from pipeline.errors import InputError

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
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
DOCKER_ARGS = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, re.M))


def read_lock(name: str) -> dict[str, str]:
    return {
        canonicalize_name(package): version
        for package, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", (DEPLOY / name).read_text(), re.M)
    }


LOCK = read_lock("requirements.lock")  # the image's
TEST_LOCK = read_lock("requirements-test.lock")  # make install's: the image's and the extras
RUNTIME = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
EXTRAS = [  # what make install adds: the groups that requirements-test.lock pins
    Requirement(d)
    for group in ("test", "bench")
    for d in PYPROJECT["project"]["optional-dependencies"][group]
]
MIN_DRIVER = {12: 525, 13: 580}  # the oldest NVIDIA driver of each CUDA major (NVIDIA's release notes)


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
    # No GPU while no job runs: a job asks the autoscaler for its GPUs (test_a_job_waits_...).
    assert spec["enableInTreeAutoscaling"] and gpu["minReplicas"] == gpu["replicas"] == 0 < gpu["maxReplicas"]
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
    assert 0 == gpu["min_workers"] < gpu["max_workers"] <= config["max_workers"]
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []
    # The launcher sizes /dev/shm for Ray's default object store itself, unless told a size.
    assert not any("--shm-size" in option for option in config["docker"]["run_options"])
    assert not config["docker"].get("disable_shm_size_detection")
    assert config["idle_timeout_minutes"] <= 10


def quantity(value) -> int:
    """A Kubernetes quantity (16Gi, 512Mi, 4294967296) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", str(value)).groups()
    return int(number) * 1024 ** (" KMGT".index(unit[0]) if unit else 0)


@pytest.mark.parametrize("kind", RAY_KINDS)
def test_every_ray_pod_sets_its_object_store_and_a_memory_dev_shm_that_holds_it(kind):
    """A /dev/shm smaller than the object store makes Ray keep the store on disk ("This will harm
    performance!"); Ray's default store is 30% of the Pod's memory."""
    spec = cluster_spec(kuberay(kind))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        name = group.get("groupName", "head")
        store = int(group["rayStartParams"]["object-store-memory"])
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        memory = quantity(container["resources"]["limits"]["memory"])
        assert volume["emptyDir"]["medium"] == "Memory", name
        assert store <= quantity(volume["emptyDir"]["sizeLimit"]) <= memory, name
        assert 1024**3 <= store <= 0.3 * memory, f"{name}: an object store of {store} bytes"


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_a_jobs_cluster_is_deleted_minutes_after_the_job_ends(kind):
    job = kuberay(kind)["spec"]
    job = job.get("jobTemplate") or job
    assert job["shutdownAfterJobFinishes"] is True
    assert 0 < job["ttlSecondsAfterFinished"] <= 300
    assert job["rayClusterSpec"]["autoscalerOptions"]["idleTimeoutSeconds"] <= 600  # idle GPU Pods go too


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


def test_the_image_installs_its_lock_with_the_script_make_install_and_ci_run_before_its_code():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    install = make_dry_run("install", "VENV=/nonexistent/venv")
    assert "pip install" not in install
    (make_call,) = [shlex.split(line) for line in install.splitlines() if "deploy/install.sh" in line]
    assert make_call == ["bash", "deploy/install.sh", "/nonexistent/venv/bin/python", "torch==2.13.0", "test"]
    torch_spec = make_call[3]

    assert "pip install" not in DOCKERFILE
    steps = [
        (verb, shlex.split(rest.replace("${TORCH_SPEC}", DOCKER_ARGS["TORCH_SPEC"])))
        for verb, rest in re.findall(r"^(COPY|RUN) (.+?)(?:\s*\\\n|$)", DOCKERFILE, re.M)
    ]
    assert steps[-4:] == [
        ("COPY", ["deploy/install.sh", "deploy/requirements.lock", "deploy/"]),
        ("RUN", ["bash", "deploy/install.sh", "--locked", "python", torch_spec]),
        ("COPY", [".", "."]),  # the code: after the dependencies' layer, which changes with the lock only
        ("RUN", ["bash", "deploy/install.sh", "--package", "python"]),
    ], "the lock's dependencies, then the code and the package alone; the same script and torch as make"
    # Every pip install of the script takes its versions from a lock: none resolves from the index.
    pip_installs = re.findall(r"-m pip install (.+)$", (DEPLOY / "install.sh").read_text(), re.M)
    assert len(pip_installs) == 5
    for args in pip_installs:
        image_step = "--no-deps" in args and ('-r "$lock"' in args or '"$root"' in args)
        assert '-c "$test_lock"' in args or image_step, args
    image = shlex.split(make_dry_run("image"))
    assert (
        image[:4] == ["docker", "build", "-f", "deploy/Dockerfile"] and image[image.index("-t") + 1] == IMAGE
    )
    assert f"TORCH_SPEC={torch_spec}" in image


def test_the_locks_pin_every_dependency_in_pyprojects_ranges_torch_as_make_and_ray_as_pyproject():
    """A check of the lock files against pyproject.toml alone: nothing installed here enters it."""
    torch_spec = DOCKER_ARGS["TORCH_SPEC"]
    assert re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1) == torch_spec
    build_tools = [Requirement("pip"), *map(Requirement, PYPROJECT["build-system"]["requires"])]
    for path, lock, wanted in (
        ("requirements.lock", LOCK, RUNTIME + build_tools),
        ("requirements-test.lock", TEST_LOCK, RUNTIME + build_tools + EXTRAS),
    ):
        text = (DEPLOY / path).read_text()
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert len(lines) == len(lock), f"every line of {path} is one name==version"
        assert text.startswith("# Written by deploy/lock.sh"), path
        assert f"{torch_spec}\n" in text and lock["ray"] == RAY_PIN, path
        for requirement in wanted:
            name = canonicalize_name(requirement.name)
            assert name in lock, f"{requirement} is not in deploy/{path}: run make lock"
            assert requirement.specifier.contains(lock[name], prereleases=True), (path, requirement)
    # One resolved set: the test lock is the image's lock plus the extras, at the same versions.
    assert {n: TEST_LOCK.get(n) for n in LOCK} == LOCK
    assert shlex.split(make_dry_run("lock")) == ["bash", "deploy/lock.sh", torch_spec]


def test_make_install_installed_the_locked_versions_and_the_lock_holds_what_they_require():
    """What ``make install`` put in this environment is the test lock (torch: its local CPU build of
    the locked version), so a fresh clone runs what the tests ran on; through the metadata of those
    locked versions, every requirement of pyproject.toml and its extras, down to the leaves, is
    pinned at a version it accepts."""
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
        if d.metadata["Name"]
    }
    moved = {
        name: (installed[name], version)
        for name, version in TEST_LOCK.items()
        if name in installed and installed[name].split("+")[0] != version
    }
    assert not moved, f"installed, not locked (make clean install): {moved}"
    environment = {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux"}
    todo = [*RUNTIME, *EXTRAS]
    seen = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        assert name in TEST_LOCK, f"{requirement} is not in deploy/requirements-test.lock: run make lock"
        assert requirement.specifier.contains(TEST_LOCK[name], prereleases=True), requirement
        if (name, frozenset(requirement.extras)) in seen or name not in installed:
            continue
        seen.add((name, frozenset(requirement.extras)))
        for line in importlib.metadata.requires(name) or []:
            r = Requirement(line)
            if r.marker is None or any(
                r.marker.evaluate({**environment, "extra": extra}) for extra in ["", *requirement.extras]
            ):
                todo.append(r)
    assert len(seen) > 50


def test_the_images_only_cuda_is_torchs_and_the_driver_it_needs_is_written_down():
    torch_cuda = DOCKER_ARGS["TORCH_CUDA"]
    major = int(torch_cuda.split(".")[0])
    # torch's CUDA build pins the CUDA libraries; the lock has them at that CUDA.
    assert LOCK["cuda-toolkit"].startswith(f"{torch_cuda}.")
    assert LOCK["nvidia-cuda-runtime"].split(".")[0] == str(major)
    assert not [n for n in LOCK if re.search(r"-cu(?!%d$)\d+$" % major, n)], "libraries of another CUDA"
    base = re.search(r"^FROM (\S+)$", DOCKERFILE, re.M).group(1)
    base = base.replace("${PYTHON_VERSION}", DOCKER_ARGS["PYTHON_VERSION"])
    cuda_base = re.fullmatch(r"nvidia/cuda:(\d+)\.\S+", base)
    if cuda_base:  # a CUDA base image: of the same CUDA
        assert int(cuda_base.group(1)) == major, base
    else:  # no CUDA of its own: torch's wheels bring it
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    assert (
        DOCKER_ARGS["PYTHON_VERSION"] == "3.11"
        and "--python-version 3.11" in (DEPLOY / "lock.sh").read_text()
    )
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=${TORCH_CUDA}"' in DOCKERFILE  # the runtime refuses older drivers
    driver = MIN_DRIVER[major]
    for doc in (DOCKERFILE, (DEPLOY / "README.md").read_text()):
        assert f"CUDA {torch_cuda}" in doc and str(driver) in doc


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
        if f.split("/")[0] in packages
        or f in ("pyproject.toml", "README.md", "deploy/install.sh", "deploy/requirements.lock")
    ]
    assert {f.split("/")[0] for f in needed} >= packages
    assert [f for f in needed if dockerignored(f, rules) and not f.endswith(".pyc")] == []
    # What the Dockerfile copies by name before the code (its dependencies' layer) is sent too.
    named = [s for c in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M) for s in c.split()[:-1] if s != "."]
    assert named and [f for f in named if dockerignored(f, rules)] == [], "add them to .dockerignore's list"
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


class FakeCluster:
    """Ray as check_gpus sees it, on a clock that only sleeps move: GPUs that the autoscaler adds
    at given times, and the requests made of it."""

    def __init__(self, gpus_at: dict[float, float], grows: bool):
        self.now, self.gpus_at, self.grows, self.requests, self.asked = 0.0, gpus_at, grows, [], 0

    def resources(self) -> dict:
        return {"CPU": 16, "GPU": max(g for t, g in self.gpus_at.items() if t <= self.now)}

    def can_grow(self) -> bool:
        self.asked += 1
        return self.grows

    def sleep(self, seconds: float) -> None:
        assert 0 < seconds <= 5
        self.now += seconds

    def check(self, config: RunConfig, actors: int | None = None) -> None:
        check_gpus(
            config,
            actors,
            cluster_resources=self.resources,
            can_grow=self.can_grow,
            request_gpus=self.requests.append,
            clock=lambda: self.now,
            sleep=self.sleep,
        )


def test_a_job_waits_for_an_autoscalers_gpus_and_refuses_a_fixed_cluster_at_once(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.batch.cluster")
    config = RunConfig(tune_actors=4, edit_actors=2, gpus_per_actor=1, actor_start_timeout_s=600)

    # A GPU group that scales from zero: the job asks for 4 GPUs (its larger pool) and starts when
    # they are there, logging what it waits for every 30 s; the request is withdrawn at the end.
    cluster = FakeCluster({0: 0, 70: 2, 95: 4}, grows=True)
    cluster.check(config)
    assert cluster.now == 95 and cluster.requests == [[{"GPU": 1}] * 4, []]
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for GPUs")]
    assert waits == [
        "waiting for GPUs: 0 of 4 after 30 s of 600",
        "waiting for GPUs: 0 of 4 after 60 s of 600",
        "waiting for GPUs: 2 of 4 after 90 s of 600",
    ]
    assert "some actors will wait" not in caplog.text
    caplog.clear()

    # All of a jobs.run's actors (tune + edit), when the driver names them: 6 GPUs.
    cluster = FakeCluster({0: 0, 10: 4, 20: 6}, grows=True)
    cluster.check(config, actors=6)
    assert cluster.now == 20 and cluster.requests == [[{"GPU": 1}] * 6, []]

    # The autoscaler brings fewer than asked by the timeout: the job starts on them, with a warning.
    cluster = FakeCluster({0: 0, 100: 2}, grows=True)
    cluster.check(config)
    assert cluster.now == 600 and cluster.requests[-1] == []
    assert "the cluster has 2 GPUs for 4 requested: some actors will wait" in caplog.text

    # None by the timeout: refused, saying how long it waited; the request withdrawn all the same.
    cluster = FakeCluster({0: 0}, grows=True)
    with pytest.raises(InputError, match=r"has 0 GPUs after 600 s of waiting for its autoscaler; add GPU"):
        cluster.check(config)
    assert cluster.now == 600 and cluster.requests == [[{"GPU": 1}] * 4, []]

    # A cluster that cannot grow is refused at once, and nothing is asked of it.
    cluster = FakeCluster({0: 0.5}, grows=False)
    with pytest.raises(
        InputError, match=r"ask for 1 GPU per actor but the Ray cluster has 0.5 GPUs; add GPU"
    ):
        cluster.check(config)
    assert cluster.now == 0 and cluster.requests == []

    # Enough GPUs, or a job on CPUs: no question asked of the autoscaler, no wait.
    for cluster, gpus_per_actor in [
        (FakeCluster({0: 4}, grows=True), 1),
        (FakeCluster({0: 0}, grows=True), 0),
    ]:
        cluster.check(dataclasses.replace(config, gpus_per_actor=gpus_per_actor))
        assert cluster.asked == cluster.now == 0 and cluster.requests == []
