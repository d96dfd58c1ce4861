"""Every registered method on every RoPE family: tiny random models built in memory from each family's config.

The families differ where methods used to break: biased q/k/v (Qwen2), q/k norms (Qwen3, Gemma 3), fused qkv (Phi-3,
GPT-NeoX), RoPE on a quarter of the head dim (GPT-NeoX), interleaved local sliding-window and global layers with
different RoPE bases (Gemma 3). GPT-2 (learned positions) must be refused by every RoPE method.

The matrix iterates over the registry: a method registered later runs on every family here without touching this
file (at its defaults unless `AT_TINY_SCALE` scales it down; `WITHIN_RANGE` adds its identity check).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import logits, model_chain, rounding_tolerance
from longctx.methods.base import AttentionMethod, MethodError, output_cache, with_cache
from longctx.methods.longheads import LongHeads
from longctx.methods.rope import attention_layers, rotate
from longctx.methods.rope_scaling import NTKScaling, PositionInterpolation, YaRN
from longctx.methods.window import SlidingWindow
from longctx.models import LoadedModel
from longctx.registry import METHODS, build_method

PRETRAINED = 64
W, A = 8, 32  # LongHeads at this scale: K = 4 chunks of 8 tokens, selection from position 32 on
LOCAL_WINDOW = 8  # Gemma 3's sliding layers see their 8 most recent tokens
SHAPE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=PRETRAINED, initializer_range=0.2,  # large enough to move logits
)
ABSENT = object()  # a SHAPE key the family's config does not take
# Every method at the scale of these models (trained on 64 tokens), acting on a 100-token input: the one place a
# method's test-size parameters live. A method not listed runs at its defaults.
AT_TINY_SCALE = {
    # per-token selection: prefill then selects as decoding does (query_block > 1 shares one choice per block)
    "longheads": dict(chunk_size=W, atten_length=A, query_block=1, exact_tail=4),
    "window": dict(sink_tokens=2, recent_window=16),
    "pi": dict(factor=2.0),
    "ntk": dict(factor=2.0, dynamic=False),
    "yarn": dict(factor=2.0),
    "self_extend": dict(group_size=3, recent_window=16),  # reaches (64 - 16) * 3 + 16 = 160 tokens
    "dca": dict(chunk_size=24, local_window=8),
    "lm_infinite": dict(sink_tokens=2, recent_window=16),
    # blocks of 4, 4 initial tokens, a local window of 16, 2 retrieved blocks: lookups from position 28, per token
    "infllm": dict(chunk_size=4, sink_tokens=4, recent_window=16, topk=2, repr_topk=2, query_block=1, exact_tail=4),
}
# (parameters, input length) under which a method's range covers the input, so it must equal full attention.
WITHIN_RANGE = {
    "full": ({}, 48),
    "longheads": (AT_TINY_SCALE["longheads"], A),
    "window": (dict(sink_tokens=2, recent_window=46), 48),
    "pi": (dict(factor=1.0), 48),
    "ntk": (dict(factor=1.0, dynamic=False), 48),
    "yarn": (dict(factor=1.0), 48),
    "self_extend": (dict(group_size=2, recent_window=48), 48),
    "dca": (dict(chunk_size=48, local_window=8), 48),
    "lm_infinite": (dict(sink_tokens=2, recent_window=48), 48),
    "infllm": (dict(chunk_size=4, sink_tokens=4, recent_window=48, topk=2, repr_topk=2, query_block=8), 48),
}
ATTENTION_METHODS = [name for name, cls in METHODS.items() if issubclass(cls, AttentionMethod)]
GEMMA_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # biased q/k/v
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # q/k norms
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),  # v0.2+: no sliding window
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),  # fused qkv_proj
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.25, "num_key_value_heads": ABSENT}),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        {
            "num_hidden_layers": 4, "head_dim": 16, "sliding_window": LOCAL_WINDOW, "layer_types": GEMMA_LAYER_TYPES,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        },
    ),
}


def build(family: str, **overrides) -> LoadedModel:
    config_class, model_class, settings = FAMILIES[family]
    settings = {key: value for key, value in {**SHAPE, **settings, **overrides}.items() if value is not ABSENT}
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**settings)
    model = getattr(transformers, model_class)(config).eval()
    return LoadedModel(model, None, family, PRETRAINED)


@pytest.fixture(params=list(FAMILIES))
def lm(request) -> LoadedModel:
    return build(request.param)


@pytest.fixture
def gemma() -> LoadedModel:
    return build("gemma3")


def ids_of(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def lh(**params) -> LongHeads:
    return LongHeads(**{**AT_TINY_SCALE["longheads"], **params})


def at_tiny_scale(name: str, **params):
    return build_method(name, **{**AT_TINY_SCALE.get(name, {}), **params})


def layer_keys(lm: LoadedModel, ids: torch.Tensor, shift: int) -> dict[int, torch.Tensor]:
    """The RoPE'd keys each attention module hands to the attention function, for positions shift, shift + 1, ..."""
    keys = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        keys[module.layer_idx] = key
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("capture_keys", capture)
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("capture_keys")
    try:
        logits(lm, ids, position_ids=shift + torch.arange(ids.shape[1])[None])
    finally:
        lm.model.set_attn_implementation(previous)
    return keys


