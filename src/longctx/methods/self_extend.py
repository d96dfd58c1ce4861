"""Self-Extend (Jin et al. 2024, ICML, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning").

A query at position t sees every earlier key j (quadratic in the context, like full attention), at one of two
positions:

* neighbour attention, t - j < W (W = `recent_window`, the paper's neighbor window): the true positions, so the
  true distance t - j;
* grouped attention, t - j >= W: key j sits at j // G (G = `group_size`) and the query at t // G + W - W // G, so the
  distance is t // G - j // G + W - W // G: floor-divided positions, shifted so that the two regions join (the
  grouped distance of the first far key is about W, as its neighbour distance would be).

Every distance stays below the trained length L as long as the input holds at most (L - W) * G + W tokens. The two
attentions are merged per query by their log-sum-exp (merge.py), which equals the paper's masked merge of the two
score matrices into one softmax; each part runs in a fused attention kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from longctx.methods.base import AttentionMethod, AttentionPlan, MethodError, attention_call
from longctx.methods.merge import attention_part, merge, recent_parts
from longctx.methods.rope import rotate
from longctx.models import LoadedModel

# Queries per block (at most W): the keys of a block's far or near region that every query sees need no mask; only
# about 3 x block keys carry one.
QUERY_BLOCK = 512


@dataclass(frozen=True, kw_only=True)
class GroupsPlan(AttentionPlan):
    group_size: int  # G
    recent_window: int  # W


def self_extend_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as "longctx_self_extend" (positions in the module docstring).

    query [B, Hq, q, D] are the last q of the keys [B, Hkv, n, D] (the whole sequence from position 0, as a full
    cache holds it), all RoPE-rotated at their true positions by the layer's frequencies `module.longctx_inv_freq`.
    """
    call = attention_call(module, query, key, dropout, kwargs)
    plan: GroupsPlan = call.plan
    size, window, inv_freq, q_start = plan.group_size, plan.recent_window, call.inv_freq, call.first
    q_len, kv_len = query.shape[2], key.shape[2]
    device = query.device
    if kv_len > window:  # some query has far keys: move every key j to j // G once per call
        positions = torch.arange(kv_len, device=device)
        grouped_keys = rotate(key, positions // size - positions, inv_freq)
    out = query.new_empty(query.shape[:3] + (value.shape[-1],))
    block = min(QUERY_BLOCK, window)
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        q = query[:, :, start:stop]
        first = q_start + start
        # neighbours: keys t - W < j <= t at their true distance
        parts = recent_parts(q, key, value, first, window, scaling)
        # groups: keys j <= t - W, key at j // G, query at t // G + W - W // G
        far_end = q_start + stop - window  # keys [0, far_end) are far from the block's last query
        if far_end > 0:
            t = torch.arange(first, q_start + stop, device=device)
            grouped_query = rotate(q, t // size + window - window // size - t, inv_freq)
            shared = max(0, first - window)  # keys [0, shared) are far from every query of the block
            if shared:
                parts.append(attention_part(grouped_query, grouped_keys[:, :, :shared], value[:, :, :shared], None, scaling))
            j = torch.arange(shared, far_end, device=device)
            parts.append(attention_part(grouped_query, grouped_keys[:, :, shared:far_end], value[:, :, shared:far_end],
                                            j[None, :] <= t[:, None] - window, scaling))
        out[:, :, start:stop] = merge(parts)[0]
    return out.transpose(1, 2), None


@dataclass(frozen=True)
class SelfExtend(AttentionMethod):
    """Self-Extend (Jin et al. 2024): neighbour attention at true positions within `recent_window`, grouped
    attention at floor-divided positions beyond it, merged per query (see the module docstring). Cost: quadratic in
    the context (every query sees every earlier key), like full attention; the KV cache is the model's own.

    group_size: G, positions per group beyond the neighbour window. None: the smallest G whose usable length
        (L - W) * G + W covers the target length (`max_length`; the trained length when none is given), the authors'
        advice ("try the smallest group size first"); at least 1.
    recent_window: W, the paper's neighbor window: the recent tokens seen at their true distance. None: a quarter of
        the trained length L (2048 for an 8k model), as the authors' 1024 for Llama-2's 4k; they found 512-1536
        feasible there. Must be < L.
    rope_scaling: optional PI / static NTK / YaRN underneath (see AttentionMethod).

    The input may hold at most (L - W) * G + W tokens (L x the rescaling's factor with `rope_scaling`); planning for a
    longer `max_length` is refused in one line, and so is a longer input than the plan's.
    """

    name = "self_extend"
    label_params = ("group_size", "recent_window")
    renamed = {"neighbor_window": "recent_window"}
    attention_function = staticmethod(self_extend_attention)
    group_size: int | None = None
    recent_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.group_size is not None and self.group_size < 1) or (self.recent_window is not None and self.recent_window < 1):
            raise MethodError(f"self_extend: need group_size >= 1 and recent_window >= 1 (got {self.group_size}, {self.recent_window})")

    def resolve(self, lm: LoadedModel, max_length: int | None, trained_span: int) -> GroupsPlan:
        span = trained_span
        window = self.recent_window if self.recent_window is not None else lm.pretrained_length // 4
        if window >= span:
            raise MethodError(f"self_extend: recent_window ({window}) must be below the trained length ({span})")
        length = max_length if max_length is not None else span
        group = self.group_size if self.group_size is not None else max(1, math.ceil((length - window) / (span - window)))
        usable = (span - window) * group + window
        if length > usable:
            needed = math.ceil((length - window) / (span - window))
            raise MethodError(
                f"self_extend with group_size {group} and recent_window {window} reaches (L - W) * G + W = {usable}"
                f" tokens on a model trained on {span}, not {length}: set group_size >= {needed}"
            )
        return GroupsPlan(reach=usable, group_size=group, recent_window=window)
