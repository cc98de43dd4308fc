"""The one config object of a run: every default of ALGORITHM.md, written beside every output."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError

METHODS = ("pti", "ddim", "nti", "npi")
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

@dataclass(frozen=True)
class PTIConfig:
    """How stage 1 (inversion and tuning) and stage 2 (editing) run.

    ``method``: ``pti`` (Dong et al. 2023), ``ddim`` (inversion, then target sampling with
    guidance), ``nti`` (null-text inversion), ``npi`` (negative-prompt inversion).
    """

    model: str = DEFAULT_MODEL
    method: str = "pti"
    steps: int = 50  # T, DDIM steps
    guidance: float = 7.5  # w, for tuning and editing
    inversion_guidance: float = 0.0  # 0: unconditional inversion (the paper); 1: on c_src
    inner_steps: int = 10  # K, Adam steps per timestep at most
    lr: float = 1e-2  # decays to lr / 2 over the T timesteps
    early_stop: bool = True
    stop_eps: float = 1e-5
    stop_slack: float = 2e-5
    etas: tuple[float, ...] = (0.6, 0.8)  # weight on the target prompt; 0 is the reconstruction
    resolution: int | None = None  # None: the model's own (512 for SD 1.x)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: float32 on the CPU, float16 on CUDA
    embedding_dtype: str = "float16"  # how tuned embeddings are stored
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "etas", tuple(float(e) for e in self.etas))
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.steps < 1:
            problems.append(f"steps must be at least 1, got {self.steps}")
        if self.inner_steps < 0:
            problems.append(f"inner_steps must be 0 or more, got {self.inner_steps}")
        if self.inversion_guidance not in (0, 1):
            problems.append(f"inversion_guidance must be 0 or 1, got {self.inversion_guidance}")
        if self.embedding_dtype not in ("float16", "float32"):
            problems.append(f"embedding_dtype must be float16 or float32, got {self.embedding_dtype!r}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            problems.append(f"resolution must be a positive multiple of 8, got {self.resolution}")
        problems += [p for p in (check_eta(e) for e in self.etas) if p]
        if problems:
            raise InputError("invalid config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PTIConfig":
        return from_known_fields(cls, values, "config")

    def replace(self, **changes) -> "PTIConfig":
        return dataclasses.replace(self, **changes)

    def stage_one_fingerprint(self, model_fingerprint: str) -> str:
        """A hash of everything that determines stage-1 results (not the edit settings)."""
        keys = ("method", "steps", "guidance", "inversion_guidance", "inner_steps", "lr",
                "early_stop", "stop_eps", "stop_slack", "resolution", "seed", "dtype")  # fmt: skip
        payload = {k: getattr(self, k) for k in keys} | {"model": model_fingerprint}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

def from_known_fields(cls, values: dict[str, Any], what: str):
    """A dataclass from a dict, refusing unknown keys (a typo must not silently do nothing)."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InputError(f"unknown {what} field(s): {', '.join(unknown)}")
    return cls(**values)


def check_eta(eta: float) -> str | None:
    """The problem with an interpolation weight, or None."""
    if not 0.0 <= eta <= 1.0:  # also refuses NaN
        return f"eta must be in [0, 1], got {eta}"
    return None
