"""The batch job's config: where data lives, how the Ray stages are sized, and the PTI settings.

Loaded from YAML, overridden by flags (``--set pti.steps=20``), and written beside the outputs as
``config.yaml``. It holds no secrets: credentials come from the AWS chain, never from here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from pipeline.batch.curate import CurateConfig, DatasetConfig
from pipeline.batch.output import Output
from pipeline.engine.config import PTIConfig, from_known_fields
from pipeline.errors import InputError
from pipeline.io.fetch import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, READ_ATTEMPTS, READ_TIMEOUT_S
from pipeline.io.storage import Location


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one safe path component: a night's folder


@dataclass(frozen=True)
class NightlyConfig:
    """``jobs.nightly``: which manifests a night takes and what its report says."""

    __pydantic_config__ = {"extra": "forbid"}  # for RunConfig.from_dict's validator

    manifests: str | None = None  # a prefix: every Parquet file under it is one manifest, processed once
    run_id: str | None = None  # the night's name and folder under output; default: the UTC date, YYYY-MM-DD
    ledger: str | None = None  # the table of processed manifests; default {output}/_ledger
    gpu_hour_price: float | None = (
        None  # price of one GPU hour, for the report's cost estimate; None: no cost
    )
    sample_images: int = 4  # images on the report's contact sheet, each with its input and edits
    # With a scorer: each manifest's kept edits as a training set (jobs.dataset, the dataset
    # section's settings) under its output's dataset/, once its run succeeded.
    dataset: bool = False

    def __post_init__(self):
        problems = []
        if self.run_id is not None and not RUN_ID.fullmatch(self.run_id):
            problems.append(
                f"run_id {self.run_id!r} must be letters, digits, '.', '_' or '-' (a folder name)"
            )
        if self.gpu_hour_price is not None and self.gpu_hour_price < 0:
            problems.append(f"gpu_hour_price must be >= 0, got {self.gpu_hour_price}")
        if self.sample_images < 0:
            problems.append(f"sample_images must be >= 0, got {self.sample_images}")
        if problems:
            raise InputError("invalid run config: " + "; ".join(problems))


# Nested parts of a run config, set as pti.steps=20.
SECTIONS = {"pti": PTIConfig, "nightly": NightlyConfig, "curate": CurateConfig, "dataset": DatasetConfig}


@dataclass(frozen=True)
class RunConfig:
    __pydantic_config__ = {"extra": "forbid"}  # for RunConfig.from_dict's validator

    manifest: str | None = None  # Parquet file or folder of manifests (any fsspec URI)
    output: str = "outputs/run"  # prefix for embeddings/, images/, results/, errors/
    embeddings: str | None = None  # jobs.edit: stored stage-1 results; default {output}/embeddings
    targets: str | None = None  # jobs.edit: a table of id, target_prompts[, eta]; default: the manifest
    endpoint_url: str | None = None  # S3-compatible endpoint; default AWS_ENDPOINT_URL
    tune_actors: int = 1  # GPU actors holding a model for stage 1
    edit_actors: int = 1  # GPU actors holding a model for stage 2
    gpus_per_actor: float = 1.0  # 0 runs the actors on CPUs
    cpus_per_actor: float = 1.0
    tune_batch_size: int = 4  # images per stage-1 call
    edit_batch_size: int = 2  # images per stage-2 batch (all their edits)
    max_edits_per_call: int = 16  # edits sampled together in one UNet batch
    results_rows_per_file: int = 100_000
    results_flush_seconds: float = 60.0  # a results file at least this often: what a killed driver can lose
    # Where image URIs may point. None: the manifest's own bucket, or the local filesystem when the
    # manifest is a local file (pipeline.io.storage.default_image_prefixes); web URLs only if listed.
    allowed_image_prefixes: list[str] | None = None
    max_image_bytes: int = MAX_IMAGE_BYTES  # larger image files are refused unread
    max_image_pixels: int = (
        MAX_IMAGE_PIXELS  # larger images are refused from their header (decompression bombs)
    )
    # Every try of one image read together (a stalled store or server becomes read_failed), and
    # how many tries: botocore's own for S3 (its standard retry mode), the reader's for the rest.
    image_read_timeout_s: float = READ_TIMEOUT_S
    image_read_attempts: int = READ_ATTEMPTS
    # A job whose failed rows are more than this fraction of its rows fails (after writing
    # everything): its exit status and the nightly ledger say so. 1.0: never.
    max_failed_fraction: float = 0.1
    # When the cluster holds all of a job's actors at once, pools wait for all their actors before
    # taking work (so every actor gets some), and fail when they cannot start in this time. It also
    # bounds the wait at start for GPUs that an autoscaler adds (a GPU group scaled to zero).
    actor_start_timeout_s: float = 1800.0
    # A job holds its output's lease (nightly: each manifest's) and renews it every lock_ttl_s / 4;
    # a dead job's lease expires after lock_ttl_s, and the next job takes the output over.
    lock_ttl_s: float = 600.0
    contact_sheet_images: int = 4  # jobs.run: inputs with their labelled edits in contact_sheet.png; 0: none
    # The CLIP that scores every edit (the results' clip_sim_* and input_ssim, schemas/results.py):
    # a hub id such as openai/clip-vit-large-patch14, a folder or a URI. None: edits are not scored.
    scorer: str | None = None
    progress_every_s: float = 30.0  # a job log line with rows done, failed, rows/s and ETA
    pti: PTIConfig = field(default_factory=PTIConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)  # jobs.nightly only
    curate: CurateConfig = field(default_factory=CurateConfig)  # with a scorer: which edits are kept
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # jobs.dataset: the training set

    def __post_init__(self):
        for name, kind in SECTIONS.items():
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, from_known_fields(kind, getattr(self, name), f"{name} config"))
        problems = [
            f"{name} must be at least 1, got {getattr(self, name)}"
            for name in (
                "tune_actors",
                "edit_actors",
                "tune_batch_size",
                "edit_batch_size",
                "max_edits_per_call",
                "image_read_attempts",
                "results_rows_per_file",
                "max_image_bytes",
                "max_image_pixels",
            )
            if getattr(self, name) < 1
        ]
        problems += [
            f"{name} must be > 0, got {getattr(self, name)}"
            for name in ("results_flush_seconds", "actor_start_timeout_s")
            if not getattr(self, name) > 0
        ]
        if not 0 <= self.max_failed_fraction <= 1:
            problems.append(f"max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")
        if self.contact_sheet_images < 0:
            problems.append(f"contact_sheet_images must be >= 0, got {self.contact_sheet_images}")
        if not self.lock_ttl_s > 0:
            problems.append(f"lock_ttl_s must be > 0, got {self.lock_ttl_s}")
        if not self.progress_every_s >= 0:
            problems.append(f"progress_every_s must be >= 0, got {self.progress_every_s}")
        if not self.image_read_timeout_s > 0:
            problems.append(f"image_read_timeout_s must be > 0, got {self.image_read_timeout_s}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            problems.append("gpus_per_actor must be >= 0 and cpus_per_actor > 0")
        if problems:
            raise InputError("invalid run config: " + "; ".join(problems))

    @property
    def output_location(self) -> Output:
        """The output prefix and its parts, with the endpoint that reaches them."""
        return Output.at(self.output, self.endpoint_url, self.embeddings)

    @property
    def dataset_location(self) -> Location:
        """Where ``jobs.dataset`` writes the training set: ``dataset.output`` or ``{output}/dataset``."""
        if self.dataset.output:
            return Location(self.dataset.output, self.endpoint_url)
        return self.output_location.root / "dataset"

    @property
    def manifest_location(self) -> Location:
        return Location(self.manifest or "", self.endpoint_url)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["pti"]["etas"] = list(values["pti"]["etas"])
        return values

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Every value checked against its field's type (pydantic) and bounds (``__post_init__``):
        a mistake is one ``InputError`` naming the field, the value and what is allowed."""
        try:
            return _VALIDATOR.validate_python(values)
        except pydantic.ValidationError as error:
            raise InputError("invalid run config: " + "; ".join(map(_problem, error.errors()))) from None

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: list[str] = (), texts: dict[str, str] | None = None
    ) -> "RunConfig":
        """A YAML file (optional), then ``key=value`` overrides, then ``texts`` (key: value taken
        as written, as flags give them); ``pti.`` and ``nightly.`` keys reach those sections.
        An override's value is its text too (the field's type converts it: ``steps=20``,
        ``early_stop=false``, ``run_id=2026-11-25``), except YAML lists, maps, ``null`` and quoted
        text: ``etas=[0.5, 0.8]``, ``reweight={hat: 2}``, ``resolution=null``, ``device="cpu"``."""
        values: dict[str, Any] = read_yaml(path) if path else {}
        for name in SECTIONS:
            values[name] = dict(values.get(name) or {})
        settings = []
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise InputError(f"override {item!r} is not KEY=VALUE")
            settings.append((key, override_value(raw)))
        for key, value in [*settings, *(texts or {}).items()]:
            section, dot, name = key.partition(".")
            if dot and section in SECTIONS:
                values[section][name] = value
            else:
                values[key] = value
        return cls.from_dict(values)


