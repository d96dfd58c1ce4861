"""LM-Infinite (Han et al. 2024, NAACL, "LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language
Models"; Glaciohound/LM-Infinite).

A Lambda-shaped attention mask: a query at position t sees

* the n_local = `recent_window` most recent keys, t - n_local < j <= t, at their true distance (the local branch);
* the first n_global = `sink_tokens` tokens (the global branch), j < n_global with t - j >= n_local, all at one
  distance d_max = `d_max` (the authors rotate the query to d_max and leave those keys unrotated): the distance is
  capped, so no query sees a distance the model never trained on.

Everything else is masked out, so the cost is linear in the context and the KV cache keeps only the global tokens
and the last n_local - 1 (the sliding window's `SinkWindowCache`). Unlike StreamingLLM (window.py), whose sinks move
with the window (distances up to S + W - 1), LM-Infinite pins every global key at the same distance d_max. The two
branches run as separate attention calls merged by their log-sum-exp (merge.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from longctx.methods.base import AttentionInstallation, AttentionMethod, AttentionPlan, MethodError, attention_call
from longctx.methods.merge import attention_part, merge, recent_parts
from longctx.methods.rope import rotate
from longctx.methods.window import sink_window_cache
from longctx.models import LoadedModel

# Queries per attention call: each needs the global keys plus a band of (block + n_local - 1) keys.
QUERY_BLOCK = 512


@dataclass(frozen=True, kw_only=True)
class LambdaPlan(AttentionPlan):
    sink_tokens: int  # n_global
    recent_window: int  # n_local
    d_max: int


def lm_infinite_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as "longctx_lm_infinite" (positions in the module docstring).

    query [B, Hq, q, D] at absolute positions `position_ids`, contiguous and ending at the last key; key/value
    [B, Hkv, kv, D] are the global tokens followed by a contiguous run of tokens ending at the last query, as
    `SinkWindowCache` (or any full cache) keeps them, RoPE-rotated at their true positions.
    """
    call = attention_call(module, query, key, dropout, kwargs, sinks=module.longctx.plan.sink_tokens)
    plan: LambdaPlan = call.plan
    inv_freq, first, offset = call.inv_freq, call.first, call.offset
    q_len, kv_len = query.shape[2], key.shape[2]
    device = query.device
    n_global = min(plan.sink_tokens, kv_len)
    # the global keys unrotated (at position 0), their queries at d_max: every far global key is d_max away
    global_keys = rotate(key[:, :, :n_global], -torch.arange(n_global, device=device), inv_freq)
    global_values = value[:, :, :n_global]
    out = query.new_empty(query.shape[:3] + (value.shape[-1],))
    block = min(QUERY_BLOCK, plan.recent_window)
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        q = query[:, :, start:stop]
        t = torch.arange(first + start, first + stop, device=device)[:, None]
        # local branch: t - n_local < j <= t at the true distance (it reaches below n_global only while nothing is
        # evicted, offset 0, so slot = position holds there too)
        parts = recent_parts(q, key, value, first + start, plan.recent_window, scaling, offset)
        # global branch: j < n_global outside the band, at distance d_max
        if first + stop - 1 - plan.recent_window >= 0 and n_global:
            far = torch.arange(n_global, device=device)[None, :] <= t - plan.recent_window
            global_query = rotate(q, plan.d_max - t[:, 0], inv_freq)
            parts.append(attention_part(global_query, global_keys, global_values, far, scaling))
        out[:, :, start:stop] = merge(parts)[0]
    return out.transpose(1, 2), None


@dataclass(frozen=True)
class LMInfinite(AttentionMethod):
    """LM-Infinite (Han et al. 2024): a Lambda-shaped mask, the first `sink_tokens` tokens plus the last
    `recent_window`, with the distance to far global tokens capped at `d_max` (see the module docstring). Cost: linear
    in the context; the KV cache holds sink_tokens + recent_window - 1 tokens per layer, whatever the length. Reaches
    any length.

    sink_tokens: tokens at the start every query sees (the paper's n_global = 10).
    recent_window: recent tokens each query sees, itself included (the paper's n_local). None: the trained length L
        (the paper's L_pretrain).
    d_max: the distance of every global token outside the local window. None: recent_window, as the authors' code sets
        it (both are L in the paper). A d_max far above recent_window leaves a gap of distances no query sees.
    rope_scaling: optional PI / static NTK / YaRN underneath (see AttentionMethod).
    """

    name = "lm_infinite"
    label_params = ("sink_tokens", "recent_window", "d_max")
    renamed = {"n_global": "sink_tokens", "n_local": "recent_window"}
    attention_function = staticmethod(lm_infinite_attention)
    sink_tokens: int = 10
    recent_window: int | None = None
    d_max: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_tokens < 0 or (self.recent_window is not None and self.recent_window < 1) or (self.d_max is not None and self.d_max < 0):
            raise MethodError(f"lm_infinite: need sink_tokens >= 0, recent_window >= 1 and d_max >= 0 (got {self.sink_tokens}, {self.recent_window}, {self.d_max})")

    def resolve(self, lm: LoadedModel, max_length: int | None, trained_span: int) -> LambdaPlan:
        recent = self.recent_window if self.recent_window is not None else lm.pretrained_length
        return LambdaPlan(sink_tokens=self.sink_tokens, recent_window=recent, d_max=self.d_max if self.d_max is not None else recent)

    def prepare_cache(self, installation: AttentionInstallation, config, cache: Cache | None, use_cache: bool | None) -> Cache | None:
        plan: LambdaPlan = installation.plan
        return sink_window_cache(config, cache, use_cache, plan.sink_tokens, plan.recent_window, installation.local_windows)
