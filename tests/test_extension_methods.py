"""Self-Extend, Dual Chunk Attention, LM-Infinite and YaRN against written-out references of their papers' formulas,
the log-sum-exp merge they share, and RoPE rescalings composed with attention methods as objects.

The references turn the raw (un-rotated) queries and keys straight to the positions the paper assigns, with a float64
rotation written out here, and loop over queries and heads; the methods under test start from vectors already rotated
at their true positions (as transformers hands them over) and re-rotate by position differences in fused kernels.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import logits, model_chain, rounding_tolerance, tiny_llama

from longctx.methods.base import MethodError
from longctx.methods.dca import ChunksPlan, DualChunkAttention, dca_attention
from longctx.methods.lm_infinite import LambdaPlan, LMInfinite, lm_infinite_attention
from longctx.methods.longheads import LongHeads
from longctx.methods.merge import _written_out_attention, attention_part, merge
from longctx.methods.rope import rotate
from longctx.methods.rope_scaling import NTKScaling, PositionInterpolation, YaRN
from longctx.methods.self_extend import GroupsPlan, SelfExtend, self_extend_attention
from longctx.models import LoadedModel

PRETRAINED = 64
D, KV_HEADS, GROUP = 16, 2, 2
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
SCALING = D**-0.5


@pytest.fixture
def lm() -> LoadedModel:
    return tiny_llama(PRETRAINED, initializer_range=0.2)  # weights large enough that positions move the logits


def ids_of(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


# --- written-out references -------------------------------------------------------------------------------------


def turned(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [..., D] (half-split layout) rotated to `positions` [...], in float64."""
    angles = positions.double()[..., None] * INV_FREQ.double()
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., : D // 2].double(), x[..., D // 2 :].double()
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def reference_attention(q_raw, k_raw, v, positions) -> torch.Tensor:
    """Per query t and head h: softmax over the keys j that `positions(t, j)` places (it returns the query's and the
    key's position, or None for a key the query does not see) of scaling * R(p_q) q . R(p_k) k, times the values.
    q_raw [Hq, n, D], k_raw/v [Hkv, n, D] un-rotated; returns [n, Hq, D] float64."""
    heads, n = q_raw.shape[0], q_raw.shape[1]
    out = torch.zeros(n, heads, D, dtype=torch.float64)
    for t in range(n):
        placed = [(j, positions(t, j)) for j in range(t + 1)]
        keys = torch.tensor([j for j, where in placed if where is not None])
        query_at, key_at = (torch.tensor([where[i] for _, where in placed if where is not None]) for i in (0, 1))
        for h in range(heads):
            kv = h // GROUP
            scores = (turned(q_raw[h, t], query_at) * turned(k_raw[kv, keys], key_at)).sum(-1) * SCALING
            out[t, h] = torch.softmax(scores, dim=0) @ v[kv, keys].double()
    return out