class _TextDates(yaml.SafeLoader):
    """YAML without timestamps: ``run_id: 2026-11-25`` stays the text it is, not a date."""


_TextDates.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_TextDates)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a dict, or an ``InputError`` naming the file and what is wrong with it."""
    try:
        values = parse_yaml(Path(path).read_text())
    except OSError as error:
        raise InputError(f"config file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise InputError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if values is not None and not isinstance(values, dict):
        raise InputError(f"config file {path} must be a mapping of field: value, got {type(values).__name__}")
    return values or {}


def override_value(raw: str) -> Any:
    """An override's value: YAML for lists, maps, null and quoted text, else the text as given
    (the field's type converts it)."""
    if raw.strip()[:1] in ("[", "{", '"', "'") or raw.strip() in ("", "null", "~"):
        try:
            return parse_yaml(raw)
        except yaml.YAMLError as error:
            raise InputError(
                f"override value {raw!r} is not valid YAML: {str(error).splitlines()[0]}"
            ) from None
    return raw


def _problem(error: dict) -> str:
    """One pydantic error as ``field = value: what is allowed``."""
    field = ".".join(str(part) for part in error["loc"])
    if error["type"] == "value_error":  # our own bounds (__post_init__): they name field and value
        message = str(error["ctx"]["error"]).removeprefix("invalid run config: ")
        return f"{field}: {message.removeprefix('invalid config: ')}" if field else message
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown field {field}"
    return f"{field} = {error['input']!r}: {error['msg']}"


# Types from the dataclasses' own annotations; unknown keys refused (a typo must not do nothing).
_VALIDATOR = pydantic.TypeAdapter(RunConfig)
