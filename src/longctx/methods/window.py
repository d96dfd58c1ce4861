"""Sliding-window attention with attention sinks, the StreamingLLM way (Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks").

A query at absolute position t attends to the first S = `sink_tokens` tokens and to the W = `recent_window` most
recent ones, itself included: keys j with t - W < j <= t. The tokens in between are evicted. Positions are assigned
inside the window, so no query-key distance ever reaches S + W:

* a recent key keeps its true distance t - j, in [0, W);
* the e(t) = max(0, t - (S + W - 1)) evicted tokens are squeezed out: sink i sits at position i + e(t), i.e. at
  distance min(t, S + W - 1) - i. Once eviction starts, sink S - 1 sits right before the oldest window token
  (distance W) and sink 0 farthest (distance S + W - 1). Before it starts (t < S + W) every key is at its true
  position and the attention equals full causal attention.

This is what StreamingLLM's rolling cache gives (positions = slots in a cache of S + W entries), written per query
so that prefill of a long input, block by block, and token-by-token decoding give the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from longctx.methods.base import AttentionInstallation, AttentionMethod, AttentionPlan, MethodError, attention_call, causal_attention
from longctx.methods.rope import rotate
from longctx.models import LoadedModel

# Queries per block once eviction has started: a block needs the sinks plus a band of (block + W - 1) keys, so work
# stays O(block * (S + W)) instead of O(N^2).
QUERY_BLOCK = 512


@dataclass(frozen=True, kw_only=True)
class WindowPlan(AttentionPlan):
    sink_tokens: int  # S
    recent_window: int  # W


class SinkWindowLayer(DynamicLayer):
    """One layer's cache keeping the S sinks and the last W - 1 tokens: all that any later query can see.

    `get_seq_length` counts every token seen, so that the model keeps numbering new tokens by absolute position.
    """

    is_croppable = False

    def __init__(self, sink_tokens: int, recent_window: int) -> None:
        super().__init__()
        self.sink_tokens, self.recent_window = sink_tokens, recent_window
        self.cumulative_length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = self._evict(keys), self._evict(values)
        return keys, values  # this step's queries may still need the tokens just evicted

    def _evict(self, states: torch.Tensor) -> torch.Tensor:
        length, keep = states.shape[-2], self.recent_window - 1
        if length <= self.sink_tokens + keep:
            return states
        # cat copies, so the full-length tensor of a long prefill is freed after this step instead of kept as a view.
        return torch.cat([states[..., : self.sink_tokens, :], states[..., length - keep :, :]], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length


class SinkWindowCache(Cache):
    """KV cache of bounded size (S + W - 1 tokens per layer) for `SlidingWindow`.

    local_windows: layers left to their own sliding-window attention (layer index -> window), which keep only their
    window, as the model's own cache does.
    """

    def __init__(self, sink_tokens: int, recent_window: int, num_layers: int, local_windows: dict[int, int] | None = None) -> None:
        local_windows = local_windows or {}
        super().__init__(
            layers=[
                DynamicSlidingWindowLayer(local_windows[index]) if index in local_windows
                else SinkWindowLayer(sink_tokens, recent_window)
                for index in range(num_layers)
            ]
        )


def sink_window_cache(
    config, cache: Cache | None, use_cache: bool | None, sink_tokens: int, recent_window: int, local_windows: dict[int, int]
) -> Cache | None:
    """The cache a forward call of a sinks + recent-window method should use (StreamingLLM, LM-Infinite): a fresh
    `SinkWindowCache` where the call would start a cache, else the one it was given."""
    fresh = cache is None and (use_cache if use_cache is not None else config.use_cache)
    # generate() hands in an empty DynamicCache; swap it before anything is stored so memory stays bounded.
    if fresh or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
        layers = config.get_text_config(decoder=True).num_hidden_layers
        return SinkWindowCache(sink_tokens, recent_window, layers, local_windows)
    return cache


def window_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as "longctx_window" (see the module docstring for the positions).

    query [B, Hq, q, D] at absolute positions `position_ids`, contiguous and ending at the last key; key/value
    [B, Hkv, kv, D] are the sinks followed by a contiguous run of tokens, as `SinkWindowCache` (or any full cache)
    keeps them. `attention_mask` is None: transformers builds no mask for an unknown implementation.
    """
    call = attention_call(module, query, key, dropout, kwargs, sinks=module.longctx.plan.sink_tokens)
    plan: WindowPlan = call.plan
    sinks, size, first, offset = plan.sink_tokens, plan.recent_window, call.first, call.offset
    inv_freq, dropout = call.inv_freq, call.dropout
    batch, q_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    out = query.new_empty(batch, q_heads, q_len, value.shape[-1])
    # Before eviction starts (t < S + W) a query sees every key at its true position: plain causal attention.
    before_eviction = min(max(sinks + size - first, 0), q_len)  # offset is 0 then: nothing has been evicted yet
    if before_eviction:
        stop = first + before_eviction
        out[:, :, :before_eviction] = causal_attention(
            query[:, :, :before_eviction], key[:, :, :stop], value[:, :, :stop], first, scaling, dropout
        )
    n_sinks = min(sinks, kv_len)
    sink_k, sink_v = key[:, :, :n_sinks], value[:, :, :n_sinks]
    key_dim, value_dim = query.shape[-1], value.shape[-1]
    # Sink i sits e(t) positions past its slot, so its score is R(-e(t))q . k_i while a recent key scores q . k_j.
    # Doubling the head dim puts both in one fused attention call: [q, R(-e)q] against [k_j, 0] and [0, k_i].
    sink_k = torch.cat((torch.zeros_like(sink_k), sink_k), dim=-1)
    for start in range(before_eviction, q_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, q_len)
        pos = torch.arange(first + start, first + stop, device=query.device)
        hi = first + stop
        lo = min(max(sinks, first + start - size + 1), hi)
        band_pos = torch.arange(lo, hi, device=query.device)
        band_k = key[:, :, lo - offset : hi - offset]
        q = query[:, :, start:stop]
        q_for_sinks = rotate(q, -(pos - (sinks + size - 1)), inv_freq)
        visible = torch.cat(
            (
                torch.ones(stop - start, n_sinks, dtype=torch.bool, device=query.device),
                (band_pos <= pos[:, None]) & (band_pos > pos[:, None] - size),
            ),
            dim=-1,
        )
        values = torch.cat((sink_v, value[:, :, lo - offset : hi - offset]), dim=-2)
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            torch.cat((q, q_for_sinks), dim=-1),
            torch.cat((sink_k, torch.cat((band_k, torch.zeros_like(band_k)), dim=-1)), dim=-2),
            F.pad(values, (0, 2 * key_dim - value_dim)),  # equal head dims keep SDPA on its fused kernel
            attn_mask=visible,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=True,
        )[..., :value_dim]
    return out.transpose(1, 2), None


