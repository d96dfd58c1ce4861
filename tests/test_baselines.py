"""Baselines on a tiny random Llama: PI, NTK (static, dynamic), sliding window with attention sinks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import model_chain, rounding_tolerance, tiny_llama

from longctx.methods import window as window_module
from longctx.methods.base import MethodError, output_cache, with_cache
from longctx.methods.rope import rotate
from longctx.methods.rope_scaling import NTKScaling, PositionInterpolation, YaRN
from longctx.methods.self_extend import SelfExtend
from longctx.methods.window import SinkWindowCache, SlidingWindow, window_attention
from longctx.models import LoadedModel
from longctx.registry import METHODS, build_method

PRETRAINED = 128


@pytest.fixture
def lm() -> LoadedModel:
    # large enough weights that position changes move the logits visibly
    return tiny_llama(PRETRAINED, initializer_range=0.2)


def logits(lm: LoadedModel, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids, **kwargs).logits


def ids_of(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def rope_angles(lm: LoadedModel, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, 1, 1, dtype=torch.float32)
    return lm.model.model.rotary_emb(x, positions[None])


# --- Position Interpolation -------------------------------------------------------------------------------------


def test_pi_angles_at_p_equal_unscaled_angles_at_p_over_factor(lm):
    positions = torch.arange(0, 4 * PRETRAINED)
    cos_ref, sin_ref = rope_angles(lm, positions.float() / 4)
    with PositionInterpolation(factor=4)(lm):
        cos, sin = rope_angles(lm, positions)
    # p * (f / 4) and (p / 4) * f: each angle (up to 128 rad) rounded twice on each side, then cos/sin rounded once
    unit_roundoff = torch.finfo(torch.float32).eps / 2
    tolerance = 4 * unit_roundoff * float(positions.max()) / 4 + 2 * unit_roundoff
    torch.testing.assert_close(cos, cos_ref, atol=tolerance, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=tolerance, rtol=0)
    assert not torch.allclose(cos, rope_angles(lm, positions)[0])  # the scaling really did something


def test_pi_model_at_stretched_positions_equals_unscaled_model(lm):
    ids = ids_of(40)
    reference = logits(lm, ids, position_ids=torch.arange(40)[None])
    with PositionInterpolation(factor=3)(lm):
        stretched = logits(lm, ids, position_ids=3 * torch.arange(40)[None])
        plain = logits(lm, ids)
    # Same function, other roundings: the angles 3p * (f / 3) and p * f, up to 117 rad, are rounded differently
    tolerance = rounding_tolerance(reference, model_chain(lm.model.config, 40, max_position=3 * 39))
    torch.testing.assert_close(stretched, reference, atol=tolerance, rtol=0)
    assert (plain - reference).abs().max() > 100 * tolerance


def test_pi_default_factor_comes_from_the_planned_length(lm):
    method = PositionInterpolation()
    with method(lm, max_length=3 * PRETRAINED):
        assert lm.model.config.rope_parameters["factor"] == 3.0
    with method(lm, max_length=PRETRAINED // 2):  # shorter than pretrained: no squeezing
        assert lm.model.config.rope_parameters["factor"] == 1.0


def test_a_method_at_its_defaults_without_a_length_serves_the_trained_range_and_refuses_more(lm):
    """`with method(lm):` works for every method at its defaults; one whose numbers depend on the length plans for the
    trained length and refuses a longer input in one line instead of computing a wrong number."""
    for name in METHODS:
        with build_method(name)(lm):
            assert torch.isfinite(logits(lm, ids_of(PRETRAINED))).all()
    for method in (PositionInterpolation(), YaRN(), SelfExtend()):
        with method(lm), pytest.raises(MethodError, match=f"planned for at most {PRETRAINED} tokens .* max_length={PRETRAINED + 1}") as error:
            logits(lm, ids_of(PRETRAINED + 1))
        assert "\n" not in str(error.value)


# --- NTK-aware scaling ------------------------------------------------------------------------------------------


def test_static_ntk_base_follows_ntk_aware_formula(lm):
    base = lm.model.config.rope_parameters["rope_theta"]
    d = 64 // 4
    with NTKScaling(factor=8, dynamic=False)(lm):
        new_base = lm.model.config.rope_parameters["rope_theta"]
        inv_freq = lm.model.model.rotary_emb.inv_freq
    assert new_base == pytest.approx(base * 8 ** (d / (d - 2)))
    torch.testing.assert_close(inv_freq, 1.0 / new_base ** (torch.arange(0, d, 2).float() / d))
    # NTK-aware: the highest frequency is untouched, the lowest is interpolated by exactly the factor.
    original = lm.model.model.rotary_emb.inv_freq
    assert inv_freq[0] == original[0]
    assert (original[-1] / inv_freq[-1]).item() == pytest.approx(8)


def test_dynamic_ntk_is_plain_rope_within_pretrained_length(lm):
    ids = ids_of(PRETRAINED)
    reference = logits(lm, ids)
    with NTKScaling(dynamic=True)(lm):
        torch.testing.assert_close(logits(lm, ids), reference, atol=0, rtol=0)


def test_dynamic_ntk_beyond_pretrained_length_equals_static_ntk_at_that_ratio(lm):
    ids = ids_of(2 * PRETRAINED)
    with NTKScaling(factor=2.0, dynamic=False)(lm):
        static = logits(lm, ids)
    with NTKScaling(dynamic=True)(lm):  # factor 1: scale = n / L = 2 at n = 2L
        dynamic = logits(lm, ids)
    # the base is computed in tensor (float32) vs Python float math: one rounding of the base, which moves every angle
    # by at most u relative to itself, as a rounding of the angle would
    tolerance = rounding_tolerance(static, model_chain(lm.model.config, 2 * PRETRAINED) + 2 * 2 * PRETRAINED)
    torch.testing.assert_close(dynamic, static, atol=tolerance, rtol=0)
    assert (dynamic - logits(lm, ids)).abs().max() > 100 * tolerance


def test_dynamic_ntk_refuses_a_pretrained_length_transformers_would_not_use(lm):
    lm.pretrained_length = PRETRAINED // 2
    with pytest.raises(MethodError):
        NTKScaling(dynamic=True).apply(lm)
    assert lm.model.config.rope_parameters["rope_type"] == "default"


# --- apply / remove ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: PositionInterpolation(factor=2),
        lambda: NTKScaling(factor=2, dynamic=False),
        lambda: NTKScaling(dynamic=True),
        lambda: SlidingWindow(sink_tokens=2, recent_window=8),
    ],
)
def test_remove_restores_the_model_exactly(lm, make):
    ids = ids_of(2 * PRETRAINED)
    config = lm.model.config
    before = logits(lm, ids)
    rope_parameters, rotary, attention = config.rope_parameters, lm.model.model.rotary_emb, config._attn_implementation
    with make()(lm):
        during = logits(lm, ids)
    assert (during - before).abs().max() > 1e-2  # applied, the method changes a beyond-pretrained-length input
    assert config.rope_parameters is rope_parameters
    assert config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert lm.model.model.rotary_emb is rotary
    assert config._attn_implementation == attention
    assert not lm.model.model._forward_pre_hooks
    assert not any(hasattr(module, "longctx") for module in lm.model.modules())
    torch.testing.assert_close(logits(lm, ids), before, atol=0, rtol=0)


def test_rope_scaling_composes_with_window(lm):
    ids = ids_of(60)
    with PositionInterpolation(factor=2)(lm):
        pi_only = logits(lm, ids)
    with PositionInterpolation(factor=2)(lm), SlidingWindow(sink_tokens=2, recent_window=64)(lm):
        both = logits(lm, ids)
        assert lm.model.config._attn_implementation == SlidingWindow().attention_name
    # the window's attention (the whole input in its window) against SDPA's: the same sums in another order
    torch.testing.assert_close(both, pi_only, atol=rounding_tolerance(pi_only, model_chain(lm.model.config, 60)), rtol=0)
    assert lm.model.config._attn_implementation == "sdpa" and lm.model.config.rope_parameters["rope_type"] == "default"


# --- Sliding window with sinks ----------------------------------------------------------------------------------


def test_window_token_outside_receptive_field_has_no_influence_inside_does(lm):
    # 2 layers, W = 8: the last query (59) sees, through both layers, tokens 59 - 2 * 7 = 45..59 and the sinks.
    ids = ids_of(60)

    def last_logits_with_changed(position: int | None) -> torch.Tensor:
        changed = ids.clone()
        if position is not None:
            changed[0, position] = (changed[0, position] + 1) % 128
        return logits(lm, changed, use_cache=False)[:, -1]

    with SlidingWindow(sink_tokens=2, recent_window=8)(lm):
        reference = last_logits_with_changed(None)
        for outside in (2, 20, 44):
            torch.testing.assert_close(last_logits_with_changed(outside), reference, atol=0, rtol=0)
        for inside in (0, 1, 45, 58):
            assert (last_logits_with_changed(inside) - reference).abs().max() > 1e-3, inside


def test_window_covering_the_input_equals_full_attention(lm):
    ids = ids_of(60, batch=2)
    reference = logits(lm, ids)
    tolerance = rounding_tolerance(reference, model_chain(lm.model.config, 60))
    with SlidingWindow(sink_tokens=4, recent_window=56)(lm):
        torch.testing.assert_close(logits(lm, ids), reference, atol=tolerance, rtol=0)
    with SlidingWindow(sink_tokens=4, recent_window=55)(lm):  # one token short: the first non-sink is dropped
        assert (logits(lm, ids)[:, -1] - reference[:, -1]).abs().max() > 100 * tolerance


def test_window_attention_matches_a_naive_reference_with_documented_positions():
    """Per query t: sink i's key moved to position i + e(t) (rotating the key), recent keys t - W < j <= t as is."""
    torch.manual_seed(0)
    sinks, size, n, d, kv_heads, groups = 3, 5, 20, 16, 2, 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    query = rotate(torch.randn(1, kv_heads * groups, n, d), torch.arange(n), inv_freq)
    key = rotate(torch.randn(1, kv_heads, n, d), torch.arange(n), inv_freq)
    value = torch.randn(1, kv_heads, n, d)
    installation = SimpleNamespace(plan=window_module.WindowPlan(sink_tokens=sinks, recent_window=size))
    module = SimpleNamespace(longctx=installation, longctx_inv_freq=inv_freq, training=False)
    out, _ = window_attention(module, query, key, value, None, scaling=d**-0.5, position_ids=torch.arange(n)[None])
    # per output: a d-term score, an n-term softmax sum and weighted sum, and RoPE angles up to n rad (query, key and
    # the sink's move) rounded relative to themselves
    chain = d + 2 * n + 3 * n
    for t in range(n):
        evicted = max(0, t - (sinks + size - 1))
        visible = [j for j in range(t + 1) if j < sinks or j > t - size]
        moved = torch.tensor([evicted if j < sinks else 0 for j in visible])
        k = rotate(key[0, :, visible], moved, inv_freq)
        for h in range(kv_heads * groups):
            weights = torch.softmax(query[0, h, t] @ k[h // groups].T * d**-0.5, dim=-1)
            expected = weights @ value[0, h // groups, visible]
            torch.testing.assert_close(out[0, t, h], expected, atol=rounding_tolerance(expected, chain), rtol=0)
        if t >= sinks + size - 1:  # the farthest key is sink 0, at distance exactly S + W - 1
            assert t - (0 + evicted) == sinks + size - 1


def test_window_prefill_in_blocks_and_decode_agree(lm, monkeypatch):
    ids = ids_of(60, batch=2)
    with SlidingWindow(sink_tokens=2, recent_window=8)(lm):
        prefill = logits(lm, ids, use_cache=False)
        tolerance = rounding_tolerance(prefill, model_chain(lm.model.config, 60))
        monkeypatch.setattr(window_module, "QUERY_BLOCK", 7)
        torch.testing.assert_close(logits(lm, ids, use_cache=False), prefill, atol=tolerance, rtol=0)
        monkeypatch.undo()
        with torch.no_grad():
            out = lm.model(ids[:, :20], use_cache=True)
            cache = output_cache(out)
            steps = [out.logits[:, -1]]
            for t in range(20, 59):
                steps.append(lm.model(ids[:, t : t + 1], **with_cache(lm.model, cache)).logits[:, -1])
    assert isinstance(cache, SinkWindowCache) and cache.get_seq_length() == 59
    assert all(layer.keys.shape[-2] == 2 + 8 - 1 for layer in cache.layers)  # sinks + W - 1, whatever the length
    torch.testing.assert_close(torch.stack(steps, dim=1), prefill[:, 19:59], atol=tolerance, rtol=0)


def test_window_greedy_generate_matches_prefill(lm):
    prompt = ids_of(20)
    with SlidingWindow(sink_tokens=2, recent_window=8)(lm):
        with torch.no_grad():
            generated = lm.model.generate(
                prompt, max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        prefill = logits(lm, generated.sequences, use_cache=False)
    cache = output_cache(generated)
    assert isinstance(cache, SinkWindowCache) and all(layer.keys.shape[-2] == 9 for layer in cache.layers)
    tolerance = rounding_tolerance(prefill, model_chain(lm.model.config, 50))
    torch.testing.assert_close(torch.stack(generated.logits, dim=1), prefill[:, 19:49], atol=tolerance, rtol=0)
    assert torch.equal(generated.sequences[:, 20:], prefill[:, 19:49].argmax(-1))


def test_window_default_size_fills_the_pretrained_length(lm):
    ids = ids_of(PRETRAINED)
    reference = logits(lm, ids)
    method = SlidingWindow(sink_tokens=4)
    with method(lm) as installed:
        assert installed.plan.recent_window == PRETRAINED - 4
        tolerance = rounding_tolerance(reference, model_chain(lm.model.config, PRETRAINED))
        torch.testing.assert_close(logits(lm, ids), reference, atol=tolerance, rtol=0)


def test_window_refuses_padded_batches(lm):
    ids = ids_of(10, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with SlidingWindow(sink_tokens=2, recent_window=8)(lm), pytest.raises(MethodError):
        logits(lm, ids, attention_mask=mask)


def test_invalid_parameters_are_refused():
    with pytest.raises(MethodError):
        PositionInterpolation(factor=0.5)
    with pytest.raises(MethodError):
        SlidingWindow(recent_window=0)