# --- finding the layers and their RoPE --------------------------------------------------------------------------


def test_every_attention_layer_and_the_rope_it_really_uses_are_found(lm):
    """Causal RoPE attention is shift-invariant, so every layer's keys at positions p + 37 are its keys at p rotated by
    37 with exactly that layer's frequencies: a check of the frequencies found against the model's own rotation."""
    layers = attention_layers(lm.model)
    config = lm.model.config
    assert [layer.index for layer in layers] == list(range(config.num_hidden_layers))
    ids = ids_of(20)
    at_zero, shifted = layer_keys(lm, ids, 0), layer_keys(lm, ids, 37)
    for layer in layers:
        torch.testing.assert_close(rotate(at_zero[layer.index], torch.tensor(37), layer.inv_freq), shifted[layer.index])
    head_dim = layers[0].module.head_dim if hasattr(layers[0].module, "head_dim") else layers[0].module.head_size
    rotary_dims = {2 * layer.inv_freq.numel() for layer in layers}
    assert rotary_dims == ({head_dim // 4} if lm.name == "gpt_neox" else {head_dim})  # GPT-NeoX: partial rotary


def test_gemma3_layer_types_have_their_own_window_and_rope(gemma):
    layers = attention_layers(gemma.model)
    assert [layer.layer_type for layer in layers] == GEMMA_LAYER_TYPES
    assert [layer.sliding_window for layer in layers] == [LOCAL_WINDOW, LOCAL_WINDOW, None, LOCAL_WINDOW]
    dim = torch.arange(0, 16, 2).float() / 16
    torch.testing.assert_close(layers[0].inv_freq, 1.0 / 10_000.0**dim)
    torch.testing.assert_close(layers[2].inv_freq, 1.0 / 1_000_000.0**dim)
    # the shift test above would fail with the other layer type's frequencies
    ids = ids_of(20)
    keys = layer_keys(gemma, ids, 0)[2]
    assert not torch.allclose(rotate(keys, torch.tensor(37), layers[0].inv_freq), layer_keys(gemma, ids, 37)[2], atol=1e-3)


# --- every method on every family ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_every_family_and_decodes_as_it_prefills(lm, name):
    ids = ids_of(100)
    method = at_tiny_scale(name)
    prefill = logits(lm, ids, method)
    with method(lm, max_length=100), torch.no_grad():
        output = lm.model(ids[:, :70], use_cache=True)
        cache = output_cache(output)
        steps = [output.logits[:, -1]]
        steps += [lm.model(ids[:, t : t + 1], **with_cache(lm.model, cache)).logits[:, -1] for t in range(70, 99)]
    assert torch.isfinite(prefill).all()
    # the same computation in another order (one query at a time against the cache): float32 rounding only
    tolerance = rounding_tolerance(prefill, model_chain(lm.model.config, 100))
    torch.testing.assert_close(torch.stack(steps, dim=1), prefill[:, 69:99], atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_within_its_range_equals_full_attention(lm, name):
    if name not in WITHIN_RANGE:
        pytest.skip(f"{name} has no within-range parameters in WITHIN_RANGE")
    params, length = WITHIN_RANGE[name]
    ids = ids_of(length)
    method = build_method(name, **params)
    expected = logits(lm, ids)
    tolerance = rounding_tolerance(expected, model_chain(lm.model.config, length))
    torch.testing.assert_close(logits(lm, ids, method), expected, atol=tolerance, rtol=0)


def test_window_one_token_short_of_the_input_differs_from_full_attention(lm):
    ids = ids_of(48)
    one_short = logits(lm, ids, SlidingWindow(sink_tokens=2, recent_window=45))  # the first non-sink token is dropped
    assert (one_short[:, -1] - logits(lm, ids)[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("scaling", ["pi", "ntk", "yarn"])
def test_rope_scaling_with_factor_above_one_changes_the_logits(lm, scaling):
    ids = ids_of(48)
    assert (logits(lm, ids, at_tiny_scale(scaling)) - logits(lm, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("scaling", [PositionInterpolation, YaRN])
def test_rope_scaling_stretches_only_the_global_layers_of_gemma3(gemma, scaling):
    before = [layer.inv_freq for layer in attention_layers(gemma.model)]
    with scaling(factor=4.0)(gemma):
        during = [layer.inv_freq for layer in attention_layers(gemma.model)]
    for layer_type, old, new in zip(GEMMA_LAYER_TYPES, before, during):
        if layer_type == "full_attention":
            assert (new <= old).all() and (new < old).any()
        else:
            torch.testing.assert_close(new, old)
    with PositionInterpolation(factor=4.0)(gemma):
        torch.testing.assert_close(attention_layers(gemma.model)[2].inv_freq, before[2] / 4)


@pytest.mark.parametrize("name", [*METHODS, "longheads+pi", "dca+yarn"])
def test_remove_restores_the_model_exactly(lm, name):
    name, _, rescaling = name.partition("+")
    make = lambda: at_tiny_scale(name, **({"rope_scaling": at_tiny_scale(rescaling)} if rescaling else {}))  # noqa: E731
    ids = ids_of(2 * PRETRAINED)
    model, config = lm.model, lm.model.config
    before = logits(lm, ids)
    parameters, saved_parameters = config.rope_parameters, copy.deepcopy(config.rope_parameters)
    modules, implementation = dict(model.named_modules()), config._attn_implementation
    method = make()
    with method(lm, max_length=2 * PRETRAINED):
        if name in AT_TINY_SCALE:  # the method acts on this beyond-pretrained input
            assert (logits(lm, ids) - before).abs().max() > 1e-3
    assert config.rope_parameters is parameters and config.rope_parameters == saved_parameters
    assert config._attn_implementation == implementation
    assert dict(model.named_modules()) == modules  # the very same rotary modules are back
    assert not any(module._forward_pre_hooks for module in model.modules())
    assert not any(hasattr(module, "longctx") or hasattr(module, "longctx_inv_freq") for module in model.modules())
    torch.testing.assert_close(logits(lm, ids), before, atol=0, rtol=0)


def test_dynamic_ntk_also_restores_the_model(lm):
    ids = ids_of(2 * PRETRAINED)
    before = logits(lm, ids)
    with NTKScaling(dynamic=True)(lm):
        assert (logits(lm, ids) - before).abs().max() > 1e-3
    torch.testing.assert_close(logits(lm, ids), before, atol=0, rtol=0)


# --- LongHeads past A ---------------------------------------------------------------------------------------------


def test_longheads_past_atten_length_decodes_as_it_prefills_within_range(lm):
    ids = ids_of(100)
    method = lh(query_block=1, record_selection=True)
    prefill = logits(lm, ids, method)
    with method(lm) as installed, torch.no_grad():
        cache = installed.new_cache()
        lm.model(ids[:, :70], **with_cache(lm.model, cache))  # 70: mid-chunk, past the selective start
        steps = [lm.model(ids[:, t : t + 1], **with_cache(lm.model, cache)).logits[:, -1] for t in range(70, 100)]
        trace = installed.trace()
    tolerance = rounding_tolerance(prefill, model_chain(lm.model.config, 100))
    torch.testing.assert_close(torch.stack(steps, dim=1), prefill[:, 70:], atol=tolerance, rtol=0)
    slots = A // W
    global_layers = [layer for layer in attention_layers(lm.model) if not layer.is_local(PRETRAINED)]
    assert len(trace["steps"]) == 31  # the prefill's last query, then 30 decoding steps
    for step, chosen in enumerate(trace["steps"]):
        position = 69 + step
        current = position // W
        assert chosen.shape == (len(global_layers), lm.model.config.num_attention_heads, slots)
        for row in chosen.reshape(-1, slots).tolist():
            assert row[0] == 0 and row[-2:] == [current - 1, current]
            assert row == sorted(set(row))  # distinct, in original order
        # slot i starts at i * w, the query sits at (K - 1) * w + its offset: the farthest key is slot 0's first
        assert (slots - 1) * W + position % W < A


# --- local layers (Gemma 3) -----------------------------------------------------------------------------------------


def attention_inputs_and_outputs(lm: LoadedModel, ids: torch.Tensor, method) -> dict[int, tuple]:
    """Per attention layer: (hidden states in, position embeddings in, attention output) under `method`."""
    seen = {}

    def record(module, args, kwargs, output):
        seen[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"], output[0])

    hooks = [layer.module.register_forward_hook(record, with_kwargs=True) for layer in attention_layers(lm.model)]
    try:
        logits(lm, ids, method)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def own_attention(module, hidden_states, position_embeddings) -> torch.Tensor:
    """The layer's own attention (sdpa) on these inputs, with its sliding-window mask written out."""
    n = hidden_states.shape[1]
    query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = (key <= query) & (key > query - module.sliding_window) if module.sliding_window else key <= query
    with torch.no_grad():
        return module(hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=mask[None, None])[0]


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_gemma3_sliding_layers_keep_their_own_attention(gemma, name):
    ids = ids_of(100)
    for replace in (False, True):
        method = at_tiny_scale(name, replace_sliding_layers=replace)
        seen = attention_inputs_and_outputs(gemma, ids, method)
        for index, layer_type in enumerate(GEMMA_LAYER_TYPES):
            hidden, position_embeddings, output = seen[index]
            own = own_attention(gemma.model.model.layers[index].self_attn, hidden, position_embeddings)
            kept = layer_type == "sliding_attention" and not replace
            # a layer's own attention and the method's differ by rounding where the layer was kept
            tolerance = rounding_tolerance(own, model_chain(gemma.model.config, 100))
            assert torch.allclose(output, own, atol=tolerance, rtol=0) == kept, (replace, index)


def test_gemma3_caches_keep_only_the_window_of_local_layers(gemma):
    ids = ids_of(100)
    for method in (lh(), SlidingWindow(sink_tokens=2, recent_window=16)):
        with method(gemma), torch.no_grad():
            cache = output_cache(gemma.model(ids, use_cache=True))
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        global_length = 100 if isinstance(method, LongHeads) else 2 + 16 - 1
        assert lengths == [global_length if kind == "full_attention" else LOCAL_WINDOW - 1 for kind in GEMMA_LAYER_TYPES]


def test_a_model_of_only_sliding_layers_needs_replace_sliding_layers():
    lm = build("mistral", sliding_window=LOCAL_WINDOW)  # Mistral v0.1: every layer slides
    with pytest.raises(MethodError, match="replace_sliding_layers"):
        lh().apply(lm)
    assert lm.model.config._attn_implementation == "sdpa"
    ids = ids_of(60)
    method = lh(query_block=1, replace_sliding_layers=True)
    prefill = logits(lm, ids, method)
    with method(lm) as installed, torch.no_grad():
        cache = installed.new_cache()
        lm.model(ids[:, :40], **with_cache(lm.model, cache))
        steps = [lm.model(ids[:, t : t + 1], **with_cache(lm.model, cache)).logits[:, -1] for t in range(40, 60)]
    assert all(layer.keys.shape[-2] == 60 for layer in cache.layers)  # LongHeads' layers keep every token
    tolerance = rounding_tolerance(prefill, model_chain(lm.model.config, 60))
    torch.testing.assert_close(torch.stack(steps, dim=1), prefill[:, 40:], atol=tolerance, rtol=0)


# --- no RoPE ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_a_model_without_rope_runs_unchanged_or_gets_a_one_line_error(name):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = LoadedModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval(), None, "gpt2", 1024)
    ids = ids_of(20) % 64
    before = logits(gpt2, ids)
    method = at_tiny_scale(name)
    try:
        with method(gpt2):
            torch.testing.assert_close(logits(gpt2, ids), before, atol=0, rtol=0)  # e.g. full attention
    except MethodError as error:
        assert "RoPE" in str(error) and "\n" not in str(error)
    assert gpt2.model.config._attn_implementation == "sdpa"
    assert not any(module._forward_pre_hooks for module in gpt2.model.modules())
    torch.testing.assert_close(logits(gpt2, ids), before, atol=0, rtol=0)


# --- real weights -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "longheads"])
def test_gemma3_270m_finds_the_passkey_at_2k(gemma3_270m, method):
    """Real weights: Gemma 3 270M, a 2k prompt; LongHeads with A = 1024 reads half of it through chosen chunks."""
    from longctx.registry import build_method
    from longctx.tasks.passkey import Passkey

    task = Passkey(lengths=[2048], num_samples=1, depths=[0.3])
    params = {"atten_length": 1024, "chunk_size": 128, "record_selection": True} if method == "longheads" else {}
    with build_method(method, **params)(gemma3_270m, max_length=2048) as installed:
        metrics = task.run(gemma3_270m, on_sample=lambda record: None)
        trace = installed.trace()
    assert metrics["accuracy"] == 1.0
    if method == "longheads":
        assert trace["chosen"].shape[0] == 3  # the three global layers select; the fifteen local ones keep their window
        needle_chunk = task.samples(gemma3_270m.tokenizer)[0].needle_token // 128
        assert (trace["chosen"] == needle_chunk).any(axis=-1).mean() > 0.2


UNSUPPORTED = {
    "softcap": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SHAPE, head_dim=16, attn_logit_softcapping=50.0)),
    "half-split": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**SHAPE)),  # interleaved RoPE
}


@pytest.mark.parametrize("name", ATTENTION_METHODS)
@pytest.mark.parametrize("feature", list(UNSUPPORTED))
def test_attention_features_the_methods_lack_are_refused(name, feature):
    """Gemma 2's logit soft-capping, Cohere's interleaved RoPE: every method that replaces the attention refuses them
    in one line, not silently computing them wrong (a RoPE rescaling underneath is taken off again)."""
    lm = LoadedModel(UNSUPPORTED[feature]().eval(), None, feature, PRETRAINED)
    implementation, parameters = lm.model.config._attn_implementation, copy.deepcopy(lm.model.config.rope_parameters)
    with pytest.raises(MethodError, match=feature) as error:
        at_tiny_scale(name, rope_scaling=PositionInterpolation(factor=2.0)).apply(lm)
    assert "\n" not in str(error.value)
    assert lm.model.config._attn_implementation == implementation and lm.model.config.rope_parameters == parameters
