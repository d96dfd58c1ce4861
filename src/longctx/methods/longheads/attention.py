"""LongHeads attention (Lu et al. 2024) as a transformers attention function.

transformers hands us, per layer, queries [batch, q_heads, q_len, head_dim] and the whole cache's keys/values
[batch, kv_heads, kv_len, head_dim], all already RoPE-rotated at their absolute positions. For every query past
`begin_selective_length`, each query head scores the completed chunks with its un-rotated query against the chunk
summaries, keeps the first chunk, the previous and the current chunk plus the top-scoring others (K = A / w slots),
lays them side by side and attends to them with remapped positions. Remapping moves a gathered chunk by a multiple
of w; since RoPE scores depend only on the rotation between query and key, the query is rotated once per slot
instead of every gathered key, and no distance reaches A = atten_length.

Behaviour we follow where the reference release is inconsistent: in prefill and decoding alike the forced chunks
are (first, previous, current) and the query attends to its own key, as in ordinary causal attention. Prefill and
decoding then give the same output for the same position (tests/test_longheads.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longctx.methods.base import causal_attention
from longctx.methods.longheads.cache import LayerSummaries, LongHeadsCache
from longctx.methods.rope import rotate


@dataclass(frozen=True)
class Geometry:
    """The fixed numbers of one LongHeads configuration."""

    window: int  # w, chunk length
    slots: int  # K = atten_length / w, chunks one query attends to
    begin: int  # B, first position that uses selection
    block: int  # queries sharing one selection in prefill (1 = per token)
    exact_tail: int  # last prefill queries that always select per token
    gather_budget: int  # key vectors gathered at once; bounds the working memory of long prefills


def chunk_summaries(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    first_chunk: int,
    window: int,
    inv_freq: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Key summary c of each chunk (paper, Sec. 3.2), for every query head.

    queries [B, Hq, m*w, D], keys/values [B, Hkv, m*w, D], RoPE'd at absolute positions starting at first_chunk*w.
    Returns [B, Hq, m, D].
    """
    batch, q_heads, tokens, dim = queries.shape
    kv_heads, chunks = keys.shape[1], tokens // window
    group = q_heads // kv_heads
    starts = (first_chunk + torch.arange(chunks, device=queries.device)) * window
    # 1. positions local to the chunk (0..w-1): rotate back by the chunk's start
    q = rotate(queries.view(batch, q_heads, chunks, window, dim), -starts[:, None], inv_freq)
    k = rotate(keys.view(batch, kv_heads, chunks, window, dim), -starts[:, None], inv_freq)
    v = values.view(batch, kv_heads, chunks, window, dim)
    k = k.repeat_interleave(group, dim=1)  # [B, Hq, m, w, D]
    v = v.repeat_interleave(group, dim=1)
    # 2. non-causal attention inside the chunk; 3. mean-pool its outputs -> u [B, Hq, m, 1, D]
    u = F.scaled_dot_product_attention(q, k, v, scale=scaling).mean(dim=-2, keepdim=True)
    # 4. u as a query over the chunk's keys: the weighted mean key is the summary c
    weights = torch.softmax((u @ k.transpose(-1, -2)).float() * scaling, dim=-1).to(k.dtype)  # [B, Hq, m, 1, w]
    return (weights @ k).squeeze(-2)


