"""Dual Chunk Attention (An et al. 2024, ICML, "Training-Free Long-Context Scaling of Large Language Models";
HKUNLP/ChunkLlama).

The sequence is cut into chunks of s = `chunk_size` tokens; every key j sits at its position inside its chunk,
j mod s. A query at position t, r = t mod s into chunk c = t // s, sees every earlier key (quadratic in the context,
like full attention) at one of three query positions:

* intra-chunk, keys of chunk c: the query at r, so the distance is the true t - j (< s);
* successive-chunk, keys of chunk c - 1: the query at min(s + r, c_max) with c_max = s + w - 1 (w = `local_window`),
  so the first w queries of a chunk keep the true distance to the last keys of the previous chunk and the rest are
  capped: the local order across the chunk boundary is kept;
* inter-chunk, keys of chunks before c - 1: the query at c_max, so every distance is c_max - j mod s, in
  [w, s + w - 1].

The paper writes c_max as c - 1 for the trained length c with w = c - s; the authors' release sets s = 3/4 L - L/16
and w = L/16 (so c_max < 3/4 L), which are the defaults here. No distance reaches s + w, so s + w must not exceed the
trained length (times the factor of a RoPE rescaling underneath: ChunkLlama combines DCA with PI, NTK and YaRN).
The three parts of a query run as separate attention calls merged by their log-sum-exp (merge.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longctx.methods.base import AttentionMethod, AttentionPlan, MethodError, attention_call
from longctx.methods.merge import attention_part, merge
from longctx.methods.rope import rotate
from longctx.models import LoadedModel

# Queries per attention call (a block never spans two chunks); only the block's own keys carry a (causal) mask.
QUERY_BLOCK = 512


@dataclass(frozen=True, kw_only=True)
class ChunksPlan(AttentionPlan):
    chunk_size: int  # s
    local_window: int  # w

    @property
    def farthest(self) -> int:
        """c_max = s + w - 1: the position of the query in inter-chunk attention, and the largest distance."""
        return self.chunk_size + self.local_window - 1


def dca_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as "longctx_dca" (positions in the module docstring).

    query [B, Hq, q, D] are the last q of the keys [B, Hkv, n, D] (the whole sequence from position 0, as a full
    cache holds it), all RoPE-rotated at their true positions by the layer's frequencies `module.longctx_inv_freq`.
    """
    call = attention_call(module, query, key, dropout, kwargs)
    chunks: ChunksPlan = call.plan
    size, farthest, inv_freq, q_start = chunks.chunk_size, chunks.farthest, call.inv_freq, call.first
    q_len, kv_len = query.shape[2], key.shape[2]
    device = query.device
    if kv_len > size:  # some query sees an earlier chunk: key j moves to j mod s, once per call
        positions = torch.arange(kv_len, device=device)
        chunk_keys = rotate(key, positions % size - positions, inv_freq)
    out = query.new_empty(query.shape[:3] + (value.shape[-1],))
    start = 0
    while start < q_len:
        first = q_start + start
        chunk_start = first - first % size
        stop = min(start + QUERY_BLOCK, chunk_start + size - q_start, q_len)  # within one chunk
        q = query[:, :, start:stop]
        t = torch.arange(first, q_start + stop, device=device)
        # intra-chunk: query at t mod s, keys at j mod s: the true distance, causal (keys before the block unmasked)
        high = q_start + stop
        parts = [] if first == chunk_start else [
            attention_part(q, key[:, :, chunk_start:first], value[:, :, chunk_start:first], None, scaling)
        ]
        parts.append(attention_part(q, key[:, :, first:high], value[:, :, first:high], t[None, :] <= t[:, None], scaling))
        if chunk_start > 0:
            previous = chunk_start - size
            successive_query = rotate(q, torch.clamp(size + t % size, max=farthest) - t, inv_freq)
            if first % size >= chunks.local_window - 1:
                # every query of the block sits at c_max for the previous chunk too: one call covers both parts
                parts.append(attention_part(successive_query, chunk_keys[:, :, :chunk_start], value[:, :, :chunk_start], None, scaling))
            else:
                parts.append(
                    attention_part(
                        successive_query, chunk_keys[:, :, previous:chunk_start], value[:, :, previous:chunk_start], None, scaling
                    )
                )
                if previous > 0:
                    inter_query = rotate(q, farthest - t, inv_freq)
                    parts.append(attention_part(inter_query, chunk_keys[:, :, :previous], value[:, :, :previous], None, scaling))
        out[:, :, start:stop] = merge(parts)[0]
        start = stop
    return out.transpose(1, 2), None


@dataclass(frozen=True)
class DualChunkAttention(AttentionMethod):
    """Dual Chunk Attention (An et al. 2024): intra-, successive- and inter-chunk attention with chunk-local key
    positions, merged per query (see the module docstring). Cost: quadratic in the context (every query sees every
    earlier key), like full attention; the KV cache is the model's own. Reaches any length: no distance exceeds
    s + w - 1.

    chunk_size: s, tokens per chunk, below the trained length L. None: 3/4 L - L/16 (5632 for an 8k model), the
        authors' release (its `chunk_size` 3/4 L counts the local window in).
    local_window: w, queries at the start of a chunk that keep the true distance to the end of the previous chunk.
        None: L/16 (512 for an 8k model), the authors' release. s + w must not exceed L.
    rope_scaling: optional PI / static NTK / YaRN underneath (see AttentionMethod); then s + w may reach L times its
        factor, as ChunkLlama does with PI and NTK.
    """

    name = "dca"
    label_params = ("chunk_size", "local_window")
    attention_function = staticmethod(dca_attention)
    chunk_size: int | None = None
    local_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.chunk_size is not None and self.chunk_size < 1) or (self.local_window is not None and self.local_window < 1):
            raise MethodError(f"dca: need chunk_size >= 1 and local_window >= 1 (got {self.chunk_size}, {self.local_window})")
        if self.chunk_size is not None and self.local_window is not None and self.local_window > self.chunk_size:
            raise MethodError(f"dca: local_window ({self.local_window}) must not exceed chunk_size ({self.chunk_size})")

    def resolve(self, lm: LoadedModel, max_length: int | None, trained_span: int) -> ChunksPlan:
        trained = lm.pretrained_length
        local = self.local_window if self.local_window is not None else trained // 16
        size = self.chunk_size if self.chunk_size is not None else 3 * trained // 4 - local
        if size + local > trained_span:
            stretch = trained_span / trained
            raise MethodError(
                f"dca: chunk_size + local_window ({size} + {local}) must not exceed the trained length"
                f" ({trained}{f' x rope factor {stretch:g}' if stretch != 1 else ''}): distances would reach unseen positions"
            )
        return ChunksPlan(chunk_size=size, local_window=local)
