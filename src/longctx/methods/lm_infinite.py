"""LM-Infinite (Han et al. 2024, NAACL, "LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language
Models"; Glaciohound/LM-Infinite).

A Lambda-shaped attention mask: a query at position t sees

* the n_local = `n_local` most recent keys, t - n_local < j <= t, at their true distance (the local branch);
* the first n_global = `n_global` tokens (the global branch), j < n_global with t - j >= n_local, all at one distance
  d_max = `d_max` (the authors rotate the query to d_max and leave those keys unrotated): the distance is capped, so
  no query sees a distance the model never trained on.

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

from longctx.methods.base import AttentionMethod, MethodError
from longctx.methods.merge import attention_part, merge, recent_parts
from longctx.methods.rope import rotate
from longctx.methods.window import sink_window_cache
from longctx.models import LoadedModel

ATTENTION_NAME = "longctx_lm_infinite"

# Queries per attention call: each needs the global keys plus a band of (block + n_local - 1) keys.
QUERY_BLOCK = 512


@dataclass(frozen=True)
class _Lambda:
    n_global: int
    n_local: int
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
    shape: _Lambda = module.longctx_method.shape
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs position_ids")
    inv_freq = module.longctx_inv_freq
    q_len, kv_len = query.shape[2], key.shape[2]
    first = int(position_ids[0, 0])
    offset = first + q_len - kv_len  # key slot of absolute position p >= n_global is p - offset (0: none evicted)
    if offset < 0 or (offset > 0 and kv_len <= shape.n_global):
        raise RuntimeError(f"{ATTENTION_NAME}: {kv_len} cached keys do not fit queries at {first}..{first + q_len - 1}")
    device = query.device
    n_global = min(shape.n_global, kv_len)
    # the global keys unrotated (at position 0), their queries at d_max: every far global key is d_max away
    global_keys = rotate(key[:, :, :n_global], -torch.arange(n_global, device=device), inv_freq)
    global_values = value[:, :, :n_global]
    out = query.new_empty(query.shape[:3] + (value.shape[-1],))
    block = min(QUERY_BLOCK, shape.n_local)
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        q = query[:, :, start:stop]
        t = torch.arange(first + start, first + stop, device=device)[:, None]
        # local branch: t - n_local < j <= t at the true distance (it reaches below n_global only while nothing is
        # evicted, offset 0, so slot = position holds there too)
        parts = recent_parts(q, key, value, first + start, shape.n_local, scaling, offset)
        # global branch: j < n_global outside the band, at distance d_max
        if first + stop - 1 - shape.n_local >= 0 and n_global:
            far = torch.arange(n_global, device=device)[None, :] <= t - shape.n_local
            global_query = rotate(q, shape.d_max - t[:, 0], inv_freq)
            parts.append(attention_part(global_query, global_keys, global_values, far, scaling))
        out[:, :, start:stop] = merge(parts)[0]
    return out.transpose(1, 2), None


@dataclass
class LMInfinite(AttentionMethod):
    """LM-Infinite (Han et al. 2024): a Lambda-shaped mask, the first `n_global` tokens plus the last `n_local`, with
    the distance to far global tokens capped at `d_max` (see the module docstring). Cost: linear in the context; the
    KV cache holds n_global + n_local - 1 tokens per layer, whatever the length. Reaches any length.

    n_global: tokens at the start every query sees (the paper's n_global = 10).
    n_local: recent tokens each query sees, itself included. None: the trained length L (the paper's L_pretrain).
    d_max: the distance of every global token outside the local window. None: n_local, as the authors' code sets it
        (both are L in the paper). A d_max far above n_local leaves a gap of distances no query sees; on the
        embedded model n_local 1024 with d_max 8192 lost a 2k passkey that d_max 1024 found.
    rope_scaling: optional PI / static NTK / YaRN underneath (see AttentionMethod).
    """

    name = "lm_infinite"
    attention_name = ATTENTION_NAME
    attention_function = staticmethod(lm_infinite_attention)
    n_global: int = 10
    n_local: int | None = None
    d_max: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_global < 0 or (self.n_local is not None and self.n_local < 1) or (self.d_max is not None and self.d_max < 0):
            raise MethodError(f"lm_infinite: need n_global >= 0, n_local >= 1 and d_max >= 0 (got {self.n_global}, {self.n_local}, {self.d_max})")

    def resolved(self, lm: LoadedModel) -> _Lambda:
        n_local = self.n_local if self.n_local is not None else lm.pretrained_length
        return _Lambda(self.n_global, n_local, self.d_max if self.d_max is not None else n_local)

    def apply(self, lm: LoadedModel) -> None:
        self.shape = self.resolved(lm)  # the attention function reads n_global, n_local and d_max here
        super().apply(lm)

    def prepare_cache(self, config, cache: Cache | None, use_cache: bool | None) -> Cache | None:
        return sink_window_cache(config, cache, use_cache, self.shape.n_global, self.shape.n_local, self.local_windows)