def raw_inputs(n: int, seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(KV_HEADS * GROUP, n, D), torch.randn(KV_HEADS, n, D), torch.randn(KV_HEADS, n, D)


def rotated_inputs(q_raw, k_raw, v):
    """What transformers hands an attention function: [1, H, n, D], rotated at the true positions 0..n-1."""
    n = q_raw.shape[1]
    return rotate(q_raw[None], torch.arange(n), INV_FREQ), rotate(k_raw[None], torch.arange(n), INV_FREQ), v[None]


def angle_tolerance(q_raw, k_raw, v, n: int) -> float:
    """How far the method (float32, two rotations: to the true position, then by the difference) may land from the
    float64 reference through rounding alone. Each rotation rounds its angles (at most n * max frequency radians) to
    float32, u * n each; three such errors move a score by at most scaling |q| |k| * 3 u n, the softmax moves an
    output by at most twice the largest score change times max |v|; the attention's own float32 sums add
    `rounding_tolerance` over D + n terms."""
    unit = torch.finfo(torch.float32).eps / 2
    score = SCALING * q_raw.norm(dim=-1).max() * k_raw.norm(dim=-1).max() * 3 * unit * n * float(INV_FREQ.max())
    sums = rounding_tolerance(v, D + n) * q_raw.norm(dim=-1).max() * k_raw.norm(dim=-1).max() * SCALING
    return float(2 * score * v.abs().max() + sums)


def method_module(plan) -> SimpleNamespace:
    """A layer as an installed method leaves it: the installation (its plan) and the layer's RoPE frequencies."""
    installation = SimpleNamespace(plan=plan, method=SimpleNamespace(name="under test"))
    return SimpleNamespace(longctx=installation, longctx_inv_freq=INV_FREQ, training=False)


# --- the log-sum-exp merge --------------------------------------------------------------------------------------


def test_merging_parts_equals_one_softmax_over_their_union():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 10, D), torch.randn(1, 2, 30, D), torch.randn(1, 2, 30, D)
    visible = torch.rand(10, 30) > 0.4
    visible[:, 0] = True
    additive = torch.zeros(20, 30).masked_fill_(~visible.repeat(2, 1), float("-inf"))
    whole, whole_lse = _written_out_attention(query.view(1, 2, 20, D), key, value, additive, SCALING)
    split = torch.rand(30) > 0.5  # every key in one of two parts, at random
    parts = [attention_part(query, key, value, visible & side[None, :], SCALING) for side in (split, ~split)]
    tolerance = rounding_tolerance(value, D + 30)
    torch.testing.assert_close(merge(parts)[0], whole.view(1, 4, 10, D), atol=tolerance, rtol=0)
    # the fused kernel's log-sum-exp is the written-out one; a query that sees nothing weighs nothing
    fused, fused_lse = attention_part(query, key, value, visible, SCALING)
    torch.testing.assert_close(fused_lse, whole_lse.view(1, 4, 10), atol=tolerance, rtol=0)
    blind = visible.clone()
    blind[3] = False
    out, lse = attention_part(query, key, value, blind, SCALING)
    assert torch.isneginf(lse[..., 3]).all() and (out[..., 3, :] == 0).all()


