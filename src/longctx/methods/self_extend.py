"""Self-Extend (Jin et al. 2024, ICML, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning").

A query at position t sees every earlier key j (quadratic in the context, like full attention), at one of two
positions:

* neighbour attention, t - j < W (W = `neighbor_window`): the true positions, so the true distance t - j;
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

from longctx.methods.base import AttentionMethod, MethodError
from longctx.methods.merge import attention_part, merge, recent_parts
from longctx.methods.rope import rotate
from longctx.models import LoadedModel

ATTENTION_NAME = "longctx_self_extend"

# Queries per block (at most W): the keys of a block's far or near region that every query sees need no mask; only
# about 3 x block keys carry one.
QUERY_BLOCK = 512


@dataclass(frozen=True)
class _Groups:
    group_size: int  # G
    neighbor_window: int  # W


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
    groups: _Groups = module.longctx_method.groups
    size, window = groups.group_size, groups.neighbor_window
    inv_freq = module.longctx_inv_freq
    q_len, kv_len = query.shape[2], key.shape[2]
    q_start = kv_len - q_len
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


@dataclass
class SelfExtend(AttentionMethod):
    """Self-Extend (Jin et al. 2024): neighbour attention at true positions within `neighbor_window`, grouped
    attention at floor-divided positions beyond it, merged per query (see the module docstring). Cost: quadratic in
    the context (every query sees every earlier key), like full attention; the KV cache is the model's own.

    group_size: G, positions per group beyond the neighbour window. None: the smallest G whose usable length
        (L - W) * G + W covers the target length (from `check_length`), the authors' advice ("try the smallest group
        size first"); at least 1.
    neighbor_window: W, the recent tokens seen at their true distance. None: a quarter of the trained length L (2048
        for an 8k model), as the authors' 1024 for Llama-2's 4k; they found 512-1536 feasible there. Must be < L.
    rope_scaling: optional PI / static NTK / YaRN underneath (see AttentionMethod).

    The input may hold at most (L - W) * G + W tokens (L x the rescaling's factor with `rope_scaling`); `check_length`
    refuses more in one line.
    """

    name = "self_extend"
    attention_name = ATTENTION_NAME
    attention_function = staticmethod(self_extend_attention)
    group_size: int | None = None
    neighbor_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.group_size is not None and self.group_size < 1) or (self.neighbor_window is not None and self.neighbor_window < 1):
            raise MethodError(f"self_extend: need group_size >= 1 and neighbor_window >= 1 (got {self.group_size}, {self.neighbor_window})")
        self._target_length: int | None = None

    def trained_span(self, lm: LoadedModel) -> int:
        """The distances the model knows: its trained length, stretched by the RoPE rescaling underneath if any."""
        return int(lm.pretrained_length * self.rope_stretch(lm))

    def resolved(self, lm: LoadedModel) -> _Groups:
        span = self.trained_span(lm)
        window = self.neighbor_window if self.neighbor_window is not None else lm.pretrained_length // 4
        if window >= span:
            raise MethodError(f"self_extend: neighbor_window ({window}) must be below the trained length ({span})")
        if self.group_size is not None:
            return _Groups(self.group_size, window)
        if self._target_length is None:
            raise MethodError("self_extend: group_size=None needs check_length(lm, target_length) first, or set group_size")
        return _Groups(max(1, math.ceil((self._target_length - window) / (span - window))), window)

    def check_length(self, lm: LoadedModel, length: int) -> None:
        super().check_length(lm, length)
        self._target_length = length
        groups, span = self.resolved(lm), self.trained_span(lm)
        usable = (span - groups.neighbor_window) * groups.group_size + groups.neighbor_window
        if length > usable:
            needed = math.ceil((length - groups.neighbor_window) / (span - groups.neighbor_window))
            raise MethodError(
                f"self_extend with group_size {groups.group_size} and neighbor_window {groups.neighbor_window} reaches"
                f" (L - W) * G + W = {usable} tokens on a model trained on {span}, not {length}: set group_size >= {needed}"
            )

    def apply(self, lm: LoadedModel) -> None:
        self.groups = self.resolved(lm)  # the attention function reads G and W here
        super().apply(lm)
