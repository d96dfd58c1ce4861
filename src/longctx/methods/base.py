"""The plumbing every attention-replacing method shares: `AttentionMethod` (its plan, install and exact remove, an
optional RoPE rescaling applied underneath), `attention_call` (what every attention function reads first), the
cache keyword of the installed transformers, and the plain attention kernels (causal, sliding-window) that methods
fall back to. `Method`, its `Plan` and `Installation` live in method.py."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.cache_utils import DynamicLayer

from longctx.methods.method import Installation, Method, MethodError, Plan
from longctx.methods.rope import LENGTH_DEPENDENT_ROPE, AttentionLayer, attention_layers
from longctx.methods.rope_scaling import RopePlan, RopeScaling, rope_scaling_value
from longctx.models import LoadedModel

__all__ = ["AttentionMethod", "AttentionInstallation", "AttentionPlan", "AttentionCall", "attention_call", "Method", "MethodError",
           "causal_attention", "sliding_window_attention", "with_cache", "output_cache"]


# The keyword a model's forward takes its KV cache under: transformers 5.24 renamed `past_key_values` to `cache`
# (the old name still works, with a warning, until 5.40). Callers may pass either; the decoder gets the one it takes.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which `model.forward` takes its KV cache in the installed transformers."""
    parameters = inspect.signature(model.forward).parameters  # follows the deprecation wrapper's __wrapped__
    return next((name for name in CACHE_ARGUMENTS if name in parameters), "past_key_values")


def with_cache(model: torch.nn.Module, cache: Cache | None) -> dict[str, Cache | None]:
    """`model(ids, **with_cache(model, cache))`: pass a cache under whichever name this transformers takes."""
    return {cache_argument(model): cache}


def output_cache(output: Any) -> Cache | None:
    """The cache a forward call or `generate()` returned (a `ModelOutput`): `output.cache` from transformers 5.24,
    `output.past_key_values` before."""
    return next((output[name] for name in CACHE_ARGUMENTS if output.get(name) is not None), None)


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_start: int, scaling: float, dropout: float = 0.0
) -> torch.Tensor:
    """Ordinary causal attention at true positions; query [B, Hq, L, D] starts at position q_start, keys at 0."""
    q_len, kv_len = query.shape[2], key.shape[2]
    options = dict(dropout_p=dropout, scale=scaling, enable_gqa=True)
    if q_start == 0 and q_len == kv_len:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, **options)
    positions = torch.arange(q_start, q_start + q_len, device=query.device)
    mask = torch.arange(kv_len, device=query.device)[None, :] <= positions[:, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, **options)


@dataclass(frozen=True, kw_only=True)
class AttentionPlan(Plan):
    """What every attention method's plan holds besides its own numbers: the RoPE rescaling underneath, if any."""

    rope: RopePlan | None = None


@dataclass(frozen=True)
class AttentionCall:
    """What an attention function reads first, the same for every method (see `attention_call`).

    plan: the installed method's plan; inv_freq: this layer's RoPE frequencies; first: the absolute position of the
    first query; offset: key slot of absolute position p (past the sinks a bounded cache keeps) is p - offset, 0 when
    the keys are the whole sequence; dropout: the rate to apply (0 outside training).
    """

    installation: Installation
    plan: AttentionPlan
    inv_freq: torch.Tensor
    first: int
    offset: int
    dropout: float


def attention_call(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict,
                   sinks: int | None = None) -> AttentionCall:
    """The installed method and the positions of this call. The queries [B, Hq, q, D] are contiguous and end at the
    last key of key [B, Hkv, kv, D]. sinks: None when the keys must be the whole sequence (a full cache); else the
    cache may be bounded, keeping this many leading keys and a contiguous run of recent ones."""
    installation = getattr(module, "longctx", None)
    if installation is None:
        raise RuntimeError("a longctx attention function was called on a layer its method is not installed on")
    q_len, kv_len = query.shape[2], key.shape[2]
    position_ids = kwargs.get("position_ids")
    if position_ids is None and sinks is not None:  # a bounded cache no longer tells where the queries are
        raise RuntimeError(f"{installation.method.name} attention needs position_ids")
    first = int(position_ids[0, 0]) if position_ids is not None else kv_len - q_len
    offset = first + q_len - kv_len
    if offset < 0 or (offset > 0 and (sinks is None or kv_len <= sinks)):
        raise RuntimeError(
            f"{installation.method.name}: {kv_len} cached keys do not fit queries at {first}..{first + q_len - 1}"
        )
    return AttentionCall(installation, installation.plan, module.longctx_inv_freq, first, offset,
                         dropout if module.training else 0.0)