# --- Self-Extend ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, window", [(2, 8), (3, 7), (4, 16)])
def test_self_extend_equals_the_papers_two_position_schemes(size, window):
    n = 50
    q_raw, k_raw, v = raw_inputs(n)

    def positions(t, j):  # Jin et al. 2024: neighbours exact, then floor-divided groups joined at the window
        return (t, j) if t - j < window else (t // size + window - window // size, j // size)

    module = method_module(GroupsPlan(group_size=size, recent_window=window))
    out, _ = self_extend_attention(module, *rotated_inputs(q_raw, k_raw, v), None, scaling=SCALING)
    expected = reference_attention(q_raw, k_raw, v, positions)
    torch.testing.assert_close(out[0].double(), expected, atol=angle_tolerance(q_raw, k_raw, v, n), rtol=0)


def test_self_extend_within_its_neighbour_window_is_full_attention_and_beyond_it_is_not(lm):
    ids = ids_of(48)
    reference = logits(lm, ids)
    torch.testing.assert_close(logits(lm, ids, SelfExtend(group_size=4, recent_window=48)), reference, atol=0, rtol=0)
    assert (logits(lm, ids, SelfExtend(group_size=4, recent_window=40)) - reference).abs().max() > 1e-3


def test_self_extend_usable_length_is_checked_in_one_line(lm):
    method = SelfExtend(group_size=2, recent_window=16)
    assert method.plan(lm, (PRETRAINED - 16) * 2 + 16).reach == 112
    with pytest.raises(MethodError, match=r"\(L - W\) \* G \+ W = 112 .* group_size >= 3") as error:
        method.plan(lm, 113)
    assert "\n" not in str(error.value)
    smallest = SelfExtend(recent_window=16).plan(lm, 113)  # group_size=None: the smallest that reaches the target length
    assert (smallest.group_size, smallest.recent_window) == (3, 16)
    with pytest.raises(MethodError, match="below the trained length"):
        SelfExtend(recent_window=PRETRAINED).plan(lm, 100)


# --- Dual Chunk Attention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, local", [(12, 4), (10, 1), (16, 16)])
def test_dca_equals_the_papers_three_position_schemes(size, local):
    n = 50
    q_raw, k_raw, v = raw_inputs(n, seed=1)
    farthest = size + local - 1  # the paper's c - 1 with w = c - s

    def positions(t, j):  # An et al. 2024: P_k = j mod s; P_q intra r, successive min(s + r, c - 1), inter c - 1
        behind = t // size - j // size
        query = t % size if behind == 0 else min(size + t % size, farthest) if behind == 1 else farthest
        return query, j % size

    module = method_module(ChunksPlan(chunk_size=size, local_window=local))
    out, _ = dca_attention(module, *rotated_inputs(q_raw, k_raw, v), None, scaling=SCALING)
    expected = reference_attention(q_raw, k_raw, v, positions)
    torch.testing.assert_close(out[0].double(), expected, atol=angle_tolerance(q_raw, k_raw, v, n), rtol=0)


def test_dca_within_one_chunk_is_full_attention_and_past_it_is_not(lm):
    ids = ids_of(48)
    reference = logits(lm, ids)
    torch.testing.assert_close(logits(lm, ids, DualChunkAttention(chunk_size=48, local_window=8)), reference, atol=0, rtol=0)
    # queries 40..47 past the chunk: the first two keep the true distance to chunk 0 (local window), the rest do not
    assert (logits(lm, ids, DualChunkAttention(chunk_size=40, local_window=2)) - reference).abs().max() > 1e-3


def test_dca_refuses_chunks_past_the_trained_length_unless_rescaled(lm):
    with pytest.raises(MethodError, match="must not exceed the trained length") as error:
        DualChunkAttention(chunk_size=60, local_window=8).plan(lm, 200)
    assert "\n" not in str(error.value)
    DualChunkAttention(chunk_size=60, local_window=8, rope_scaling=PositionInterpolation(factor=2)).plan(lm, 200)
    plan = DualChunkAttention().plan(lm)
    assert (plan.chunk_size, plan.local_window) == (3 * PRETRAINED // 4 - PRETRAINED // 16, PRETRAINED // 16)


# --- LM-Infinite ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_global, n_local, d_max", [(3, 8, 8), (2, 10, 6), (4, 5, 20)])
def test_lm_infinite_equals_the_lambda_mask_with_capped_distance(n_global, n_local, d_max):
    n = 40
    q_raw, k_raw, v = raw_inputs(n, seed=2)

    def positions(t, j):  # Han et al. 2024: the local branch at true distance, far global tokens at d_max
        if t - j < n_local:
            return t, j
        return (d_max, 0) if j < n_global else None

    module = method_module(LambdaPlan(sink_tokens=n_global, recent_window=n_local, d_max=d_max))
    out, _ = lm_infinite_attention(module, *rotated_inputs(q_raw, k_raw, v), None, scaling=SCALING,
                                   position_ids=torch.arange(n)[None])
    expected = reference_attention(q_raw, k_raw, v, positions)
    torch.testing.assert_close(out[0].double(), expected, atol=angle_tolerance(q_raw, k_raw, v, n), rtol=0)


def test_lm_infinite_covering_the_input_is_full_attention_and_keeps_a_bounded_cache(lm):
    ids = ids_of(48)
    reference = logits(lm, ids)
    torch.testing.assert_close(logits(lm, ids, LMInfinite(sink_tokens=4, recent_window=48)), reference, atol=0, rtol=0)
    assert (logits(lm, ids, LMInfinite(sink_tokens=4, recent_window=40)) - reference).abs().max() > 1e-3
    with LMInfinite(sink_tokens=4, recent_window=16)(lm), torch.no_grad():
        cache = lm.model(ids_of(100), use_cache=True).past_key_values
    assert all(layer.keys.shape[-2] == 4 + 16 - 1 for layer in cache.layers)  # n_global + n_local - 1, any length


# --- YaRN -------------------------------------------------------------------------------------------------------


def yarn_reference(base: float, dim: int, factor: float, trained: int, beta_fast: float, beta_slow: float):
    """NTK-by-parts frequencies and the attention factor as the authors' code computes them (jquesnelle/yarn,
    `_yarn_find_correction_range`, `_yarn_linear_ramp_mask`, `_yarn_get_mscale`), in float64."""

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times into the trained length
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction_dim(beta_fast)), 0), min(math.ceil(correction_dim(beta_slow)), dim - 1)
    index = torch.arange(dim // 2, dtype=torch.float64)
    ramp = ((index - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate like PI
    theta = base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return theta / factor * (1 - keep) + theta * keep, 0.1 * math.log(factor) + 1 if factor > 1 else 1.0


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_yarn_frequencies_and_temperature_follow_the_paper(lm, factor):
    base, dim = 10000.0, 16
    # the paper's beta = 32, alpha = 1 suit a 4k model; over this model's 64 tokens no dimension turns 32 times
    beta_fast, beta_slow = 4.0, 0.5
    expected, temperature = yarn_reference(base, dim, factor, PRETRAINED, beta_fast, beta_slow)
    positions = torch.arange(4 * PRETRAINED)
    with YaRN(factor=factor, beta_fast=beta_fast, beta_slow=beta_slow)(lm):
        rotary = lm.model.model.rotary_emb
        torch.testing.assert_close(rotary.inv_freq.double(), expected, atol=0, rtol=1e-6)  # float32 pow and division: a few u
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    angles = positions[:, None].double() * expected
    angles = torch.cat((angles, angles), dim=-1)
    # cos and sin carry sqrt(1/t) = 0.1 ln(s) + 1: every logit is scaled by its square. In float32 the stored
    # frequency and the angle p * f each round by u relative, moving cos and sin by up to 2 u p f, plus u for the value
    unit = torch.finfo(torch.float32).eps / 2
    tolerance = temperature * unit * (2 * float(angles.abs().max()) + 1)
    torch.testing.assert_close(cos[0].double(), temperature * angles.cos(), atol=tolerance, rtol=0)
    torch.testing.assert_close(sin[0].double(), temperature * angles.sin(), atol=tolerance, rtol=0)
    theta = base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rotations = PRETRAINED * theta / (2 * math.pi)  # how often each dimension turns over the trained length
    fast, slow = rotations > beta_fast, rotations < beta_slow
    assert fast.any() and slow.any()
    torch.testing.assert_close(expected[fast], theta[fast])  # fast dimensions keep their frequency
    torch.testing.assert_close(expected[slow], theta[slow] / factor)  # slow ones are interpolated like PI


def test_a_rescaling_refuses_a_length_its_factor_cannot_reach_unless_a_method_holds_it(lm):
    assert YaRN(factor=2.0).plan(lm, 2 * PRETRAINED).reach == 2 * PRETRAINED
    with pytest.raises(MethodError, match="reaches 128 tokens .* set factor >= 2.01562") as error:
        YaRN(factor=2.0).plan(lm, 2 * PRETRAINED + 1)
    assert "\n" not in str(error.value)
    assert YaRN().plan(lm, 100 * PRETRAINED).factor == 100  # factor null: length / trained length
    # under Dual Chunk Attention the rescaling only has to reach s + w: any length goes
    assert DualChunkAttention(chunk_size=40, local_window=8, rope_scaling=YaRN(factor=2.0)).plan(lm, 100 * PRETRAINED).reach is None


def test_yarn_factor_one_is_the_model_and_dynamic_is_refused(lm):
    ids = ids_of(48)
    torch.testing.assert_close(logits(lm, ids, YaRN(factor=1.0)), logits(lm, ids), atol=0, rtol=0)
    with pytest.raises(MethodError, match="static factor") as error:
        YaRN(dynamic=True)
    assert "\n" not in str(error.value)


# --- composition: a rescaling as a value of an attention method --------------------------------------------------


@pytest.mark.parametrize(
    "attention",
    [
        lambda scaling: LongHeads(chunk_size=8, atten_length=32, query_block=4, exact_tail=4, rope_scaling=scaling),
        lambda scaling: DualChunkAttention(chunk_size=40, local_window=8, rope_scaling=scaling),
        lambda scaling: SelfExtend(group_size=2, recent_window=40, rope_scaling=scaling),
        lambda scaling: LMInfinite(sink_tokens=2, recent_window=40, rope_scaling=scaling),
    ],
    ids=["longheads", "dca", "self_extend", "lm_infinite"],
)
@pytest.mark.parametrize(
    "scaling", [lambda: YaRN(factor=4.0), lambda: PositionInterpolation(factor=2.0), lambda: NTKScaling(factor=2.0, dynamic=False)],
    ids=["yarn", "pi", "ntk"],
)
def test_an_attention_method_within_its_range_equals_its_rescaling_alone(lm, attention, scaling):
    """Inside A (LongHeads), one chunk (DCA), the neighbour window (Self-Extend), the local branch (LM-Infinite) each
    method is full attention, so with a rescaling underneath it must equal the rescaling alone. YaRN's attention
    factor multiplies cos and sin: a method that rebuilt rotations from the frequencies alone would lose it here."""
    ids = ids_of(32)
    alone = logits(lm, ids, scaling())
    tolerance = rounding_tolerance(alone, model_chain(lm.model.config, 32))  # the parts' fused kernels vs sdpa
    torch.testing.assert_close(logits(lm, ids, attention(scaling())), alone, atol=tolerance, rtol=0)
    assert (alone - logits(lm, ids)).abs().max() > 100 * tolerance  # the rescaling does act on these logits


def test_a_rescaling_given_as_config_is_built_and_checked_before_any_model():
    method = DualChunkAttention(rope_scaling={"name": "yarn", "factor": 2})
    assert method.rope_scaling == YaRN(factor=2)
    assert method.config()["rope_scaling"] == {"name": "yarn", "factor": 2, "beta_fast": 32.0, "beta_slow": 1.0, "dynamic": False}
    for bad, message in [({"name": "ntk"}, "dynamic ntk"), ({"name": "rope"}, "one of pi, ntk, yarn"),
                         ({"name": "pi", "scale": 2}, "no parameter scale"), ("pi", "must be a rescaling")]:
        with pytest.raises(MethodError, match=message) as error:
            LongHeads(rope_scaling=bad)
        assert "\n" not in str(error.value)


def test_remove_takes_the_rescaling_off_too(lm):
    ids = ids_of(100)
    before = logits(lm, ids)
    parameters, rotary = lm.model.config.rope_parameters, lm.model.model.rotary_emb
    method = DualChunkAttention(chunk_size=24, local_window=8, rope_scaling=YaRN(factor=2.0))
    with method(lm):
        assert lm.model.config.rope_parameters["rope_type"] == "yarn"
    assert lm.model.config.rope_parameters is parameters and lm.model.model.rotary_emb is rotary
    torch.testing.assert_close(logits(lm, ids), before, atol=0, rtol=0)


# --- real weights -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, params",
    [
        ("self_extend", {"group_size": 4, "recent_window": 256}),  # three quarters of the prompt in groups
        ("dca", {"chunk_size": 640, "local_window": 64}),  # the prompt in three chunks and a bit
        ("lm_infinite", {"sink_tokens": 10, "recent_window": 1024}),  # the needle (depth 0.7) inside the local branch, d_max 1024
        ("yarn", {"factor": 2.0}),
    ],
)
def test_the_embedded_model_finds_the_passkey_at_2k_through_each_method(smollm2, name, params):
    """Real weights at a size where each method acts on most of a 2k prompt: its positions must still read well."""
    from longctx.registry import build_method
    from longctx.tasks.passkey import Passkey

    task = Passkey(lengths=[2048], num_samples=1, depths=[0.7])
    with build_method(name, **params)(smollm2, max_length=2048):
        metrics = task.run(smollm2, on_sample=lambda record: None)
    assert metrics["accuracy"] == 1.0