@dataclass(frozen=True)
class SlidingWindow(AttentionMethod):
    """StreamingLLM (Xiao et al. 2023): attend to `sink_tokens` initial tokens plus the `recent_window` most recent,
    with positions assigned inside the window (see the module docstring), evicting the rest from the KV cache.

    recent_window=None: pretrained length - sink_tokens, so distances stay within the pretrained length.
    Works with plain `model(...)` and `model.generate(...)`; batches must not be padded.
    """

    name = "window"
    label_params = ("sink_tokens", "recent_window")
    renamed = {"window_size": "recent_window"}
    attention_function = staticmethod(window_attention)
    sink_tokens: int = 4
    recent_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_tokens < 0 or (self.recent_window is not None and self.recent_window < 1):
            raise MethodError(f"window: need sink_tokens >= 0 and recent_window >= 1 (got {self.sink_tokens}, {self.recent_window})")

    def resolve(self, lm: LoadedModel, max_length: int | None, trained_span: int) -> WindowPlan:
        size = self.recent_window if self.recent_window is not None else lm.pretrained_length - self.sink_tokens
        if size < 1:
            raise MethodError(f"window: sink_tokens={self.sink_tokens} leaves no window in {lm.pretrained_length}")
        return WindowPlan(sink_tokens=self.sink_tokens, recent_window=size)

    def prepare_cache(self, installation: AttentionInstallation, config, cache: Cache | None, use_cache: bool | None) -> Cache | None:
        plan: WindowPlan = installation.plan
        return sink_window_cache(config, cache, use_cache, plan.sink_tokens, plan.recent_window, installation.local_windows)
