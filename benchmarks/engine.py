"""Engine cost: seconds, UNet evaluations, FLOPs, utilisation and peak memory of stage 1 (inversion
and tuning) per image and stage 2 (editing) per edit, per batch size and per speed lever.

    python -m benchmarks.engine                          # tiny random model, CPU, batches 1 2 4 8
    python -m benchmarks.engine --levers                 # each lever against the baseline, same run
    python -m benchmarks.engine --batches 1 --levers pti.control=auto pti.control=auto,pti.local_blend=true
                                                         # config levers: attention control, with and
                                                         # without local blend, against plain editing
    python -m benchmarks.engine --model sd15 --batches 1 --edits 1 --set pti.steps=1 pti.inner_steps=1
                                                         # SD 1.5's architecture at 512x512 on the CPU
    python -m benchmarks.engine --model sd15 --dtype bfloat16 float16 --timed-steps 3   # on a GPU:
                                                         # 3 of 50 steps timed, both dtypes
    python -m benchmarks.engine --model sdxl --dtype bfloat16 --batches 1 --timed-steps 3

``--set pti.FIELD=VALUE`` sets the engine's config as the jobs' ``--set`` does (PTIConfig's
defaults: T=50, K=10). ``sd15``, ``sdxl``, ``sd35-medium`` and ``sd35-large`` are the published
architectures with seeded random weights: nothing is downloaded, and cost does not depend on the
weights. A lever is one of ``LEVERS`` (a code change, in a process of its own: it may change the
model) or ``pti.FIELD=VALUE[,...]`` (a config change, in the baseline's process). FLOPs are each
model's pieces counted once on the meta device (``count_pieces``), priced by ALGORITHM.md's formula
at the evaluations each case measured (``with_flops``); utilisation is against the matmul peak
measured in the same run. Results print as a table, are appended to ``docs/benchmarks.md`` and, with
``--jsonl FILE``, go to FILE as JSON lines as each case ends (``benchmarks.gpu_check`` reads them).
Under attention control each image's source branch runs beside its ``n`` edits: an edit costs
``2T (n + 1) / n`` UNet evaluations against plain editing's ``2T``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode

from benchmarks.common import (
    add_set_option,
    append_record,
    child_rows,
    machine,
    markdown_table,
    model_folder,
    peak_resident_mb,
    pti_settings,
    reset_peak_resident,
    resident_mb,
    write_rows,
)

PROMPTS = ("a photo of a cat", "a watercolor painting", "a photo of a dog wearing a hat", "a pencil sketch")
# The source prompt under attention control: PROMPTS are then a word swap (auto: replace) or words
# added and removed (auto: refine).
CONTROL_SOURCE = "a photo of a dog"

# --- models ----------------------------------------------------------------------------------


def load_model(name: str, device: str, dtype: str):
    """``name`` (``common.model_folder``'s) on ``device`` in ``dtype``: a published architecture
    with seeded random weights (cost does not depend on them), else the checkpoint's own."""
    from pipeline.engine.models import load_stable_diffusion
    from pipeline.world.architectures import ARCHITECTURES

    weights = name not in ARCHITECTURES
    return load_stable_diffusion(model_folder(name), device=device, dtype=dtype, weights=weights)


def meta_model(name: str):
    """``name``'s architecture on the meta device: shapes without memory or weights, built in
    seconds, for counting FLOPs (``count_pieces``). ``name``: one of ``ARCHITECTURES``, ``tiny``
    or a checkpoint folder (its configs)."""
    from pipeline.engine.models import load_stable_diffusion

    return load_stable_diffusion(model_folder(name), device="meta", weights=False)


# --- the levers: each changes one thing of the engine as shipped ------------------------------
# The levers whose decisions docs/benchmarks.md records (weight gradients, the fixed branch once
# per timestep, SDPA, one UNet call for both guidance branches, the batched VAE) left at commit
# 34b7058, which still runs them.


class TensorTimestep:
    """The UNet called with its timestep as a tensor on the device, not a Python int: a compiled or
    graphed UNet then serves every timestep with the same graphs (to torch.compile an int is a
    constant: on the tiny model, T=4, it made twice the graphs in four times the compile time)."""

    def __init__(self, unet):
        self.unet, self.timesteps = unet, {}

    def timestep(self, t: int, device: torch.device) -> torch.Tensor:
        if t not in self.timesteps:
            self.timesteps[t] = torch.tensor(t, device=device)
        return self.timesteps[t]

    def __call__(self, z, t, encoder_hidden_states):
        return self.unet(z, self.timestep(t, z.device), encoder_hidden_states=encoder_hidden_states)


class GraphedUNet(TensorTimestep):
    """The UNet replayed from CUDA graphs (``torch.cuda.make_graphed_callables``: forward, and
    backward when the embedding needs a gradient), one per input shape and grad mode, captured at
    first use. A call then launches one graph instead of the UNet's hundreds of kernels. Outputs
    are cloned: the next replay of the same graph overwrites them."""

    def __init__(self, unet):
        super().__init__(unet)
        self.graphs = {}

    def capture(self, z, t, emb):
        def forward(z, t, emb):
            return self.unet(z, t, encoder_hidden_states=emb).sample

        # Copies: a replay copies each call's inputs into these, which must not be the cached timesteps.
        sample_args = (z.detach().clone(), t.clone(), emb.detach().clone().requires_grad_(emb.requires_grad))
        return torch.cuda.make_graphed_callables(forward, sample_args)

    def __call__(self, z, t, encoder_hidden_states):
        emb = encoder_hidden_states
        key = (tuple(z.shape), tuple(emb.shape), emb.requires_grad)
        t = self.timestep(t, z.device)
        if key not in self.graphs:
            self.graphs[key] = self.capture(z, t, emb)
        return SimpleNamespace(sample=self.graphs[key](z, t, emb).clone())


# One compiled (or graphed) UNet per model, so the warm-up compiles what the timed run uses; each
# holds its model, so no id is reused while the process lives.
_WRAPPED = {}


def _wrapped_unet(wrap):
    def apply(engine):
        unet = engine.eps.unet
        if id(unet) not in _WRAPPED:
            _WRAPPED[id(unet)] = wrap(unet)
        engine.eps.unet = _WRAPPED[id(unet)]

    return apply


CUDA_ONLY = {"compile", "cuda_graphs"}


def is_config_lever(name: str) -> bool:
    """A lever that changes the config, ``pti.FIELD=VALUE[,...]``, not the code: its case runs the
    engine as shipped with that config, so it may share the baseline's process and model."""
    return name.startswith("pti.")


LEVERS = {  # name -> (what it changes, applied before stage 1, applied before stage 2)
    "baseline": ("the engine as shipped", None, None),
    "channels_last": (
        "UNet in channels-last memory format",
        lambda e: e.sd.unet.to(memory_format=torch.channels_last),
        None,
    ),
    "compile": (  # stage 2 stays eager: its batch shape would cost a third compile in the GPU check
        "torch.compile of the UNet in stage 1 (CUDA only; static shapes, timesteps as tensors)",
        _wrapped_unet(lambda unet: TensorTimestep(torch.compile(unet, dynamic=False))),
        lambda e: setattr(e.eps, "unet", e.sd.unet),
    ),
    "cuda_graphs": (
        "the UNet replayed from CUDA graphs, one per shape and grad mode (CUDA only)",
        _wrapped_unet(GraphedUNet),
        None,
    ),
}


# --- counting FLOPs ---------------------------------------------------------------------------


def _register_cpu_attention_flops() -> None:
    """torch's FLOP counter has formulas for the CUDA attention kernels but not for the CPU's
    flash kernel, which does the same work: count it with torch's own formulas (two matmuls
    forward; five backward, as the fused backward recomputes the scores)."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in torch.utils.flop_counter.flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(
        grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
    ) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# --- FLOPs without running: the meta device ---------------------------------------------------


class FusedAttention(TorchFunctionMode):
    """Attention on the meta device through the fused kernel the CPU runs (the CPU's flash
    attention, which torch counts as it counts CUDA's flash and memory-efficient kernels), not the
    unfused math path meta takes by itself: the same FLOPs forward, but a backward that recomputes
    the attention scores (five matmuls, not four), as the kernels that tuning runs on do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, key, value, *more = args
            plain = not more and kwargs.get("attn_mask") is None and not kwargs.get("dropout_p")
            if query.device.type == "meta" and plain and not kwargs.get("enable_gqa"):
                fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
                return fused(
                    query, key, value, is_causal=kwargs.get("is_causal", False), scale=kwargs.get("scale")
                )[0]
        return func(*args, **kwargs)


def count_pieces(sd, prompt: str = PROMPTS[0]) -> dict:
    """FLOPs of the pieces the stages are made of, for one image (one batch row) at the model's
    resolution, counted by ``torch.utils.flop_counter`` on whatever device ``sd`` is on: on the
    meta device (``meta_model``) nothing is computed or allocated, only shapes.

    ``forward``: one UNet call as the engine makes it (``NoisePredictor``: SDXL's pooled embedding
    and time ids as ``added_cond_kwargs``). ``forward_backward``: the same, then the gradient to the
    embedding alone, which requires grad while the UNet's parameters do not, exactly as tuning
    does (SDXL: the pooled embedding too, as the joined embedding's last row). ``encode`` and
    ``decode``: the VAE. ``text``: ``encode_prompts`` of one prompt (SDXL: both encoders).
    ``embedding``: one conditional embedding's shape as the engine carries it (SDXL: ``L + 1``
    rows, the pooled one last). On the meta device attention is counted as ``FusedAttention`` says."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.engine.models import NoisePredictor
    from pipeline.engine.text import encode_prompts

    _register_cpu_attention_flops()
    eps, vae, counted = NoisePredictor(sd), sd.vae, {}
    side = sd.resolution // sd.vae_scale_factor
    z = torch.randn(1, sd.unet.config.in_channels, side, side, device=sd.device)
    pixels = torch.rand(1, 3, sd.resolution, sd.resolution, device=sd.device)
    t = sd.scheduler.config.num_train_timesteps // 2  # any: every timestep costs the same

    def count(name: str, work):
        with FlopCounterMode(display=False) as counter, FusedAttention():
            out = work()
        counted[name] = counter.get_total_flops()
        return out

    def forward_backward():
        emb = cond.detach().clone().requires_grad_(True)
        out = eps(z, t, emb)
        out.backward(torch.ones_like(out))  # as tuning does (autograd.grad trips the counter's hooks)
        return emb.grad

    with torch.no_grad():
        cond = count("text", lambda: encode_prompts(sd, [prompt]))
        count("forward", lambda: eps(z, t, cond))
        count("encode", lambda: vae.encode((2 * pixels - 1).to(vae.dtype)).latent_dist.mean)
        count("decode", lambda: vae.decode(z.to(vae.dtype)).sample)
    with torch.enable_grad():
        count("forward_backward", forward_backward)
    counted["embedding"] = tuple(cond.shape[1:])
    return counted


# --- one case ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    """The peak since ``_reset_peak_memory``: CUDA's peak allocated, the CPU's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_resident_mb()


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_resident()


def attention_plans(engine, source: str | None, targets) -> list | None:
    """Each edit's attention control under the engine's config, or None for plain editing."""
    if engine.config.control == "none":
        return None
    return [engine.attention_plan(source, t) for t in targets]


def first_steps(schedule, n: int):
    """The first ``n`` steps (``tau_0 .. tau_n``) of a schedule (DDIM's or the flow's). Every step of
    inversion, tuning and sampling costs the same model work whatever its timestep, so timing the
    first ``n`` of ``T`` steps and scaling by ``T / n`` is exact up to timing noise."""
    import dataclasses

    levels = {f.name: getattr(schedule, f.name)[: n + 1] for f in dataclasses.fields(schedule)}
    return dataclasses.replace(schedule, **levels)


def end_of_sampling(engine) -> tuple[list[float], Callable]:
    """A step callback for ``engine.edit`` (``algorithm.StepCallback``) that marks when its last
    sampling step has ended, the device synchronised: what stage 2 spends after it is decoding,
    which does not repeat per step. (Under attention control a callback costs two gathers of the
    latents per step, microseconds against a UNet call.)"""
    ended, last = [], engine.schedule.num_steps - 1

    def callback(state: dict) -> None:
        if state["step"] == last:
            _sync(state["z"].device)
            ended.append(time.perf_counter())

    return ended, callback


def timed_text_encoding(engine, prompts: list[str]) -> float:
    """Seconds to encode ``prompts`` with the engine's text encoder, as stage 2 does first."""
    from pipeline.engine.text import encode_prompts

    _sync(engine.sd.device)
    started = time.perf_counter()
    encode_prompts(engine.sd, prompts)
    _sync(engine.sd.device)
    return time.perf_counter() - started


def run_case(case: dict, sd=None) -> dict:
    """Stage 1 on ``batch`` photographs and stage 2 on ``edits`` edits of each, timed after a
    one-step warm-up of both (allocator, kernels, and compilation where it is on).

    ``pti``: PTIConfig fields. With ``timed_steps`` (fewer than T), the first that many steps of the
    T-step schedule are timed and the per-step parts (inversion, tuning, sampling: seconds and UNet
    evaluations) are scaled to all T (``first_steps``); encoding and decoding are not. ``sd``: the
    case's model already loaded, else it is loaded.
    """
    from pipeline.engine.config import PTIConfig
    from pipeline.engine.engine import Engine
    from pipeline.world.tiny import photographs

    sd = sd or load_model(case["model"], case["device"], case["dtype"])
    config = PTIConfig(**{"progress": False, "model": case["model"], **case.get("pti", {})})
    steps, timed = config.steps, min(case.get("timed_steps") or config.steps, config.steps)
    _, before_one, before_two = LEVERS.get(case["lever"], LEVERS["baseline"])  # a config lever: as is
    engine, warm = Engine(sd, config), Engine(sd, config.replace(steps=1))
    engine.schedule = first_steps(engine.schedule, timed)
    for e in (engine, warm):
        if before_one:
            before_one(e)
    batch = case["batch"]
    pixels = photographs(engine.resolution, batch)
    sources = [None if config.control == "none" else CONTROL_SOURCE] * batch  # attention control needs one
    fan = [(b, PROMPTS[k % len(PROMPTS)], 0.8) for b in range(batch) for k in range(case["edits"])]
    rows, targets, etas = zip(*fan)
    plans = {e: attention_plans(e, sources[0], targets) for e in (warm, engine)}
    loaded_mb = resident_mb() if sd.device.type == "cpu" else torch.cuda.memory_allocated() / 2**20

    for e in (warm, engine):
        _reset_peak_memory(sd.device)
        _sync(sd.device)
        started = time.perf_counter()
        inversion = e.invert_and_tune(pixels, sources)
        _sync(sd.device)
        stage_one, stage_one_calls, stage_one_evals = (
            time.perf_counter() - started,
            e.eps.calls,
            e.eps.evaluations,
        )
        stage_one_peak = _peak_memory_mb(sd.device)
        if before_two:
            before_two(e)
        _reset_peak_memory(sd.device)
        ended, callback = end_of_sampling(e)
        started = time.perf_counter()
        e.edit(inversion, rows, targets, etas, plans=plans[e], callback=callback)
        _sync(sd.device)
        finished = time.perf_counter()
        stage_two, decoding = finished - started, finished - ended[-1]
        if e is warm:
            warmup = stage_one + stage_two
    per_step_one = inversion.seconds["invert"] + inversion.seconds["tune"]
    # Stage 2's parts that do not repeat per step: decoding, and encoding the target prompts (timed
    # again apart, as edit() does it inside).
    fixed_two = decoding + timed_text_encoding(engine, list(targets))
    scale = steps / timed
    return {
        **case,
        "steps": steps,
        "inner_steps": config.inner_steps,
        "resolution": engine.resolution,
        "timed_steps": timed,
        "warmup_s": warmup,
        "stage1_s_per_image": (stage_one + per_step_one * (steps - timed) / timed) / batch,
        "tune_s_per_image": inversion.seconds["tune"] * scale / batch,
        "stage1_calls": stage_one_calls * scale,
        "stage1_evals_per_image": stage_one_evals * scale / batch,
        "stage1_evals_timed_per_image": stage_one_evals / batch,
        "inner_steps_taken": float(inversion.inner_steps.float().sum(1).mean()) * scale,
        "stage2_s_per_edit": (fixed_two + (stage_two - fixed_two) * scale) / len(fan),
        "stage2_calls": (engine.eps.calls - stage_one_calls) * scale,
        "stage2_evals_per_edit": (engine.eps.evaluations - stage_one_evals) * scale / len(fan),
        "stage1_peak_mb": stage_one_peak,
        "stage2_peak_mb": _peak_memory_mb(sd.device),
        "loaded_mb": loaded_mb,
    }


def run_group(cases: list[dict]) -> None:
    """The cases of one model, device and dtype on one loaded model, one JSON line each as it ends;
    a case that fails (out of memory, a lever that does not fit) ends the group with its error."""
    import gc
    import traceback

    sd = load_model(cases[0]["model"], cases[0]["device"], cases[0]["dtype"])
    for case in cases:
        try:
            row = run_case(case, sd)
        except Exception as exc:  # noqa: BLE001 - reported as the case's row
            traceback.print_exc()
            row = {**case, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(json.dumps(row), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if "error" in row:
            return


def groups_of(cases: list[dict]) -> list[list[int]]:
    """The cases' indices by the process that runs them: the baseline cases of one model, device
    and dtype together, with the config levers; every other lever alone (it may change the model)."""
    groups: dict = {}
    for i, case in enumerate(cases):
        shared = case["lever"] == "baseline" or is_config_lever(case["lever"])
        key = (case["model"], case["device"], case["dtype"]) if shared else i
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def with_flops(row: dict, pieces: dict, peak: float) -> dict:
    """A case's counted FLOPs at the evaluations it measured (``priced``: early stop counts), its
    FLOP/s, and stage 1's share of the matmul ``peak``."""
    from pipeline.engine.config import priced

    evals, inner, steps = row["stage1_evals_per_image"], row["inner_steps_taken"], row["steps"]
    stage_one = priced(pieces, evals, backward=inner, encodes=1, decodes=1) / 1e12
    edit = priced(pieces, row["stage2_evals_per_edit"], decodes=1, prompts=1) / 1e12
    tuning = priced(pieces, evals - steps, backward=inner) / 1e12  # all but inversion's T forwards
    row = dict(row, stage1_tflop_per_image=stage_one, tune_tflop_per_image=tuning, edit_tflop_per_edit=edit)
    row["stage1_tflops"] = stage_one / row["stage1_s_per_image"]
    row["tune_tflops"] = tuning / row["tune_s_per_image"]
    row["stage2_tflops"] = edit / row["stage2_s_per_edit"]
    row["stage1_of_peak"] = f"{row['stage1_tflops'] / peak:.1%}"
    return dict(row, peak_tflops=peak)


# --- the peak, and the sweep ------------------------------------------------------------------


def matmul_peak_tflops(device: str, dtype: str, sizes: tuple[int, ...] | None = None) -> float:
    """The device's measured dense matmul throughput in its compute dtype, the best over a few
    sizes (``n x n`` by ``n x n``): the roof for utilisation."""
    from pipeline.engine.models import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    best = 0.0
    sizes = sizes or ((4096, 8192, 16384) if torch_device.type == "cuda" else (512, 1024, 2048))
    for n in sizes:
        a, b = (torch.randn(n, n, device=torch_device, dtype=torch_dtype) for _ in range(2))
        a @ b  # warm-up
        for _ in range(3):
            _sync(torch_device)
            started = time.perf_counter()
            for _ in range(3):
                a @ b
            _sync(torch_device)
            best = max(best, 3 * 2 * n**3 / (time.perf_counter() - started) / 1e12)
    del a, b
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()  # the cases' processes need the memory
    return best


def best_of(runs: list[dict]) -> dict:
    """The fastest time of each stage over repeated runs of one case."""
    row = dict(runs[0])
    for key in ("stage1_s_per_image", "tune_s_per_image", "stage2_s_per_edit"):
        row[key] = min(r[key] for r in runs)
    return row


COLUMNS = {
    "dtype": "dtype",
    "batch": "batch",
    "lever": "lever",
    "stage1_s_per_image": "stage 1 s/image",
    "tune_s_per_image": "tuning s/image",
    "stage1_evals_per_image": "stage 1 UNet evals/image",
    "inner_steps_taken": "inner steps/image",
    "stage2_s_per_edit": "stage 2 s/edit",
    "stage2_evals_per_edit": "stage 2 UNet evals/edit",
    "stage1_tflop_per_image": "stage 1 TFLOP/image",
    "edit_tflop_per_edit": "stage 2 TFLOP/edit",
    "stage1_tflops": "stage 1 TFLOP/s",
    "stage1_of_peak": "of peak",
    "tune_tflops": "tuning TFLOP/s",
    "stage2_tflops": "stage 2 TFLOP/s",
    "warmup_s": "warm-up s",
    "loaded_mb": "model loaded MB",
    "stage1_peak_mb": "stage 1 peak MB",
    "stage2_peak_mb": "stage 2 peak MB",
}


def cases_of(args, parser, pti: dict) -> tuple[str, list[dict]]:
    """The run's title and cases: by batch and dtype, or each lever at the largest batch."""
    base = dict(model=args.model, timed_steps=args.timed_steps, edits=args.edits, device=args.device, pti=pti)
    if args.levers is not None:
        runnable = [name for name in LEVERS if name not in CUDA_ONLY or torch.cuda.is_available()]
        unknown = [n for n in args.levers if n not in LEVERS and not is_config_lever(n)]
        if unknown:
            parser.error(
                f"unknown lever(s) {', '.join(unknown)}: name {', '.join(LEVERS)} or pti.FIELD=VALUE"
            )
        levers = dict.fromkeys(["baseline", *(args.levers or runnable)])
        changed = {n: {**pti, **pti_settings(n.split(","))} for n in levers if is_config_lever(n)}
        batch = max(args.batches)
        return "Engine levers", [
            dict(base, dtype=d, batch=batch, lever=n, pti=changed.get(n, pti))
            for d in args.dtype
            for n in levers
        ]
    return "Engine cost by batch size", [
        dict(base, dtype=d, batch=b, lever="baseline") for d in args.dtype for b in args.batches
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny", help="tiny, sd15, sdxl, sd35-medium, or a checkpoint folder"
    )
    add_set_option(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--timed-steps", type=int, help="time the first N steps, scaled to T (first_steps)")
    parser.add_argument("--edits", type=int, default=4, help="edits per image in stage 2 (targets x etas)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", nargs="+", default=["auto"])
    parser.add_argument(
        "--levers",
        nargs="*",
        metavar="LEVER",
        help=f"at the largest batch: {', '.join(LEVERS)}, or pti.FIELD=VALUE (a config lever)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each case, interleaved; the fastest counts"
    )
    parser.add_argument("--jsonl", help="also append each case's row to this file as a JSON line")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to docs/")
    parser.add_argument("--cases", help=argparse.SUPPRESS)  # one group of cases, in a subprocess
    args = parser.parse_args(argv)
    if args.cases:
        run_group(json.loads(args.cases))
        return
    pti = pti_settings(args.set)
    if args.model in ("sdxl", "sd35-medium", "sd35-large") and not torch.cuda.is_available():
        parser.error(f"{args.model} at 1024x1024 takes hours on a CPU: its FLOPs are in docs/scaling.md")
    title, cases = cases_of(args, parser, pti)
    peak, on = matmul_peak_tflops(args.device, args.dtype[0]), machine()
    pieces = count_pieces(meta_model(args.model))
    runs: list[list[dict]] = [[] for _ in cases]
    for _ in range(args.repeat):  # interleaved, so a machine that slows down slows every case
        for group in groups_of(cases):
            found = child_rows(["-m", "benchmarks.engine", "--cases", json.dumps([cases[i] for i in group])])
            for row, i in zip(found, group):  # each row as its case ends
                row = dict(row if "error" in row else with_flops(row, pieces, peak), machine=on)
                write_rows(args.jsonl, [row])
                if "error" not in row:
                    runs[i].append(row)
    rows = [best_of(kept) for kept in runs if kept]
    if not rows:
        raise SystemExit("benchmarks.engine: no case finished")
    first = rows[0]
    config_line = ", ".join(f"{k}={v}" for k, v in pti.items()) or "PTIConfig's defaults"
    timed = f" (first {args.timed_steps} steps timed, scaled)" if args.timed_steps else ""
    setting = (
        f"model `{args.model}` at {first['resolution']}x{first['resolution']}, T={first['steps']}{timed}, "
        f"K={first['inner_steps']} ({config_line}), best of {args.repeat} interleaved run(s) per case, "
        f"{args.edits} edits per image, device {args.device}; measured {args.dtype[0]} matmul peak "
        f"{peak:.3g} TFLOP/s"
    )
    table = markdown_table(rows, COLUMNS)
    if any(r["pti"].get("control", "none") != "none" for r in rows):
        setting += (
            f"; source prompt {CONTROL_SOURCE!r}, targets cycling through {', '.join(map(repr, PROMPTS))}"
        )
    if args.levers is not None:
        table += "\n\n" + "\n".join(
            f"- `{r['lever']}` ({LEVERS.get(r['lever'], ['the config with ' + r['lever']])[0]}): "
            f"stage 1 x{r['stage1_s_per_image'] / first['stage1_s_per_image']:.2f}, "
            f"stage 2 x{r['stage2_s_per_edit'] / first['stage2_s_per_edit']:.2f} the baseline's time"
            for r in rows[1:]
        )
    print(f"\n{setting}\n\n{table}")
    if args.record:
        append_record("benchmarks.engine", title, f"{setting}.\n\n{table}")


if __name__ == "__main__":
    main()
