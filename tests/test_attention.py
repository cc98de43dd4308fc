"""Prompt-to-Prompt attention control (ALGORITHM.md, stage 2b), checked against hand-worked token
alignments, hand-written attention, plain DDIM sampling, and its own claims (exact local blend,
batch independence, cost, restored processors)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import Attention

from pipeline.engine.algorithm import ddim_move, guided_noise, sample
from pipeline.engine.alignment import refinement_mapper, replacement_mapper, token_indices, word_token_indices
from pipeline.engine.attention import AttentionControl, local_blend_mask, sample_with_attention_control
from pipeline.engine.config import PTIConfig
from pipeline.engine.models import NoisePredictor
from pipeline.engine.plan import AttentionEdit, plan_attention_edit
from pipeline.engine.processor import ControlledAttnProcessor
from pipeline.engine.text import encode_prompts
from pipeline.errors import InputError

SOURCES = ["a photo of an astronaut", "a photo of a cat", "a cup of coffee"]
STEPS = 6
L = 77  # CLIP's context


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    return tiny_sd.tokenizer


# --- token alignment ---------------------------------------------------------------------------------
# The tiny tokenizer knows TINY_WORDS as one token each ("cat", "black", ...) and splits other words
# into byte-level pieces: "zebra" is 4 tokens (z, e, br, a), the last of which is the word "a".


def test_word_token_indices_follow_the_tokenizer_including_split_words(tokenizer):
    assert word_token_indices(tokenizer, "a zebra sitting") == [[1], [2, 3, 4, 5], [6]]
    assert word_token_indices(tokenizer, "a red cat.") == [[1], [2], [3, 4]]  # "cat." is cat + "."
    assert token_indices(tokenizer, "a zebra sitting", "zebra") == [2, 3, 4, 5]
    # The word "a", not the "a" piece that ends "zebra"; every occurrence.
    assert token_indices(tokenizer, "a zebra sitting", "a") == [1]
    assert token_indices(tokenizer, "a photo of a cat", "a") == [1, 4]
    with pytest.raises(InputError, match="'dog' is not in prompt"):
        token_indices(tokenizer, "a photo of a cat", "dog")


def test_replacement_mapper_maps_a_split_word_to_each_of_its_tokens(tokenizer):
    # "a cat sitting": BOS a cat sitting EOS; "a zebra sitting": BOS a z e br a sitting EOS.
    mapper = replacement_mapper(tokenizer, "a cat sitting", "a zebra sitting")
    expected = torch.zeros(L, L)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2:6] = 1 / 4  # cat's attention spread over zebra's four tokens
    for k in range(71):  # sitting, EOS and padding follow, three tokens later in the target
        expected[3 + k, 6 + k] = 1
    torch.testing.assert_close(mapper, expected, rtol=0, atol=0)

    back = replacement_mapper(tokenizer, "a zebra sitting", "a cat sitting")
    expected = torch.zeros(L, L)
    expected[0, 0] = expected[1, 1] = 1
    expected[2:6, 2] = 1  # zebra's four tokens all go to cat
    for k in range(71):
        expected[6 + k, 3 + k] = 1
    torch.testing.assert_close(back, expected, rtol=0, atol=0)
    assert back[:, 74:].abs().sum() == 0  # the target's last padding columns have no source left

    # Attention mass is kept wherever a source token has a target: all of it backwards, all but the
    # source's last three padding tokens (74..76) forwards.
    probs = torch.softmax(torch.randn(5, L, generator=torch.Generator().manual_seed(0)), -1)
    torch.testing.assert_close((probs @ back).sum(-1), torch.ones(5))
    torch.testing.assert_close((probs @ mapper).sum(-1), probs[:, :74].sum(-1))
    assert torch.equal(replacement_mapper(tokenizer, "a photo of a cat", "a photo of a cat"), torch.eye(L))


def test_replacement_mapper_swaps_several_words_token_to_token(tokenizer):
    mapper = replacement_mapper(tokenizer, "a red cat on a tree", "a blue dog on a house")
    assert torch.equal(mapper, torch.eye(L))  # every word is one token: positions stay
    with pytest.raises(InputError, match="same number of words.*use refine"):
        replacement_mapper(tokenizer, "a cat", "a big cat")


def test_refinement_mapper_aligns_added_and_removed_words(tokenizer):
    # A word added: "black" has no source token (alpha 0), the rest align, padding stays in place.
    mapper, alphas = refinement_mapper(tokenizer, "a cat sitting", "a black cat sitting")
    assert mapper[:6].tolist() == [0, 1, -1, 2, 3, 4]
    assert torch.equal(mapper[6:], torch.arange(6, L))
    assert alphas[:6].tolist() == [1, 1, 0, 1, 1, 1] and bool((alphas[6:] == 1).all())

    # A split word added: z e br a have no source; the word "a" keeps the source's "a".
    mapper, alphas = refinement_mapper(tokenizer, "a cat", "a zebra cat")
    assert mapper[:8].tolist() == [0, 1, -1, -1, -1, -1, 2, 3]
    assert alphas[:8].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]

    # Two words removed: x = BOS a big black cat sitting EOS, y = BOS a cat sitting EOS. The target's
    # first padding tokens (5, 6) take the source's EOS (6), never a source word.
    mapper, alphas = refinement_mapper(tokenizer, "a big black cat sitting", "a cat sitting")
    assert mapper[:8].tolist() == [0, 1, 4, 5, 6, 6, 6, 7]
    assert bool((alphas == 1).all())

    mapper, alphas = refinement_mapper(tokenizer, "a photo of a cat", "a photo of a cat")
    assert torch.equal(mapper, torch.arange(L)) and bool((alphas == 1).all())


def test_plan_schedules_steps_per_word_as_the_reference_rounds_them(tokenizer):
    edit = AttentionEdit(
        mode="replace",
        cross_replace_steps=0.8,
        self_replace_steps=0.4,
        word_replace_steps={"zebra": 0.4, "sitting": (0.2, 0.6)},
        reweight={"sitting": 2.0},
    )
    plan = plan_attention_edit(tokenizer, "a cat sitting", "a zebra sitting", edit, num_steps=10)
    alpha = plan.cross_alpha  # [T + 1, L]: int(f * 11) steps
    assert alpha.shape == (11, L)
    assert bool((alpha[:8, [0, 1, 7, 40]] == 1).all()) and bool((alpha[8:] == 0).all())
    assert alpha[:, 2].tolist() == [1] * 4 + [0] * 7  # zebra's tokens: int(0.4 * 11) = 4 steps
    assert bool((alpha[:, 2:6] == alpha[:, 2:3]).all())
    assert alpha[:, 6].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]  # sitting: steps 2..5
    assert plan.self_steps.tolist() == [True] * 4 + [False] * 6  # int(0.4 * 10)
    assert plan.weights[6] == 2 and float(plan.weights.sum()) == L + 1
    assert plan.blend_start is None


def test_a_row_without_source_prompt_may_only_reweight_and_inject_self_attention(tokenizer):
    for edit in (AttentionEdit(mode="replace"), AttentionEdit(blend_words=((), ("tiger",)))):
        with pytest.raises(InputError, match="^row 7: .*no source prompt"):
            plan_attention_edit(tokenizer, None, "a photo of a tiger", edit, 10, name="row 7")
    plan = plan_attention_edit(
        tokenizer, None, "a photo of a tiger", AttentionEdit(reweight={"tiger": 3.0}), 10
    )
    assert plan.weights[5] == 3 and float(plan.mapped.sum()) == 0  # the edit's own attention, reweighted
    with pytest.raises(InputError, match="^row 2: word 'dog' is not in prompt"):
        plan_attention_edit(
            tokenizer, "a cat", "a tiger", AttentionEdit(reweight={"dog": 2.0}), 10, name="row 2"
        )


# --- the processor -----------------------------------------------------------------------------------


def attention_by_hand(attn: Attention, hidden: torch.Tensor, context: torch.Tensor, probs_of=None):
    """Attention written out per row: ``probs_of(row, probs)`` may replace a row's probabilities."""
    h, d = attn.heads, attn.to_q.out_features // attn.heads

    def split(t):
        return t.view(t.shape[0], -1, h, d).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
    probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    if probs_of is not None:
        probs = probs_of(probs)
    out = (probs @ v).transpose(1, 2).reshape(hidden.shape[0], -1, h * d)
    return attn.to_out[0](out)


