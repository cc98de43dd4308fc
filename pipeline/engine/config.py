"""The one config object of a run: every default of ALGORITHM.md, written beside every output."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError

# The rules of the values a manifest row may override too (eta_problem: also the engine's).
from schemas.manifest import eta_problem, guidance_problem, reweight_problem  # noqa: F401

if TYPE_CHECKING:  # the algorithm needs torch; a driver that reads configs must not
    from pipeline.engine.algorithm import TuningOptions

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# The settings that determine stage 1's results, hashed by stage_one_fingerprint. Not the seed:
# stage 1 draws no random numbers (DDIM inversion and Adam are deterministic, the VAE gives its mean).
STAGE_ONE_FIELDS = (
    "method",
    "steps",
    "guidance",
    "inversion_guidance",
    "inner_steps",
    "lr",
    "early_stop",
    "stop_eps",
    "stop_slack",
    "resolution",
    "dtype",
)
# ... with the precision stage 1's embeddings are stored in: what shapes what is stored.
STORED_FIELDS = (*STAGE_ONE_FIELDS, "embedding_dtype")
# Stage 2b: how attention control shapes the edits (ALGORITHM.md; Hertz et al. 2023).
CONTROL_FIELDS = (
    "control",
    "cross_replace_steps",
    "self_replace_steps",
    "local_blend",
    "blend_threshold",
    "reweight",
)
# ... and what also shapes the edits. Device and progress bars shape nothing.
EDIT_FIELDS = (*STORED_FIELDS, "etas", *CONTROL_FIELDS)
# none: the paper's plain interpolation; replace (word swap), refine (words added or removed),
# reweight (named words' attention scaled); auto: replace for equal word counts, else refine.
CONTROLS = ("none", "replace", "refine", "reweight", "auto")


@dataclass(frozen=True)
class Method:
    """How a stage-1 method treats the two branches of classifier-free guidance.

    Stage 1 yields one embedding per timestep for one branch (``branch``); the other branch keeps
    one embedding at every step:

    - ``"cond"``: the conditional embedding, learned (``tuned``) or fixed to its start; the
      unconditional branch is ``psi("")``.
    - ``"uncond"``: the unconditional embedding, learned or fixed to its start; the conditional
      branch is ``psi(source)``.

    ``start``: where the per-step embedding starts, ``"source"`` (``psi(source)``) or ``"null"``
    (``psi("")``). ``inverts_on_source``: DDIM inversion runs at guidance 1 on ``psi(source)``
    whatever the config's ``inversion_guidance``, as the method's paper does.
    """

    name: str
    branch: str  # "cond" or "uncond"
    tuned: bool  # Adam steps on the per-step embedding, or none
    start: str  # "source" or "null"
    inverts_on_source: bool

    def __post_init__(self):
        if self.branch not in ("cond", "uncond") or self.start not in ("source", "null"):
            raise ValueError(
                f"method {self.name!r}: branch must be cond or uncond and start source or null, "
                f"got {self.branch!r} and {self.start!r}"
            )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # Prompt Tuning Inversion (Dong et al., ICCV 2023): learn the conditional embedding.
        Method("pti", branch="cond", tuned=True, start="source", inverts_on_source=False),
        # DDIM inversion, then sampling with guidance on psi(source): PTI without the tuning.
        Method("ddim", branch="cond", tuned=False, start="source", inverts_on_source=False),
        # Null-text inversion (Mokady et al., CVPR 2023): learn the unconditional embedding.
        Method("nti", branch="uncond", tuned=True, start="null", inverts_on_source=True),
        # Negative-prompt inversion (Miyake et al. 2023): psi(source) as the unconditional one.
        Method("npi", branch="uncond", tuned=False, start="source", inverts_on_source=True),
    )
}


@dataclass(frozen=True)
class PTIConfig:
    """How stage 1 (inversion and tuning) and stage 2 (editing) run.

    ``method``: a name in ``METHODS``: ``pti`` (Dong et al. 2023), ``ddim`` (inversion, then target
    sampling with guidance), ``nti`` (null-text inversion, Mokady et al. 2023), ``npi``
    (negative-prompt inversion, Miyake et al. 2023).
    """

    # Unknown keys refused by the batch layer's typed loader (pydantic reads this; no import here).
    __pydantic_config__ = {"extra": "forbid"}

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
    control: str = "none"  # attention control of the edits: one of CONTROLS
    cross_replace_steps: float = 0.8  # the first steps whose cross-attention is the source's
    self_replace_steps: float = 0.4  # ... and whose low-resolution self-attention is
    local_blend: bool = False  # keep the source outside the blend words (default: the words that differ)
    blend_threshold: float = 0.3  # of the blend words' normalised attention
    reweight: dict[str, float] | None = None  # word -> factor on its cross-attention in the edits
    resolution: int | None = None  # None: the model's own (512 for SD 1.x)
    seed: int = 0  # shapes nothing: both stages are deterministic (kept so configs that set it load)
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
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        problems += [
            f"{name} must be >= 0, got {getattr(self, name)}"
            for name in ("stop_eps", "stop_slack")
            if not getattr(self, name) >= 0
        ]
        problems += [p for p in (guidance_problem(self.guidance), *map(eta_problem, self.etas)) if p]
        if self.inner_steps < 0:
            problems.append(f"inner_steps must be 0 or more, got {self.inner_steps}")
        if self.inversion_guidance not in (0, 1):
            problems.append(f"inversion_guidance must be 0 or 1, got {self.inversion_guidance}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            problems.append(f"device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            problems.append(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.embedding_dtype not in ("float16", "float32"):
            problems.append(f"embedding_dtype must be float16 or float32, got {self.embedding_dtype!r}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            problems.append(f"resolution must be a positive multiple of 8, got {self.resolution}")
        problems += self._control_problems()
        if problems:
            raise InputError("invalid config: " + "; ".join(problems))

    def _control_problems(self) -> list[str]:
        problems = []
        if self.control not in CONTROLS:
            problems.append(f"control {self.control!r} is not one of {', '.join(CONTROLS)}")
        for name in ("cross_replace_steps", "self_replace_steps", "blend_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        return problems + [p for p in [reweight_problem(self.reweight or {})] if p]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PTIConfig":
        return from_known_fields(cls, values, "config")

    def replace(self, **changes) -> "PTIConfig":
        return dataclasses.replace(self, **changes)

    @property
    def method_spec(self) -> Method:
        """The method's row of ``METHODS``: which embedding stage 1 learns or fixes, and how."""
        return METHODS[self.method]

    @property
    def tuned_inner_steps(self) -> int:
        """K as stage 1 runs it: ``inner_steps``, or 0 for a method that does not tune (ddim, npi)."""
        return self.inner_steps if self.method_spec.tuned else 0

    def unet_evaluations(self, edits: int = 1, controlled: bool = False) -> dict[str, int]:
        """ALGORITHM.md's cost in UNet evaluations (batch rows of one guidance branch), the one
        place its formula is written: ``stage_one`` per image at most ``T + T (1 + K + 1)``
        (inversion, then per timestep ``e_null``, at most K inner steps and the step itself; early
        stop only lowers it; K is 0 for a method that does not tune), and ``stage_two`` per image
        of ``edits`` edits, ``2T`` each, plus ``2T`` for the image's source branch under attention
        control (``controlled``)."""
        T, K = self.steps, self.tuned_inner_steps
        return {"stage_one": T + T * (1 + K + 1), "stage_two": 2 * T * (edits + int(controlled))}

    def flops(self, pieces: dict, edits: int = 1, controlled: bool = False) -> dict[str, float]:
        """ALGORITHM.md's cost in FLOPs: ``unet_evaluations`` priced by ``priced`` from counted
        ``pieces``. Stage 1 per image: ``e + T f + T (2f + K fb) + d`` (its ``T K`` inner steps run
        the backward pass); stage 2 per image of ``edits`` edits: its evaluations' ``f``, and one
        decode and one target prompt per edit."""
        cost = self.unet_evaluations(edits, controlled)
        inner = self.steps * self.tuned_inner_steps
        return {
            "stage_one": priced(pieces, cost["stage_one"], backward=inner, encodes=1, decodes=1),
            "stage_two": priced(pieces, cost["stage_two"], decodes=edits, prompts=edits),
        }

    def tuning_options(self) -> TuningOptions:
        """The options of stage 1b's loop for this config's method: no Adam steps for a method that
        does not tune (ddim, npi), whatever ``inner_steps`` says."""
        from pipeline.engine.algorithm import TuningOptions

        return TuningOptions(
            guidance=self.guidance,
            inner_steps=self.tuned_inner_steps,
            lr=self.lr,
            early_stop=self.early_stop,
            stop_eps=self.stop_eps,
            stop_slack=self.stop_slack,
        )

    def stage_one_fingerprint(self, model_fingerprint: str) -> str:
        """A hash of everything that determines stage-1 results (not the edit settings)."""
        payload = {k: getattr(self, k) for k in STAGE_ONE_FIELDS} | {"model": model_fingerprint}
        payload["seed"] = 0  # hashed at its default, as before the seed left STAGE_ONE_FIELDS: same hashes
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def priced(
    pieces: dict, evaluations: float, backward: float = 0, encodes: float = 0, decodes: float = 0, prompts=0
) -> float:
    """FLOPs of ``evaluations`` UNet rows, ``backward`` of them also back to the embedding, and of VAE
    encodes, decodes and prompt encodings, from the counted ``pieces`` of one row, image or prompt:
    ``forward`` f, ``forward_backward`` fb, ``encode`` e, ``decode`` d, ``text`` p."""
    f, fb = pieces["forward"], pieces["forward_backward"]
    vae_and_text = encodes * pieces["encode"] + decodes * pieces["decode"] + prompts * pieces["text"]
    return evaluations * f + backward * (fb - f) + vae_and_text


# Named stage-1 settings: PTIConfig fields over the defaults (docs/stage-one.md measures them).
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's defaults: T = 50, K = 10, lr 1e-2 decaying to half, early stop 1e-5 + j * 2e-5.
    "quality": {},
    # The cheapest frontier point of docs/stage-one.md on models/shapes-sd (64 px, 8 held-out scenes,
    # CPU): at w = 3 and 7.5, at most half the default's UNet evaluations (T(K + 3) = 260 against 650;
    # measured 241 / 260 against 528 / 617) at a higher latent PSNR (51.7 / 49.3 dB against 48.4 /
    # 47.9). A larger lr converges in fewer steps, so early stop ends more inner loops sooner.
    "fast": {"steps": 20, "inner_steps": 10, "lr": 3e-2},
}


def from_known_fields(cls, values: dict[str, Any], what: str):
    """A dataclass from a dict, refusing unknown keys (a typo must not silently do nothing)."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InputError(f"unknown {what} field(s): {', '.join(unknown)}")
    return cls(**values)