def extend_summaries(
    state: LayerSummaries,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    geometry: Geometry,
    inv_freq: torch.Tensor,
    scaling: float,
) -> None:
    """Summarise every chunk completed by this forward call; keep the queries of the chunk still open."""
    window = geometry.window
    done = state.done_chunks
    pending = query if state.open_queries is None else torch.cat((state.open_queries, query), dim=2)
    if done * window + pending.shape[2] != key.shape[2]:
        raise RuntimeError("LongHeads cache out of step with the key cache: use one LongHeadsCache per sequence")
    complete = key.shape[2] // window
    # bound the in-chunk attention scores [B, Hq, m, w, w] to gather_budget * head_dim elements
    per_group = max(1, geometry.gather_budget * query.shape[-1] // (query.shape[0] * query.shape[1] * window * window))
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
    state.open_queries = pending[:, :, (complete - done) * window :]


def select_chunks(
    raw_queries: torch.Tensor, summaries: torch.Tensor, current_chunk: torch.Tensor, slots: int
) -> torch.Tensor:
    """Chunk indices each head attends to, in original order.

    raw_queries [B, Hq, n, D] (un-rotated, one per query or per block), summaries [B, Hq, done, D], both float32,
    current_chunk [n] (chunk holding the query). Returns [B, Hq, n, slots]: first chunk, the top (slots - 3)
    middle chunks by q . c, previous chunk, current chunk.
    """
    scores = torch.einsum("bhnd,bhcd->bhnc", raw_queries, summaries)
    chunk_ids = torch.arange(summaries.shape[2], device=scores.device)
    middle = (chunk_ids[None, :] >= 1) & (chunk_ids[None, :] <= current_chunk[:, None] - 2)  # [n, done]
    scores = scores.masked_fill(~middle, float("-inf"))
    top = scores.topk(slots - 3, dim=-1).indices.sort(dim=-1).values
    shape = top.shape[:-1] + (1,)
    current = current_chunk.view(1, 1, -1, 1).expand(shape)
    return torch.cat((torch.zeros(shape, dtype=top.dtype, device=top.device), top, current - 1, current), dim=-1)


def gather_chunks(cache: torch.Tensor, chosen: torch.Tensor, kv_head: torch.Tensor, window: int) -> torch.Tensor:
    """Whole chunks of `cache` [B, Hkv, N, D] picked by `chosen` [B, Hq, G, K]: [B, Hq, G, K, w, D].

    Each pick copies w * D contiguous values. The chunk view never copies the cache, which matters in decoding,
    where the cache is long and the picks are few. Only the last slot (the current chunk) can be the unfinished last
    chunk; its missing tail is zeros, which the causal mask hides.
    """
    batch, kv_heads, length, dim = cache.shape
    complete = length // window
    chunks = cache[:, :, : complete * window].view(batch * kv_heads, complete, window * dim)
    chosen = chosen.to(cache.device)
    batch_index = torch.arange(batch, device=cache.device).view(batch, 1, 1, 1)
    picked = chunks[batch_index * kv_heads + kv_head, chosen.clamp(max=complete - 1)].view(*chosen.shape, window, dim)
    if length > complete * window:
        tail = F.pad(cache[:, :, complete * window :], (0, 0, 0, (complete + 1) * window - length))  # [B, Hkv, w, D]
        tail = tail[batch_index[..., 0, 0], kv_head[..., 0, 0]][:, :, None]  # [B, Hq, 1, w, D]
        in_tail = (chosen[..., -1] == complete)[..., None, None]
        picked[..., -1, :, :] = torch.where(in_tail, tail, picked[..., -1, :, :])
    return picked


def selective_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    summaries: torch.Tensor,
    q_start: int,
    block: int,
    geometry: Geometry,
    inv_freq: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LongHeads attention for queries at positions q_start.. (all past `begin`), one selection per block.

    query [B, Hq, L, D]; keys/values [B, Hkv, N, D] (device or host memory); q_start % block == 0.
    Returns the output [B, Hq, L, D] and the chunks chosen for the last query [B, Hq, K].
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads = keys.shape[1]
    window, slots, device = geometry.window, geometry.slots, query.device
    blocks = -(-q_len // block)
    padded = blocks * block

    q = F.pad(query, (0, 0, 0, padded - q_len)).view(batch, q_heads, blocks, block, dim)
    positions = q_start + torch.arange(padded, device=device).view(blocks, block)
    valid = (positions < q_start + q_len).float()
    current_chunk = positions[:, 0] // window  # [blocks]; a block never straddles chunks (block divides w)
    # selection uses queries WITHOUT RoPE; a block's score is the mean of its queries' scores
    raw = rotate(q.float(), -positions, inv_freq)
    raw_mean = (raw * valid[..., None]).sum(dim=-2) / valid.sum(dim=-1)[:, None]
    chosen = select_chunks(raw_mean, summaries, current_chunk, slots)  # [B, Hq, blocks, K]

    # remapping: slot i holds positions i*w..; the query keeps its place relative to the last slot, so a key from
    # chunk c in slot i moves (j - c - (K - 1 - i)) * w positions closer to a query in chunk j. RoPE scores depend
    # only on q.R(shift)k = R(-shift)q.k, so each query is turned once per slot instead of turning every key gathered.
    slot = torch.arange(slots, device=device)
    shift = ((current_chunk[None, None, :, None] - chosen) - (slots - 1 - slot)) * window  # [B, Hq, blocks, K]
    # causal inside the current chunk (last slot): its token t is visible to a query t' tokens into that chunk if t <= t'
    into_chunk = positions - current_chunk[:, None] * window
    hidden_in_current = torch.arange(window, device=device) > into_chunk[..., None]  # [blocks, block, w]

    kv_head = (torch.arange(q_heads, device=keys.device) // (q_heads // kv_heads)).view(1, q_heads, 1, 1)
    per_group = max(1, geometry.gather_budget // (batch * q_heads * slots * window))
    out = torch.empty_like(q)
    for first in range(0, blocks, per_group):
        group = slice(first, min(blocks, first + per_group))
        # [B, Hq, G, K, w, D]; with cpu_offload only these chunks cross to the accelerator
        k_sel = gather_chunks(keys, chosen[:, :, group], kv_head, window).to(device, non_blocking=True)
        v_sel = gather_chunks(values, chosen[:, :, group], kv_head, window).to(device, non_blocking=True)
        q_slots = rotate(q[:, :, group, :, None, :], -shift[:, :, group, None, :], inv_freq) * scaling
        scores = torch.einsum("bhgqkd,bhgkwd->bhgqkw", q_slots, k_sel)  # [B, Hq, G, block, K, w]
        scores[..., -1, :].masked_fill_(hidden_in_current[group], float("-inf"))
        probs = torch.softmax(scores.flatten(-2), dim=-1, dtype=torch.float32).to(v_sel.dtype)
        out[:, :, group] = probs @ v_sel.flatten(3, 4)
    return out.view(batch, q_heads, padded, dim)[:, :, :q_len], chosen[:, :, -1]


def selective_segments(start: int, end: int, kv_len: int, geometry: Geometry, q_len: int) -> list[tuple[int, int, int]]:
    """Split selective query positions [start, end) into (start, end, block) runs.

    Block selection covers the bulk of a prefill; decoding steps, an unaligned head and the last `exact_tail`
    prefill queries (the ones whose output becomes the answer) select per token.
    """
    block = geometry.block if q_len > 1 else 1
    if block == 1:
        return [(start, end, 1)]
    aligned = min(end, -(-start // block) * block)
    tail = min(end, max(aligned, (kv_len - geometry.exact_tail) // block * block))
    runs = [(start, aligned, 1), (aligned, tail, block), (tail, end, 1)]
    return [run for run in runs if run[1] > run[0]]


def longheads_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered with transformers' `AttentionInterface` under the name "longheads"."""
    method = module.longctx_method
    cache: LongHeadsCache = method.active_cache
    geometry: Geometry = method.geometry
    inv_freq = module.longctx_inv_freq  # this layer's RoPE (layer types may differ, e.g. Gemma 3)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch, q_heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    q_start = kv_len - q_len

    extend_summaries(cache.layer_summaries(module.layer_idx), query, key, value, geometry, inv_freq, scaling)
    out = torch.empty_like(query)
    num_full = min(max(geometry.begin - q_start, 0), q_len)
    if num_full:
        visible = min(kv_len, geometry.begin)
        out[:, :, :num_full] = causal_attention(
            query[:, :, :num_full], key[:, :, :visible].to(query.device), value[:, :, :visible].to(query.device),
            q_start, scaling,
        )
    chosen_last = None
    summaries = cache.summaries[module.layer_idx].keys
    for start, end, block in selective_segments(q_start + num_full, kv_len, kv_len, geometry, q_len):
        rows = slice(start - q_start, end - q_start)
        out[:, :, rows], chosen_last = selective_attention(
            query[:, :, rows], key, value, summaries, start, block, geometry, inv_freq, scaling
        )
    if cache.trace is not None:
        cache.trace.num_chunks = -(-kv_len // geometry.window)
        if chosen_last is not None:
            if not cache.trace.steps or module.layer_idx in cache.trace.steps[-1]:  # a new forward call
                cache.trace.steps.append({})  # (not keyed on layer 0: on Gemma 3 the first layers are local, left alone)
            cache.trace.steps[-1][module.layer_idx] = chosen_last[0].cpu()
    return out.transpose(1, 2).contiguous(), None