class AttentionInstallation(Installation):
    """An attention method installed: besides the plan, the layers it leaves to their own sliding window
    (`local_windows`: layer index -> window), whose cache keeps only that window."""

    local_windows: dict[int, int]


@dataclass(frozen=True)
class AttentionMethod(Method):
    """A method that swaps the attention of a model's layers for a registered function and brings its own KV cache.

    The plumbing lives here once: find the attention layers and the RoPE each uses (`rope.attention_layers`), register
    `attention_function` with transformers' `AttentionInterface` under `longctx_<name>`, point every layer the method
    acts on at it (the function finds the installation as `module.longctx`, see `attention_call`, and the layer's
    RoPE frequencies as `module.longctx_inv_freq`), and hook the decoder's forward so that each sequence carries the
    cache `prepare_cache` returns (plain `model(...)` and `generate()` alike).

    A subclass implements `resolve` (its own numbers, validated, as a frozen `AttentionPlan`) and `attention_function`.

    Where a model mixes layer types (Gemma 3: five local sliding-window layers per global one), the method acts on
    the global layers; local layers keep their own sliding-window attention unless `replace_sliding_layers` is set.
    Batches must not be padded: transformers builds no mask for a custom attention function.

    Every attention method takes an optional RoPE rescaling (`rope_scaling`: a PositionInterpolation, NTKScaling or
    YaRN from rope_scaling.py, or its config as a dict, {"name": "yarn", "factor": 2}), checked when the method is
    built, before any model loads. Installing puts it in first, so the frequencies the method re-rotates with are the
    rescaled ones; removing takes it off last.
    """

    installation_class: ClassVar[type[AttentionInstallation]] = AttentionInstallation
    replace_sliding_layers: bool = False
    rope_scaling: RopeScaling | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_scaling", rope_scaling_value(self.rope_scaling, self.name))

    @property
    def attention_name(self) -> str:
        """The name this method's attention function is registered under with transformers."""
        return f"longctx_{self.name}"

    @staticmethod
    def attention_function(module, query, key, value, attention_mask, **kwargs):
        raise NotImplementedError

    def resolve(self, lm: LoadedModel, max_length: int | None, trained_span: int) -> AttentionPlan:
        """This method's numbers for `lm` and inputs of up to `max_length` tokens, validated (MethodError, one line).
        trained_span: the distances the model knows, its trained length times the RoPE rescaling's factor."""
        return AttentionPlan()

    def plan(self, lm: LoadedModel, max_length: int | None = None) -> AttentionPlan:
        rope = self.rope_scaling.scaling_plan(lm, max_length) if self.rope_scaling is not None else None
        self.layers_to_act_on(lm)
        span = int(lm.pretrained_length * (rope.factor if rope is not None and rope.factor else 1.0))
        return replace(self.resolve(lm, max_length, span), rope=rope)

    def prepare_cache(self, installation: AttentionInstallation, config, cache: Cache | None, use_cache: bool | None) -> Cache | None:
        """The cache this forward call should use, given the one it was called with."""
        return cache

    def layers_to_act_on(self, lm: LoadedModel) -> tuple[list[AttentionLayer], list[AttentionLayer]]:
        """(all attention layers, those this method replaces); MethodError (one line) if it cannot serve the model."""
        model_name = type(lm.model).__name__
        try:
            layers = attention_layers(lm.model)
        except ValueError as error:
            raise MethodError(f"{self.name}: {error}") from None
        if not layers:
            raise MethodError(f"{self.name} found no attention layers in {model_name}: no module calls transformers' attention interface")
        if any(layer.rotary is None for layer in layers):
            raise MethodError(f"{self.name} needs a RoPE model, but the attention layers of {model_name} get no rotary position embeddings")
        with_extras = next((layer for layer in layers if layer.extras), None)
        if with_extras is not None:
            raise MethodError(f"{self.name} does not implement {', '.join(with_extras.extras)}, which the attention layers of {model_name} use")
        acted = [layer for layer in layers if self.replace_sliding_layers or not layer.is_local(lm.pretrained_length)]
        if not acted:
            raise MethodError(
                f"{self.name}: every attention layer of {model_name} is a local sliding-window layer"
                f" (window {layers[0].sliding_window}); set replace_sliding_layers=true to act on them"
            )
        changing = next((layer for layer in acted if layer.rope_type in LENGTH_DEPENDENT_ROPE), None)
        if changing is not None:
            raise MethodError(
                f"{self.name} re-rotates cached keys with fixed frequencies, but layer {changing.index} of {model_name}"
                f" uses {changing.rope_type} RoPE, whose frequencies change with the length"
            )
        return layers, acted

    def install(self, lm: LoadedModel, plan: AttentionPlan) -> AttentionInstallation:
        installation = self.installation_class(self, lm, plan)
        try:
            self._install(lm, plan, installation)
        except BaseException:
            installation.remove()
            raise
        return installation

    def _install(self, lm: LoadedModel, plan: AttentionPlan, installation: AttentionInstallation) -> None:
        model = lm.model
        if plan.rope is not None:
            self.rope_scaling.swap_rotary(lm, plan.rope, installation)
        layers, acted = self.layers_to_act_on(lm)  # after the rescaling: its frequencies are the ones to re-rotate with
        for layer in acted:
            layer.module.longctx = installation
            layer.module.longctx_inv_freq = layer.inv_freq.clone()

        def detach_layers() -> None:
            for layer in acted:
                del layer.module.longctx, layer.module.longctx_inv_freq

        installation.on_remove(detach_layers)
        # one function serves every layer: those the method does not act on keep their own attention
        act = self.attention_function

        def attention(module, *args, **kwargs):
            return (act if hasattr(module, "longctx") else own_sliding_window_attention)(module, *args, **kwargs)

        AttentionInterface.register(self.attention_name, attention)
        acted_indices = {layer.index for layer in acted}
        # layers left alone (index -> window): a method's cache keeps only their window, as the model's own does
        installation.local_windows = {layer.index: layer.sliding_window for layer in layers if layer.index not in acted_indices}
        replaced_sliding = [layer.index for layer in acted if layer.sliding_window is not None]
        # on the decoder, not the LM wrapper: tasks that call the decoder directly (perplexity) pass through it too
        decoder = model.get_decoder()
        argument = cache_argument(decoder)

        def before_forward(decoder, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2 and not bool(mask.all()):
                raise MethodError(f"{self.name} does not support padded batches; run one sequence (or equal lengths) at a time")
            passed = [kwargs.pop(name, None) for name in CACHE_ARGUMENTS]
            cache = next((cache for cache in passed if cache is not None), None)
            cache = self.prepare_cache(installation, decoder.config, cache, kwargs.get("use_cache"))
            for index in replaced_sliding if cache is not None else ():
                # A sliding layer this method replaces must keep every token: the model's own cache would cut it to its window.
                if getattr(cache.layers[index], "is_sliding", False):
                    if cache.layers[index].is_initialized:
                        raise MethodError(f"{self.name} replaces sliding layer {index}, whose cache already dropped tokens")
                    cache.layers[index] = DynamicLayer()
            kwargs[argument] = cache
            return args, kwargs

        hook = decoder.register_forward_pre_hook(before_forward, with_kwargs=True)
        installation.on_remove(hook.remove)
        # transformers has a public setter (set_attn_implementation) but no public getter for the one in use
        implementation = model.config._attn_implementation
        model.set_attn_implementation(self.attention_name)
        installation.on_remove(lambda: model.set_attn_implementation(implementation))


# Queries per block in a local layer's attention: each block needs only its band of (block + window - 1) keys.
LOCAL_QUERY_BLOCK = 1024


def sliding_window_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, scaling: float, dropout: float = 0.0
) -> torch.Tensor:
    """Causal attention over each query's `window` most recent keys (keys j with t - window < j <= t), as a local
    sliding-window layer computes it, in O(L * (block + window)) instead of O(L * N).

    query [B, Hq, L, D] are the last L of the keys [B, Hkv, N, D]: a contiguous run of tokens ending at the last query,
    as a full or a sliding-window cache holds them (possibly in host memory). Returns [B, Hq, L, D].
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    q_start = kv_len - q_len
    if kv_len <= window:  # nothing has left the window yet
        return causal_attention(query, key.to(query.device), value.to(query.device), q_start, scaling, dropout)
    out = []
    for start in range(0, q_len, LOCAL_QUERY_BLOCK):
        stop = min(start + LOCAL_QUERY_BLOCK, q_len)
        low, high = max(0, q_start + start - window + 1), q_start + stop
        positions = torch.arange(q_start + start, high, device=query.device)[:, None]
        band = torch.arange(low, high, device=query.device)[None, :]
        out.append(
            F.scaled_dot_product_attention(
                query[:, :, start:stop],
                key[:, :, low:high].to(query.device),
                value[:, :, low:high].to(query.device),
                attn_mask=(band <= positions) & (band > positions - window),
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=True,
            )
        )
    return torch.cat(out, dim=2)


def own_sliding_window_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention of a layer a method leaves alone: its own sliding window, as the model passes it."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = sliding_window if sliding_window is not None else key.shape[2]
    out = sliding_window_attention(query, key, value, window, scaling, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None
