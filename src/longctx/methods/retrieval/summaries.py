"""How a block is summarised for selection (the summary seam): one vector per (query head, block), scored against the
query by a dot product.

* `InChunkAttention` (LongHeads, Sec. 3.2): local RoPE, non-causal attention inside the chunk, the mean-pooled output
  as a query over the chunk's keys; the weighted mean key is the summary. It needs only the chunk's own queries, keys
  and values, so every chunk a forward call completes is summarised when the call starts. Scored by the query
  without RoPE.
* `RepresentativeTokens` (InfLLM, Sec. 3.2 and the release's `get_block_k`): the `repr_topk` tokens of the block that
  received the most attention while they were in the local window (summed over every query that saw them there, per
  query head); the summary is the mean of their keys without RoPE. It needs the attention the method itself paid, so
  a block is summarised once its tokens have left every later query's local window, and prefill runs query group
  by query group. Scored by the query rotated to the one distance, as attention would score those keys.

Each summary has four steps, called by the attention function: `start` (a forward call begins), `before` (a group of
queries is about to select), `scoring_distance` (how a group's query scores the summaries), `after` (the group has
attended; lse is its log-sum-exp over everything it saw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longctx.methods.retrieval.cache import LayerState
from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.rope import rotate

# float32 queries summarised at once (elements): bounds the summaries' transient memory in long prefills
SUMMARY_WORKING_SET = 2**23
# float32 attention scores recomputed at once to credit the local window's tokens (elements)
SCORE_WORKING_SET = 2**22


def chunk_summaries(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    first_chunk: int,
    window: int,
    inv_freq: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Key summary c of each chunk (LongHeads, Sec. 3.2), for every query head.

    queries [B, Hq, m*w, D], keys/values [B, Hkv, m*w, D], RoPE'd at absolute positions starting at first_chunk*w.
    Returns [B, Hq, m, D].
    """
    batch, q_heads, tokens, dim = queries.shape
    kv_heads, chunks = keys.shape[1], tokens // window
    group = q_heads // kv_heads
    starts = (first_chunk + torch.arange(chunks, device=queries.device)) * window
    # 1. positions local to the chunk (0..w-1): rotate back by the chunk's start
    q = rotate(queries.view(batch, kv_heads, group, chunks, window, dim), -starts[:, None], inv_freq)
    k = rotate(keys.view(batch, kv_heads, chunks, window, dim), -starts[:, None], inv_freq)
    v = values.view(batch, kv_heads, chunks, window, dim)
    # the heads of a GQA group share keys: stack their queries along the query axis instead of copying the keys
    q = q.transpose(2, 3).reshape(batch * kv_heads, chunks, group * window, dim)
    k, v = k.view(batch * kv_heads, chunks, window, dim), v.view(batch * kv_heads, chunks, window, dim)
    # 2. non-causal attention inside the chunk; 3. mean-pool its outputs -> u [B*Hkv, m, G, D]
    u = F.scaled_dot_product_attention(q, k, v, scale=scaling).view(-1, chunks, group, window, dim).mean(dim=-2)
    # 4. u as a query over the chunk's keys: the weighted mean key is the summary c
    weights = torch.softmax((u @ k.transpose(-1, -2)).float() * scaling, dim=-1).to(k.dtype)  # [B*Hkv, m, G, w]
    summaries = (weights @ k).view(batch, kv_heads, chunks, group, dim)
    return summaries.transpose(2, 3).reshape(batch, q_heads, chunks, dim)