CASES = {
    "replace": (AttentionEdit(mode="replace", cross_replace_steps=1.0), "a zebra sitting"),
    "refine": (AttentionEdit(mode="refine", cross_replace_steps=1.0), "a black cat sitting"),
    "reweight": (AttentionEdit(reweight={"sitting": 2.0}, cross_replace_steps=1.0), "a cat sitting"),
    "self": (AttentionEdit(self_replace_steps=1.0), "a cat sitting"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_processor_controls_the_conditional_half_of_the_edit_only(tokenizer, case):
    edit, target = CASES[case]
    is_cross = case != "self"
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12 if is_cross else None, heads=2, dim_head=8).double()
    hidden = torch.randn(4, 9, 16, dtype=torch.float64)  # rows: uncond src, uncond edit, cond src, cond edit
    context = torch.randn(4, L, 12, dtype=torch.float64) if is_cross else hidden
    plan = plan_attention_edit(tokenizer, "a cat sitting", target, edit, num_steps=1)
    control = AttentionControl([0, 0], [None, plan], 1, (3, 3), self_max_positions=9, blend_positions=9)
    processor = ControlledAttnProcessor(control)
    with torch.no_grad():
        out = processor(attn, hidden, context if is_cross else None)
        plain = attention_by_hand(attn, hidden, context)
        mapper, alphas = refinement_mapper(tokenizer, "a cat sitting", target)
        weights = torch.ones(L, dtype=torch.float64)
        weights[3] = 2.0  # "sitting" is token 3 of "a cat sitting"
        edited = {  # the edit's new probabilities from the source's (row 2) and its own (row 3)
            "replace": lambda p: p[2] @ replacement_mapper(tokenizer, "a cat sitting", target).double(),
            "refine": lambda p: p[2][..., mapper] * alphas.double() + p[3] * (1 - alphas.double()),
            "reweight": lambda p: p[3] * weights,
            "self": lambda p: p[2],
        }[case]
        expected = attention_by_hand(attn, hidden, context, lambda p: torch.cat([p[:3], edited(p)[None]]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:3], plain[:3], rtol=0, atol=1e-12)  # the rest runs untouched
    assert float((out[3] - plain[3]).abs().max()) > 1e-3  # and the edit really changed
    assert control.explicit_calls == 1
    control.self_max_positions = 8  # a 9-position self-attention map is now too large to control
    if not is_cross:
        torch.testing.assert_close(processor(attn, hidden), plain, rtol=0, atol=1e-12)
        assert control.explicit_calls == 1  # the fused kernel ran


def test_local_blend_mask_pools_resizes_normalises_and_thresholds():
    maps = torch.zeros(2, 4, 4, dtype=torch.float64)
    maps[0, 0, 0], maps[0, 3, 3] = 1.0, 0.2  # a peak and a weak spot, below 0.3 of the peak
    mask = local_blend_mask(maps, (8, 8), torch.tensor([0.3, 0.3]))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True  # the peak's 3x3 max-pool covers cells (0..1, 0..1), each 2x2 latent cells
    assert torch.equal(mask[0, 0], expected)
    assert not bool(mask[1].any())  # a zero map (no blend word) masks nothing
    low = local_blend_mask(maps, (8, 8), torch.tensor([0.1, 0.1]))
    assert int(low[0].sum()) == 32  # now the weak spot's 3x3 (cells 2..3, 2..3) counts too


# --- controlled sampling -----------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    sd: object
    eps: NoisePredictor
    schedule: object
    z_T: torch.Tensor  # [3, 4, 8, 8]
    src: torch.Tensor  # psi(source) [3, L, D]
    c_t: torch.Tensor  # per-step conditional stack [3, T, L, D], as PTI stores
    null: torch.Tensor  # [3, L, D]
    null_t: torch.Tensor  # per-step unconditional stack [3, T, L, D], as null-text inversion stores

    def encode(self, prompts):
        return encode_prompts(self.sd, prompts).double()


@pytest.fixture(scope="module")
def setup(tiny_sd, make_engine, pixels):
    """The tiny model in float64 (so equalities are the algorithm's, not float noise), the three
    photographs inverted with DDIM, and per-step stacks standing in for tuned embeddings."""
    sd = dataclasses.replace(tiny_sd, unet=copy.deepcopy(tiny_sd.unet).double(), dtype=torch.float64)
    engine = make_engine(steps=STEPS)
    schedule, eps = engine.schedule, NoisePredictor(sd)
    src = encode_prompts(tiny_sd, SOURCES).double()
    z = engine.encode_images(pixels).double()
    with torch.no_grad():
        for i in range(1, STEPS + 1):
            z = ddim_move(z, eps(z, schedule.timesteps[i], src), schedule.alphas[i - 1], schedule.alphas[i])
    g = torch.Generator().manual_seed(0)

    def noise(e):
        return 0.05 * torch.randn(3, STEPS, *e.shape[1:], generator=g, dtype=torch.float64)

    null = engine.null.double().expand(3, -1, -1)
    return Setup(sd, eps, schedule, z, src, src[:, None] + noise(src), null, null[:, None] + noise(null))


def plain_sampling(setup: Setup, z, cond, uncond, guidance=7.5):
    """Guided DDIM sampling written out here, with no attention control."""
    s = setup.schedule
    with torch.no_grad():
        for j, i in enumerate(range(STEPS, 0, -1)):
            c, u = (e[:, j] if e.dim() == 4 else e for e in (cond, uncond))
            e_u, e_c = setup.eps(torch.cat([z, z]), s.timesteps[i], torch.cat([u, c])).chunk(2)
            z = ddim_move(z, guided_noise(e_u, e_c, guidance), s.alphas[i], s.alphas[i - 1])
    return z


def controlled(setup: Setup, images, plans, source_cond, uncond, edit_cond, **options):
    rows = sorted(set(images))
    return sample_with_attention_control(
        setup.eps,
        setup.sd.unet,
        setup.z_T[rows],
        source_cond[rows],
        uncond[rows],
        edit_cond,
        [rows.index(b) for b in images],
        plans,
        setup.schedule,
        **options,
    )


def plans_for(tokenizer, sources, targets, edits):
    return [plan_attention_edit(tokenizer, s, t, e, STEPS) for s, t, e in zip(sources, targets, edits)]


@pytest.mark.parametrize("method", ["pti", "nti"])
def test_target_equal_to_source_reproduces_the_source_branch(setup, tokenizer, method):
    """Fully controlled edits toward the source prompt itself retrace the reconstruction, for per-step
    conditional stacks (PTI) and per-step unconditional ones (null-text inversion)."""
    source_cond, uncond = (setup.c_t, setup.null) if method == "pti" else (setup.src, setup.null_t)
    images = [0, 1, 1, 2]
    modes = ["replace", "refine", "replace", "refine"]
    full = [AttentionEdit(mode=m, cross_replace_steps=1.0, self_replace_steps=1.0) for m in modes]
    sources = [SOURCES[b] for b in images]
    plans = plans_for(tokenizer, sources, sources, full)
    out = controlled(setup, images, plans, source_cond, uncond, source_cond[images], self_max_positions=64)
    reconstruction = plain_sampling(setup, setup.z_T, source_cond, uncond)
    torch.testing.assert_close(out.sources, reconstruction, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.edits, out.sources[images], rtol=0, atol=1e-10)
    assert float((reconstruction[0] - reconstruction[1]).abs().max()) > 0.1  # the images differ
    assert out.explicit_calls == STEPS * 8  # all 4 self- and 4 cross-attention layers, every step
    assert out.blend_masks is None


def test_plain_sampling_calls_back_each_step_with_its_latents(setup):
    seen = []
    z = sample(setup.eps, setup.z_T, setup.c_t, setup.null, setup.schedule, 7.5, callback=seen.append)
    assert [s["step"] for s in seen] == list(range(STEPS))
    torch.testing.assert_close(seen[-1]["z"], plain_sampling(setup, setup.z_T, setup.c_t, setup.null))
    assert seen[-1]["z"] is z and seen[0]["timestep"] == int(setup.schedule.timesteps[STEPS])


def test_without_control_edits_are_plain_sampling_and_attention_stays_fused(setup, tokenizer):
    targets = ["a photo of a tiger", "a photo of a dog"]
    edit_cond = setup.encode(targets)
    none = AttentionEdit(cross_replace_steps=0.0, self_replace_steps=0.0)
    out = controlled(
        setup,
        [1, 1],
        plans_for(tokenizer, SOURCES[1:2] * 2, targets, [none] * 2),
        setup.c_t,
        setup.null,
        edit_cond,
        self_max_positions=64,
    )
    plain = plain_sampling(setup, setup.z_T[[1, 1]], edit_cond, setup.null[[1, 1]])
    torch.testing.assert_close(out.edits, plain, rtol=0, atol=1e-10)  # the source rows change nothing
    assert out.explicit_calls == 0

    half = AttentionEdit(mode="replace", cross_replace_steps=0.5, self_replace_steps=0.5)
    plans = plans_for(tokenizer, SOURCES[1:2] * 2, targets, [half] * 2)
    out = controlled(setup, [1, 1], plans, setup.c_t, setup.null, edit_cond, self_max_positions=16)
    # Cross-attention: 4 layers for int(0.5 * 7) = 3 steps; self-attention: the 4x4 mid layer only
    # (the others have 64 positions), for int(0.5 * 6) = 3 steps.
    assert out.explicit_calls == 4 * 3 + 1 * 3
    assert float((out.edits - plain).abs().max()) > 1e-4


def test_local_blend_keeps_the_source_latent_outside_the_mask(setup, tokenizer):
    images = [0, 1, 1]
    targets = ["a photo of an astronaut wearing hat", "a photo of a tiger", "a photo of a dog"]
    # The random tiny model attends almost evenly, so a threshold near 1 keeps the mask partial: the
    # peak's max-pooled 3x3 neighbourhood and little else.
    edits = [
        AttentionEdit(mode="refine", blend_words=((), ("hat",)), blend_threshold=0.999),
        AttentionEdit(mode="replace", blend_words=(("cat",), ("tiger",)), blend_threshold=0.999),
        AttentionEdit(mode="replace"),
    ]
    plans = plans_for(tokenizer, [SOURCES[b] for b in images], targets, edits)
    steps = []
    out = controlled(
        setup,
        images,
        plans,
        setup.c_t,
        setup.null,
        setup.encode(targets),
        blend_positions=64,
        self_max_positions=16,
        callback=lambda step: steps.append(
            {k: v.clone() if torch.is_tensor(v) else v for k, v in step.items()}
        ),
    )
    # The callback sees every step as it is reached: blending starts at start_blend (0.2 * 6 steps -> 1).
    assert [s["step"] for s in steps] == list(range(STEPS))
    assert [s["timestep"] for s in steps] == [int(setup.schedule.timesteps[i]) for i in range(STEPS, 0, -1)]
    assert steps[0]["blend_masks"] is None and all(s["blend_masks"] is not None for s in steps[1:])
    assert torch.equal(steps[-1]["z"], out.edits) and torch.equal(steps[-1]["sources"], out.sources)
    assert torch.equal(steps[-1]["blend_masks"], out.blend_masks)
    assert not torch.equal(steps[-2]["z"], out.edits)
    for n in (0, 1):
        mask = out.blend_masks[n].expand_as(out.edits[n])
        assert 0.05 < float(mask.float().mean()) < 0.9, n
        assert torch.equal(out.edits[n][~mask], out.sources[images[n]][~mask])  # exactly the source's
        assert float((out.edits[n][mask] - out.sources[images[n]][mask]).abs().max()) > 1e-3
    assert bool(out.blend_masks[2].all())  # no blend words: the edit keeps its own latent everywhere
    assert float((out.edits[2] - out.sources[1]).abs().amin(dim=0).mean()) > 1e-3


@pytest.fixture(scope="module")
def mixed(tokenizer):
    """Four edits of three images: every control at once."""
    images = [0, 1, 1, 2]
    targets = [
        "a photo of an astronaut wearing hat",
        "a photo of a tiger",
        "a photo of a black cat",
        "a cup of tea",
    ]
    edits = [
        AttentionEdit(mode="refine", blend_words=((), ("hat",)), blend_threshold=0.999),
        AttentionEdit(mode="replace", reweight={"tiger": 2.0}, word_replace_steps={"tiger": 0.5}),
        AttentionEdit(mode="refine", cross_replace_steps=1.0, self_replace_steps=0.6),
        AttentionEdit(mode="replace", blend_words=(("coffee",), ("tea",)), blend_threshold=0.999),
    ]
    return images, targets, plans_for(tokenizer, [SOURCES[b] for b in images], targets, edits)


def test_batched_equals_one_at_a_time_and_costs_2T_per_edit_and_source(setup, mixed):
    images, targets, plans = mixed
    eta = torch.tensor([0.7, 1.0, 0.5, 0.8], dtype=torch.float64).view(-1, 1, 1, 1)
    edit_cond = eta * setup.encode(targets)[:, None] + (1 - eta) * setup.c_t[images]  # PTI's ctilde_t
    guidance = torch.tensor([7.5, 5.0, 7.5, 3.0])
    options = {"source_guidance": 7.5, "blend_positions": 64, "self_max_positions": 16}
    setup.eps.calls = setup.eps.evaluations = 0
    batch = controlled(setup, images, plans, setup.c_t, setup.null, edit_cond, guidance=guidance, **options)
    assert setup.eps.calls == STEPS  # one UNet call per step for everything
    assert setup.eps.evaluations == 2 * STEPS * (4 + 3)  # 2T (n + 1) per image: n = 1, 2, 1
    cost = PTIConfig(steps=STEPS).unet_evaluations  # the library's formula, per image
    assert setup.eps.evaluations == sum(cost(edits=n, controlled=True)["stage_two"] for n in (1, 2, 1))
    for b in range(3):
        mine = [n for n in range(4) if images[n] == b]
        alone = controlled(
            setup,
            [b] * len(mine),
            [plans[n] for n in mine],
            setup.c_t,
            setup.null,
            edit_cond[mine],
            guidance=guidance[mine],
            **options,
        )
        torch.testing.assert_close(alone.sources[0], batch.sources[b], rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(alone.edits, batch.edits[mine], rtol=1e-7, atol=1e-8)
    single = controlled(
        setup, [1], plans[2:3], setup.c_t, setup.null, edit_cond[2:3], guidance=guidance[2:3], **options
    )
    torch.testing.assert_close(single.edits[0], batch.edits[2], rtol=1e-7, atol=1e-8)
    assert float((batch.edits[1] - batch.edits[2]).abs().max()) > 1e-2  # the edits do differ


def test_processors_are_restored_after_sampling_and_after_an_error(setup, mixed):
    images, targets, plans = mixed
    unet = setup.sd.unet
    before = dict(unet.attn_processors)
    seen = []

    def failing(z, t, emb):
        seen.append({type(p).__name__ for p in unet.attn_processors.values()})
        if len(seen) == 3:
            raise RuntimeError("the device fell over")
        return setup.eps(z, t, emb)

    with pytest.raises(RuntimeError, match="fell over"):
        sample_with_attention_control(
            failing,
            unet,
            setup.z_T,
            setup.c_t,
            setup.null,
            setup.encode(targets),
            images,
            plans,
            setup.schedule,
            blend_positions=64,
        )
    assert seen == [{"ControlledAttnProcessor"}] * 3  # installed in every layer while sampling
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    controlled(setup, [1], plans[1:2], setup.c_t, setup.null, setup.encode(targets[1:2]))
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)


# --- local blend as the reference reads it (issue 28) -----------------------------------------------


def test_the_blend_maps_are_recorded_after_control_and_never_from_the_mid_block(tokenizer):
    """During the cross-replace steps a replace edit's recorded map is the source's map carried
    through the replacement mapper (the reference's store is a view that control overwrites)."""
    edit = AttentionEdit(mode="replace", cross_replace_steps=0.5, blend_words=(("cat",), ("dog",)))
    plan = plan_attention_edit(tokenizer, "a photo of a cat", "a photo of a dog", edit, num_steps=4)
    control = AttentionControl([0, 0], [None, plan], 4, (8, 8), blend_positions=16)
    probs = torch.softmax(torch.randn(2, 2, 16, L, dtype=torch.float64), dim=-1)  # [rows, heads, Q, L]
    for step in range(4):
        control.step = step
        assert control.controls(True, 16, "down") and control.controls(True, 16, "up")
        assert not control.controls(True, 16, "mid") or bool(plan.cross_alpha[step].any())
        control.edit_attention(probs, True, "down")
        control.edit_attention(probs, True, "mid")  # the mid block's maps are never recorded
    mapper = replacement_mapper(tokenizer, "a photo of a cat", "a photo of a dog").double()
    mapped_source, own = (probs[0] @ mapper).mean(0), probs[1].mean(0)
    replaced = int(plan.cross_alpha[:4, 0].sum())  # steps whose cross-attention is the source's
    assert replaced == 2
    torch.testing.assert_close(control.blend_maps[0], 4 * probs[0].mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(control.blend_maps[1], 2 * mapped_source + 2 * own, rtol=0, atol=1e-12)


class ReferenceP2P:
    """google/prompt-to-prompt's controller written out from its notebooks for one image and one
    replace edit, in float64: ``AttentionStore.forward`` keeps the conditional half's cross maps of
    the blend layers (a view: what ``AttentionControlEdit.forward`` then writes into it is what is
    kept), ``between_steps`` adds the step's maps to the store, and ``LocalBlend`` reads the store
    after each step (down and up layers only: the reference's ``down_cross[2:4] + up_cross[:3]``)."""

    def __init__(self, plan, blend_positions: int, self_max_positions: int):
        self.plan, self.blend_positions, self.self_max = plan, blend_positions, self_max_positions
        self.step, self.step_store, self.store = 0, [], None

    def processor(self, place: str):
        control = self

        class Processor:
            def __call__(self, attn, hidden, encoder_hidden_states=None, attention_mask=None, **kwargs):
                is_cross = encoder_hidden_states is not None
                context = encoder_hidden_states if is_cross else hidden
                h, d = attn.heads, attn.to_q.out_features // attn.heads

                def split(t):
                    return t.view(t.shape[0], -1, h, d).transpose(1, 2)

                q, k, v = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
                probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
                cond = probs[probs.shape[0] // 2 :]  # a view: [source, edit]
                positions = probs.shape[2]
                if is_cross and positions == control.blend_positions and place != "mid":
                    control.step_store.append(cond)  # AttentionStore.forward, before the edit
                plan, j = control.plan, control.step
                if is_cross:
                    alpha = plan.cross_alpha[j].double()
                    replaced = cond[0] @ plan.mapper.double()
                    cond[1] = replaced * alpha + (1 - alpha) * cond[1]  # attn[1:] = ... in place
                elif positions <= control.self_max and bool(plan.self_steps[j]):
                    cond[1] = cond[0]
                out = (probs @ v).transpose(1, 2).reshape(hidden.shape[0], -1, h * d)
                return attn.to_out[1](attn.to_out[0](out))

        return Processor()

    def between_steps(self):
        maps = torch.stack(self.step_store)  # [layers, 2, heads, Q, L]
        self.store = maps if self.store is None else self.store + maps
        self.step_store = []

    def local_blend(self, z, latent_size):
        plan = self.plan
        words = torch.stack([plan.blend_source, plan.blend_target]).double()  # alpha_layers
        side = int(self.blend_positions**0.5)
        maps = (self.store * words[None, :, None, None, :]).sum(-1).mean(dim=(0, 2))  # [2, Q]
        maps = maps.view(2, 1, side, side)
        mask = torch.nn.functional.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = torch.nn.functional.interpolate(mask, size=latent_size)
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(plan.blend_threshold)
        mask = (mask[:1] + mask[1:]).double()
        return torch.cat([z[:1], z[:1] + mask * (z[1:] - z[:1])])


def test_a_blend_edit_equals_the_references_controller_step_by_step(setup, tokenizer):
    source, target = SOURCES[1], "a photo of a dog"
    edit = AttentionEdit(mode="replace", blend_words=(("cat",), ("dog",)), blend_threshold=0.999)
    plan = plan_attention_edit(tokenizer, source, target, edit, STEPS)
    edit_cond = setup.encode([target])
    options = dict(blend_positions=64, self_max_positions=16)
    ours = controlled(setup, [1], [plan], setup.c_t, setup.null, edit_cond, **options)

    reference = ReferenceP2P(plan, **options)
    unet, s = setup.sd.unet, setup.schedule
    original = dict(unet.attn_processors)
    places = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    unet.set_attn_processor({name: reference.processor(places[name.split(".")[0]]) for name in original})
    z = setup.z_T[[1, 1]]
    try:
        with torch.no_grad():
            for j, i in enumerate(range(STEPS, 0, -1)):
                reference.step = j
                cond = torch.cat([setup.c_t[1:2, j], edit_cond])
                uncond = setup.null[[1, 1]]
                e_u, e_c = setup.eps(torch.cat([z, z]), s.timesteps[i], torch.cat([uncond, cond])).chunk(2)
                z = ddim_move(z, guided_noise(e_u, e_c, 7.5), s.alphas[i], s.alphas[i - 1])
                reference.between_steps()
                if j + 1 > plan.blend_start:  # LocalBlend's counter > start_blend
                    z = reference.local_blend(z, tuple(z.shape[-2:]))
    finally:
        unet.set_attn_processor(original)
    torch.testing.assert_close(ours.sources[0], z[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.edits[0], z[1], rtol=0, atol=1e-10)
    assert 0 < float(ours.blend_masks.float().mean()) < 1  # the mask is partial: the test can fail


def test_the_blend_layers_are_the_down_and_up_blocks_at_the_blend_resolution(setup, tokenizer, make_engine):
    """The tiny UNet has cross-attention at 8x8 (down and up) and at 4x4 only in its mid block: the
    engine blends at 8x8 and injects self-attention up to 4x4, and a blend asked at 4x4 finds no
    layer, since the mid block's maps never count."""
    assert make_engine()._controlled_positions() == (16, 64)
    edit = AttentionEdit(mode="replace", blend_words=(("cat",), ("dog",)))
    plan = plan_attention_edit(tokenizer, SOURCES[1], "a photo of a dog", edit, STEPS)
    with pytest.raises(InputError, match="no cross-attention layer with 16 positions"):
        dog = setup.encode(["a photo of a dog"])
        controlled(setup, [1], [plan], setup.c_t, setup.null, dog, blend_positions=16)
