"""LongHeads attention (Lu et al. 2024) as a transformers attention function.

transformers hands us, per layer, queries [batch, q_heads, q_len, head_dim] and the whole cache's keys/values
[batch, kv_heads, kv_len, head_dim], all already RoPE-rotated at their absolute positions. For every query past
`begin_selective_length`, each query head scores the completed chunks with its un-rotated query against the chunk
summaries, keeps the first chunk, the previous and the current chunk plus the top-scoring others (K = A / w slots),
lays them side by side and attends to them with remapped positions: slot i holds positions i*w.., the query sits in
the last slot, so no distance reaches A = atten_length.

Selection is one piece of code; attending to the chosen chunks has three interchangeable kernels:
- "triton" (GPU): one fused kernel, triton_kernel.py; chunks are read straight from the cache.
- "torch" (CPU, stock torch): each chunk's keys are rotated once per slot for the whole layer, then every block of
  queries gathers its slots with index_select into a reused buffer and runs one SDPA call with a float mask.
- "reference": the plain formulation (gather, rotate the query per slot, einsum, softmax); the tests' yardstick.
"auto" picks triton on CUDA when Triton is importable, else torch. All three give the same output up to rounding.

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
from longctx.methods.longheads.triton_kernel import (
    triton_available,
    triton_block_selection,
    triton_selective_attention,
    triton_token_attention,
)
from longctx.methods.rope import rotate

KERNELS = ("auto", "triton", "torch", "reference")
# the torch kernel's gathered keys and values stay within this many elements: a few tens of MB, cache-resident
TORCH_WORKING_SET = 2**22
# float32 queries summarised at once (elements): bounds the summaries' transient memory in long prefills
SUMMARY_WORKING_SET = 2**23
# queries selected and attended at once: bounds the float32 selection state of a long prefill
QUERY_PIECE = 32768
# the torch kernel serves runs of at least this many queries (block or per-token); shorter ones use the reference
SLOT_KEYS_MIN_QUERIES = 16


@dataclass(frozen=True)
class Geometry:
    """The fixed numbers of one LongHeads configuration."""

    window: int  # w, chunk length
    slots: int  # K = atten_length / w, chunks one query attends to
    begin: int  # B, first position that uses selection
    block: int  # queries sharing one selection in prefill (1 = per token)
    exact_tail: int  # last prefill queries that always select per token
    gather_budget: int  # key vectors gathered at once by the reference kernel; bounds its working memory


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


def block_selection(
    query: torch.Tensor, summaries: torch.Tensor, q_start: int, block: int, geometry: Geometry, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Chunks chosen for each block of `block` queries [B, Hq, L, D] at positions q_start..: [B, Hq, blocks, K].

    Selection uses queries WITHOUT RoPE; a block's score is the mean of its queries' scores.
    """
    batch, q_heads, q_len, dim = query.shape
    blocks = -(-q_len // block)
    positions = q_start + torch.arange(blocks * block, device=query.device).view(blocks, block)
    valid = (positions < q_start + q_len).float()
    raw = rotate(F.pad(query, (0, 0, 0, blocks * block - q_len)).view(batch, q_heads, blocks, block, dim).float(),
                 -positions, inv_freq)
    raw_mean = (raw * valid[..., None]).sum(dim=-2) / valid.sum(dim=-1)[:, None]
    current_chunk = positions[:, 0] // geometry.window  # a block never straddles chunks (block divides w)
    return select_chunks(raw_mean, summaries, current_chunk, geometry.slots)


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


def _block_layout(q_start: int, q_len: int, block: int, window: int, device: torch.device):
    """Positions [blocks, block] of padded query blocks, their chunk [blocks], and the causal mask of the last slot:
    token t of the current chunk is hidden from a query t' tokens into it when t > t' ([blocks, block, w])."""
    blocks = -(-q_len // block)
    positions = q_start + torch.arange(blocks * block, device=device).view(blocks, block)
    current_chunk = positions[:, 0] // window
    into_chunk = positions - current_chunk[:, None] * window
    hidden_in_current = torch.arange(window, device=device) > into_chunk[..., None]
    return positions, current_chunk, hidden_in_current


def attend_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor,
    q_start: int, block: int, geometry: Geometry, inv_freq: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """The plain formulation: gather the chosen chunks, rotate the query per slot, einsum + softmax. [B, Hq, L, D]

    keys/values may be in host memory (cpu_offload): only the gathered chunks cross to the query's device.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads = keys.shape[1]
    window, slots, device = geometry.window, geometry.slots, query.device
    positions, current_chunk, hidden_in_current = _block_layout(q_start, q_len, block, window, device)
    blocks = positions.shape[0]
    q = F.pad(query, (0, 0, 0, blocks * block - q_len)).view(batch, q_heads, blocks, block, dim)
    # a key from chunk c in slot i moves (j - c - (K - 1 - i)) * w positions closer to a query in chunk j; RoPE scores
    # depend only on q.R(shift)k = R(-shift)q.k, so each query is turned once per slot instead of every key gathered
    slot = torch.arange(slots, device=device)
    shift = ((current_chunk[None, None, :, None] - chosen) - (slots - 1 - slot)) * window  # [B, Hq, blocks, K]
    kv_head = (torch.arange(q_heads, device=keys.device) // (q_heads // kv_heads)).view(1, q_heads, 1, 1)
    per_group = max(1, geometry.gather_budget // (batch * q_heads * slots * window))
    out = torch.empty_like(q)
    for first in range(0, blocks, per_group):
        group = slice(first, min(blocks, first + per_group))
        k_sel = gather_chunks(keys, chosen[:, :, group], kv_head, window).to(device, non_blocking=True)
        v_sel = gather_chunks(values, chosen[:, :, group], kv_head, window).to(device, non_blocking=True)
        q_slots = rotate(q[:, :, group, :, None, :], -shift[:, :, group, None, :], inv_freq) * scaling
        scores = torch.einsum("bhgqkd,bhgkwd->bhgqkw", q_slots, k_sel)  # [B, Hq, G, block, K, w]
        scores[..., -1, :].masked_fill_(hidden_in_current[group], float("-inf"))
        probs = torch.softmax(scores.flatten(-2), dim=-1, dtype=torch.float32).to(v_sel.dtype)
        out[:, :, group] = probs @ v_sel.flatten(3, 4)
    return out.view(batch, q_heads, blocks * block, dim)[:, :, :q_len]


def attend_slot_keys(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor,
    q_start: int, block: int, geometry: Geometry, inv_freq: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """Stock-torch kernel for block selection: [B, Hq, L, D].

    Slot i holds positions i*w.., whichever chunk lands there, so the keys of chunk c in slot i are the cache's keys
    rotated by (i - c) * w: computed once per slot for the whole layer (K rotations of the cache instead of one per
    pick). The query then sits at (K - 1 - j) * w from its true position for every slot, one rotation per query, and
    each block is one dense SDPA call over its K * w gathered keys.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    window, slots, device = geometry.window, geometry.slots, query.device
    chunks = -(-kv_len // window)
    positions, current_chunk, hidden_in_current = _block_layout(q_start, q_len, block, window, device)
    blocks = positions.shape[0]

    pad = (0, 0, 0, chunks * window - kv_len)
    chunked_keys = F.pad(keys, pad).view(batch, kv_heads, chunks, window, dim)
    chunk_start = torch.arange(chunks, device=device)[:, None] * window
    slot_keys = torch.stack([rotate(chunked_keys, slot * window - chunk_start, inv_freq) for slot in range(slots)])
    slot_keys = slot_keys.view(slots * batch * kv_heads * chunks, window * dim)  # row (i, b, kv_head, c)
    chunk_values = F.pad(values, pad).reshape(batch * kv_heads * chunks, window * dim)  # row (b, kv_head, c)

    kv_head = torch.arange(q_heads, device=device) // (q_heads // kv_heads)
    value_rows = (torch.arange(batch, device=device)[:, None] * kv_heads + kv_head) * chunks  # [B, Hq]
    value_rows = value_rows[:, :, None, None] + chosen  # [B, Hq, blocks, K]
    key_rows = value_rows + torch.arange(slots, device=device) * (batch * kv_heads * chunks)

    q = F.pad(query, (0, 0, 0, blocks * block - q_len)).view(batch, q_heads, blocks, block, dim)
    q = rotate(q, ((slots - 1 - current_chunk) * window)[:, None], inv_freq)
    # additive mask over [block, K * w]: only the last slot (the query's own chunk) hides anything
    mask = torch.zeros(blocks, block, slots * window, dtype=query.dtype, device=device)
    mask[..., -window:].masked_fill_(hidden_in_current, float("-inf"))

    per_group = max(1, TORCH_WORKING_SET // (batch * q_heads * slots * window * dim))
    key_buffer = torch.empty(batch * q_heads * min(per_group, blocks) * slots, window * dim, dtype=keys.dtype, device=device)
    value_buffer = torch.empty_like(key_buffer)
    out = torch.empty_like(q)
    for first in range(0, blocks, per_group):
        last = min(blocks, first + per_group)
        n = last - first
        rows = batch * q_heads * n * slots
        k_sel = torch.index_select(slot_keys, 0, key_rows[:, :, first:last].reshape(-1), out=key_buffer[:rows])
        v_sel = torch.index_select(chunk_values, 0, value_rows[:, :, first:last].reshape(-1), out=value_buffer[:rows])
        out[:, :, first:last] = F.scaled_dot_product_attention(
            q[:, :, first:last].reshape(batch * q_heads, n, block, dim),
            k_sel.view(batch * q_heads, n, slots * window, dim),
            v_sel.view(batch * q_heads, n, slots * window, dim),
            attn_mask=mask[None, first:last],  # 4-D: a 3-D mask drops SDPA off its CPU flash kernel (3.5x slower)
            scale=scaling,
        ).view(batch, q_heads, n, block, dim)
    return out.view(batch, q_heads, blocks * block, dim)[:, :, :q_len]


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


def resolve_kernel(kernel: str, device: torch.device) -> str:
    if kernel == "auto":
        return "triton" if triton_available(device) else "torch"
    if kernel == "triton" and not triton_available(device):
        raise RuntimeError("longheads kernel=triton needs a CUDA device and the triton package; use kernel=auto or torch")
    return kernel


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
    kernel = resolve_kernel(method.kernel, query.device)

    extend_summaries(cache.layer_summaries(module.layer_idx), query, key, value, geometry, inv_freq, scaling)
    out = torch.empty(batch, q_len, q_heads, dim, dtype=query.dtype, device=query.device)  # the layout the model wants
    out_heads = out.transpose(1, 2)
    num_full = min(max(geometry.begin - q_start, 0), q_len)
    if num_full:
        visible = min(kv_len, geometry.begin)
        out_heads[:, :, :num_full] = causal_attention(
            query[:, :, :num_full], key[:, :, :visible].to(query.device), value[:, :, :visible].to(query.device),
            q_start, scaling,
        )
    if key.device != query.device and q_len > 1:
        # cpu_offload prefill: the layer's cache crosses once, not once per query block
        key, value = key.to(query.device, non_blocking=True), value.to(query.device, non_blocking=True)
    chosen_last = None
    summaries = cache.summaries[module.layer_idx].keys
    table = None
    if kernel == "triton" and key.device == query.device:
        table = method.shift_table(inv_freq, -(-kv_len // geometry.window) + 1, query.device)
    for start, end, block in selective_segments(q_start + num_full, kv_len, kv_len, geometry, q_len):
        for piece in range(start, end, QUERY_PIECE):
            rows = slice(piece - q_start, min(end, piece + QUERY_PIECE) - q_start)
            piece_query = query[:, :, rows]
            if table is not None and block == 1:
                chosen = triton_token_attention(
                    piece_query, key, value, summaries, piece, geometry.window, geometry.slots, inv_freq, table, scaling,
                    out[:, rows],
                )
            elif table is not None:
                chosen = triton_block_selection(
                    piece_query, summaries, piece, block, geometry.window, geometry.slots, inv_freq
                )
                triton_selective_attention(
                    piece_query, key, value, chosen, piece, block, geometry.window, table, scaling, out[:, rows]
                )
            else:
                chosen = block_selection(piece_query, summaries, piece, block, geometry, inv_freq)
                # slot keys cost K rotations of the layer's cache: worth it for a prefill, not for one decoding step
                fast = kernel == "torch" and key.device == query.device and rows.stop - rows.start >= SLOT_KEYS_MIN_QUERIES
                attend = attend_slot_keys if fast else attend_reference
                out_heads[:, :, rows] = attend(piece_query, key, value, chosen, piece, block, geometry, inv_freq, scaling)
            chosen_last = chosen[:, :, -1]
    if cache.trace is not None:
        cache.trace.num_chunks = -(-kv_len // geometry.window)
        if chosen_last is not None:
            if not cache.trace.steps or module.layer_idx in cache.trace.steps[-1]:  # a new forward call
                cache.trace.steps.append({})  # (not keyed on layer 0: on Gemma 3 the first layers are local, left alone)
            cache.trace.steps[-1][module.layer_idx] = chosen_last[0].clone()  # to host only when read: no sync per layer
    return out, None