@dataclass(frozen=True)
class InChunkAttention:
    """LongHeads' chunk summary (see the module docstring)."""

    name = "in_chunk_attention"
    observes = False  # summaries depend on the inputs only: a whole prefill can select at once

    def start(self, state: LayerState, query, key, value, geometry: Geometry, inv_freq, scaling: float) -> None:
        """Summarise every chunk completed by this forward call; keep the queries of the chunk still open."""
        window = geometry.window
        done = state.done_chunks
        pending = query if state.open_queries is None else torch.cat((state.open_queries, query), dim=2)
        if done * window + pending.shape[2] != key.shape[2]:
            raise RuntimeError("retrieval cache out of step with the key cache: use one cache per sequence")
        complete = key.shape[2] // window
        per_group = max(1, SUMMARY_WORKING_SET // (query.shape[0] * query.shape[1] * window * query.shape[-1]))
        new_summaries = []
        for first in range(done, complete, per_group):
            last = min(complete, first + per_group)
            span = slice(first * window, last * window)
            local = slice((first - done) * window, (last - done) * window)
            # in float32: on repetitive text chunk summaries differ little, and bf16 rounding would decide the ranking
            new_summaries.append(
                chunk_summaries(
                    pending[:, :, local].float(),
                    key[:, :, span].to(query.device, torch.float32),
                    value[:, :, span].to(query.device, torch.float32),
                    first, window, inv_freq, scaling,
                )
            )
        if new_summaries:
            previous = [] if state.keys is None else [state.keys]
            state.keys = torch.cat(previous + new_summaries, dim=2)
        # a copy: a view would keep this forward call's whole query tensor alive in every layer's state
        state.open_queries = pending[:, :, (complete - done) * window :].clone()

    def before(self, state: LayerState, key, processed: int, geometry: Geometry, inv_freq, device) -> None:
        """Nothing to do: every chunk was summarised when the call started."""

    def scoring_distance(self, geometry: Geometry) -> int | None:
        """The summaries are scored by the query without RoPE."""
        return None

    def after(self, state: LayerState, query, key, lse, q_start: int, geometry: Geometry, inv_freq, scaling: float) -> None:
        """Nothing to do: the summaries do not depend on the attention paid."""


@dataclass(frozen=True)
class RepresentativeTokens:
    """InfLLM's memory-block summary: the mean key (without RoPE) of the block's `repr_topk` most attended tokens."""

    repr_topk: int
    name = "representative_tokens"
    observes = True  # summaries depend on the attention paid: prefill selects group by group

    def start(self, state: LayerState, query, key, value, geometry: Geometry, inv_freq, scaling: float) -> None:
        """Open a score of 0 for every token this call brings."""
        batch, q_heads, q_len, _ = query.shape
        fresh = torch.zeros(batch, q_heads, q_len, dtype=torch.promote_types(query.dtype, torch.float32), device=query.device)
        state.pending_scores = fresh if state.pending_scores is None else torch.cat((state.pending_scores, fresh), dim=2)
        if state.done_chunks * geometry.window + state.pending_scores.shape[2] != key.shape[2]:
            raise RuntimeError("retrieval cache out of step with the key cache: use one cache per sequence")

    def before(
        self, state: LayerState, key: torch.Tensor, processed: int, geometry: Geometry, inv_freq: torch.Tensor, device
    ) -> None:
        """Summarise the blocks whose tokens every query up to `processed` has finished crediting: a token leaves the
        last local window that holds it `local` tokens after it (blocks = first_recent(processed), as the release's
        `append_global` forms a block once `n_local` tokens follow it)."""
        window, done = geometry.window, state.done_chunks
        formed = geometry.first_recent(processed)
        if formed <= done:
            return
        batch, q_heads = state.pending_scores.shape[:2]
        kv_heads = key.shape[1]
        new = formed - done
        scores = state.pending_scores[:, :, : new * window].view(batch, q_heads, new, window)
        top = scores.topk(min(self.repr_topk, window), dim=-1).indices  # [B, Hq, new, r]
        positions = (done + torch.arange(new, device=top.device))[:, None] * window + top
        kv_head = torch.arange(q_heads, device=key.device) // (q_heads // kv_heads)
        flat = positions.flatten(2).to(key.device)  # [B, Hq, new * r]
        picked = key[torch.arange(batch, device=key.device)[:, None, None], kv_head[None, :, None], flat]
        raw = rotate(picked.to(device, torch.promote_types(key.dtype, torch.float32)), -flat.to(device), inv_freq)
        summaries = raw.view(batch, q_heads, new, -1, key.shape[-1]).mean(dim=-2)
        state.keys = summaries if state.keys is None else torch.cat((state.keys, summaries), dim=2)
        state.pending_scores = state.pending_scores[:, :, new * window :]

    def scoring_distance(self, geometry: Geometry) -> int | None:
        """The release scores memory blocks with the query rotated to position n_local - 1 against keys at 0: the
        logit attention would give the representative keys at the one distance."""
        return geometry.local - 1

    def after(
        self, state: LayerState, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, q_start: int,
        geometry: Geometry, inv_freq: torch.Tensor, scaling: float,
    ) -> None:
        """Credit every key in a query's local window (distance < local) with the probability the query gave it:
        exp(q . k * scale - lse), lse taken over everything the query attended to (the release's merged softmax)."""
        batch, q_heads, q_len, dim = query.shape
        kv_heads = key.shape[1]
        group = q_heads // kv_heads
        local = geometry.local
        offset = state.done_chunks * geometry.window  # pending_scores[..., 0] is this position
        rows = max(1, SCORE_WORKING_SET // (batch * q_heads * (local + q_len)))
        precision = torch.promote_types(query.dtype, torch.float32)
        for first in range(0, q_len, rows):
            last = min(q_len, first + rows)
            lo, hi = max(offset, q_start + first - local + 1), q_start + last
            k = key[:, :, lo:hi].to(query.device, precision).reshape(batch * kv_heads, hi - lo, dim)
            q = (query[:, :, first:last].to(precision) * scaling).reshape(batch * kv_heads, group * (last - first), dim)
            distance = (q_start + torch.arange(first, last, device=q.device))[:, None] - torch.arange(lo, hi, device=q.device)
            window = torch.zeros(distance.shape, dtype=precision, device=q.device)
            window.masked_fill_((distance < 0) | (distance >= local), float("-inf"))
            # exp(q . k * scale - lse) in one matrix product with the bias added, then in place
            bias = window - lse[:, :, first:last].to(precision).reshape(batch * kv_heads, group, last - first, 1)
            probs = torch.baddbmm(bias.view(batch * kv_heads, group * (last - first), hi - lo), q, k.transpose(1, 2)).exp_()
            credit = probs.view(batch, q_heads, last - first, hi - lo).sum(dim=2)
            state.pending_scores[:, :, lo - offset : hi - offset] += credit.to(state.pending_scores.dtype)
