"""Attention over the chosen blocks and the recent span, as laid out by a `Geometry` (see geometry.py): two of the
three interchangeable kernels (the third, "triton", is triton_kernel.py). Each takes the queries of one run
[B, Hq, L, D] at positions q_start.., the layer's whole cache [B, Hkv, N, D] (RoPE'd at absolute positions, as
transformers hands it over; possibly in host memory), and `chosen` [B, units, groups, slots]: the far blocks (sink,
then retrieved) of every group of `block` queries, for each selection unit (query head, key/value head or layer;
see selection.py). No slots means a dense group: every earlier token is in its recent span. Both return the output
[B, Hq, L, D] and its log-sum-exp [B, Hq, L] (float32), which InfLLM's summaries need.

* `attend_reference`: the plain formulation, the tests' yardstick: gather every attended key, turn the query (and for
  the one-distance layout the keys) so that each score sees the key at its assigned distance, einsum, softmax.
* `attend_torch` (the CPU fast path, stock torch): the same softmax in parts merged by log-sum-exp (merge.py), each a
  fused attention call: the recent span read in place from the cache (overlapping windows, one per run of queries
  sharing it), the far blocks gathered into a small buffer, a few MB per batch of query groups so that nothing grows
  with the context but the cache itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx.methods.merge import attention_with_lse, merge_attention
from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.rope import rotate

# elements of far keys (and as many values) the torch kernel gathers at once: a few MB that stay in the CPU's
# caches and in the allocator's free lists (a fresh allocation above 32 MB costs its page faults every time)
TORCH_WORKING_SET = 2**22


def gather_blocks(cache: torch.Tensor, chosen: torch.Tensor, kv_head: torch.Tensor, window: int) -> torch.Tensor:
    """Whole blocks of `cache` [B, Hkv, N, D] picked by `chosen` [B, H, G, S] for heads that read key/value head
    `kv_head` [H]: [B, H, G, S, w, D] on the cache's device. Each pick copies w * D contiguous values; the block view
    never copies the cache. Only complete blocks can be picked."""
    batch, kv_heads, length, dim = cache.shape
    complete = length // window
    blocks = cache[:, :, : complete * window].view(batch * kv_heads, complete, window * dim)
    rows = (torch.arange(batch, device=cache.device)[:, None] * kv_heads + kv_head.to(cache.device))[:, :, None, None]
    return blocks[rows, chosen.to(cache.device)].view(*chosen.shape, window, dim)


def _heads_of(chosen: torch.Tensor, q_heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head: its selection unit's chosen blocks [B, Hq, G, S] and its key/value head [Hq]."""
    units = chosen.shape[1]
    unit = torch.arange(q_heads, device=chosen.device) // (q_heads // units)
    return chosen[:, unit], torch.arange(q_heads) // (q_heads // kv_heads)


def attend_reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor,
    q_start: int, block: int, geometry: Geometry, inv_freq: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain formulation (see the module docstring): (out [B, Hq, L, D], lse [B, Hq, L]).

    keys/values may be in host memory (cpu_offload): only the gathered keys cross to the query's device.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_len, window, device = keys.shape[2], geometry.window, query.device
    slots = chosen.shape[-1]
    groups = -(-q_len // block)
    positions = q_start + torch.arange(groups * block, device=device).view(groups, block)
    first = (torch.zeros(groups, dtype=torch.long, device=device) if slots == 0
             else torch.clamp((positions[:, 0] - geometry.local) // window, min=0))
    recent = int((positions[:, -1] - first * window).max()) + 1  # the longest recent span, padded for the others
    q = F.pad(query, (0, 0, 0, groups * block - q_len)).view(batch, q_heads, groups, block, dim)
    chosen, kv_head = _heads_of(chosen, q_heads, keys.shape[1])
    per_group = max(1, geometry.gather_budget // (batch * q_heads * (slots * window + 2 * recent)))
    out = torch.empty_like(q)
    lse = torch.empty(batch, q_heads, groups, block, dtype=torch.float32, device=device)
    for start in range(0, groups, per_group):
        group = slice(start, min(groups, start + per_group))
        pos = positions[group]  # [n, b]
        key_pos = first[group, None] * window + torch.arange(recent, device=device)  # [n, r]: the recent span
        distance = pos[:, :, None] - key_pos[:, None, :]  # [n, b, r]
        in_cache = key_pos.clamp(max=kv_len - 1).to(keys.device)
        k_recent = keys[:, :, in_cache][:, kv_head].to(device)  # [B, Hq, n, r, D]
        v_recent = values[:, :, in_cache][:, kv_head].to(device)
        q_group = q[:, :, group]
        scores, gathered_values = [], []
        if slots:
            k_far = gather_blocks(keys, chosen[:, :, group], kv_head, window).to(device)  # [B, Hq, n, S, w, D]
            v_far = gather_blocks(values, chosen[:, :, group], kv_head, window).to(device)
            if geometry.one_distance is None:
                # block c in slot i moves n = m - c - (S - i) blocks toward the query; a RoPE score depends only on the
                # rotation between query and key, so the query is turned back once per slot instead of every key
                shift = (first[group, None] - chosen[:, :, group] - (slots - torch.arange(slots, device=device))) * window
                q_slots = rotate(q_group[:, :, :, :, None], -shift[:, :, :, None, :], inv_freq)  # [B, Hq, n, b, S, D]
                far = torch.einsum("bhgqsd,bhgswd->bhgqsw", q_slots * scaling, k_far)
            else:
                key_positions = chosen[:, :, group, :, None] * window + torch.arange(window, device=device)
                far = torch.einsum("bhgqd,bhgswd->bhgqsw", _at_one_distance(q_group, pos, geometry, inv_freq) * scaling,
                                   rotate(k_far, -key_positions, inv_freq))
            scores.append(far.flatten(-2))
            gathered_values.append(v_far.flatten(3, 4))
        near = (distance >= 0) & (key_pos < kv_len)[:, None, :]
        if geometry.one_distance is not None:
            near = near & (distance < geometry.local)
        scores.append(torch.einsum("bhgqd,bhgrd->bhgqr", q_group * scaling, k_recent).masked_fill(~near, float("-inf")))
        gathered_values.append(v_recent)
        if geometry.one_distance is not None:  # recent tokens beyond the local window: at the one distance too
            far_recent = (distance >= geometry.local) & (key_pos < kv_len)[:, None, :]
            scores.append(torch.einsum("bhgqd,bhgrd->bhgqr", _at_one_distance(q_group, pos, geometry, inv_freq) * scaling,
                                       rotate(k_recent, -key_pos, inv_freq)).masked_fill(~far_recent, float("-inf")))
            gathered_values.append(v_recent)
        scores = torch.cat(scores, dim=-1)
        lse[:, :, group] = scores.float().logsumexp(dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out[:, :, group] = probs @ torch.cat(gathered_values, dim=-2)
    return out.view(batch, q_heads, -1, dim)[:, :, :q_len], lse.view(batch, q_heads, -1)[:, :, :q_len]


def _at_one_distance(q: torch.Tensor, positions: torch.Tensor, geometry: Geometry, inv_freq: torch.Tensor) -> torch.Tensor:
    """Queries [..., n, b, D] at `positions` [n, b] turned back to no RoPE, then to the one distance D: against a key
    without RoPE they score as at distance D (the release rotates the query to position n_local - 1)."""
    raw = rotate(q, -positions, inv_freq)
    return rotate(raw, torch.tensor(geometry.one_distance, device=q.device), inv_freq)


def attend_torch(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor,
    q_start: int, block: int, geometry: Geometry, inv_freq: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock-torch kernel (see the module docstring): (out [B, Hq, L, D], lse [B, Hq, L]).

    Queries come in spans: aligned runs of max(block, w) that share one recent span (from block m to the span's
    end); spans in the bulk of the run are batched, a partial one at either end goes alone.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_len = keys.shape[2]
    span = max(block, geometry.window)
    dense = chosen.shape[-1] == 0
    out = torch.empty_like(query)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    units = max(chosen.shape[1], keys.shape[1])
    far_keys_per_span = batch * units * max(1, chosen.shape[-1]) * (span // block) * geometry.window * dim
    per_batch = 1 if dense else max(1, TORCH_WORKING_SET // far_keys_per_span)
    position, end = q_start, q_start + q_len
    while position < end:
        span_start = position // span * span
        whole = (end - span_start) // span if position == span_start and span_start + span <= kv_len else 0
        spans = max(1, min(whole, per_batch))
        stop = min(end, span_start + spans * span)
        rows = slice(position - q_start, stop - q_start)
        groups = slice((position - q_start) // block, -(-(stop - q_start) // block))
        out[:, :, rows], lse[:, :, rows] = _attend_spans(
            query[:, :, rows], keys, values, chosen[:, :, groups], span_start, position, spans, span, block,
            geometry, inv_freq, scaling,
        )
        position = stop
    return out, lse


def _attend_spans(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor, span_start: int,
    q_start: int, spans: int, span: int, block: int, geometry: Geometry, inv_freq: torch.Tensor, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`spans` consecutive spans from span_start (a partial one when spans == 1): query [B, Hq, n, D] are the rows
    from q_start on; chosen [B, U, groups, S] their groups' far blocks."""
    batch, q_heads, rows, dim = query.shape
    kv_heads, device = keys.shape[1], query.device
    window, local, slots = geometry.window, geometry.local, chosen.shape[-1]
    per_span = rows // spans  # == span when several spans come together
    lead = q_start - span_start  # rows of the (single) span before the first query
    # the recent span of a span's queries starts `back` tokens before the span: local (rounded to blocks), or at 0
    back = span_start if slots == 0 else span_start - max(0, span_start - local) // window * window
    starts = span_start + torch.arange(spans, device=device) * span
    q = query.view(batch, q_heads, spans, per_span, dim)
    positions = starts[:, None] + lead + torch.arange(per_span, device=device)  # [n, r]
    # recent keys: one window of back + span tokens per span, views into the cache (overlapping, no copy)
    width = back + span
    lo, hi = span_start - back, span_start - back + (spans - 1) * span + width
    source_k, source_v = keys[:, :, lo : min(hi, keys.shape[2])], values[:, :, lo : min(hi, keys.shape[2])]
    if hi > keys.shape[2]:  # only a last, partial span reaches past the cache
        source_k, source_v = (F.pad(t, (0, 0, 0, hi - keys.shape[2])) for t in (source_k, source_v))
    k_win = source_k.to(device).unfold(2, width, span).transpose(-1, -2)  # [B, Hkv, n, width, D]
    v_win = source_v.to(device).unfold(2, width, span).transpose(-1, -2)
    distance = (back + lead + torch.arange(per_span, device=device))[:, None] - torch.arange(width, device=device)
    near = distance >= 0
    if geometry.one_distance is not None:
        near = near & (distance < local)
    parts = [_shared_attention(q, k_win, v_win, near, scaling)]
    q_far = None
    if geometry.one_distance is not None:
        q_far = _at_one_distance(q, positions, geometry, inv_freq)
        reach = back + span - local  # window tokens some query of the span sees beyond its local window
        if reach > 0:
            key_positions = starts[:, None] - back + torch.arange(reach, device=device)
            k_raw = rotate(k_win[:, :, :, :reach], -key_positions, inv_freq)
            parts.append(_shared_attention(q_far, k_raw, v_win[:, :, :, :reach], distance[:, :reach] >= local, scaling))
    if slots:
        parts += _far_blocks(q, q_far, keys, values, chosen, positions, block, geometry, inv_freq, scaling)
    out, lse = merge_attention(parts)
    return out.reshape(batch, q_heads, rows, dim), lse.reshape(batch, q_heads, rows)


def _shared_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query head of a key/value head over the same keys: q [B, Hq, n, r, D], k/v [B, Hkv, n, s, D], visible
    [r, s] (the same for every span). The heads of a GQA group are stacked along the query axis, not the keys copied."""
    batch, q_heads, spans, rows, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[3]
    group = q_heads // kv_heads
    stacked = q.view(batch, kv_heads, group, spans, rows, dim).transpose(2, 3).reshape(batch * kv_heads, spans, group * rows, dim)
    mask = torch.zeros(rows, keys, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf")).repeat(group, 1)
    out, lse = attention_with_lse(stacked, k.reshape(batch * kv_heads, spans, keys, dim),
                                  v.reshape(batch * kv_heads, spans, keys, dim), mask, scaling)
    out = out.view(batch, kv_heads, spans, group, rows, dim).transpose(2, 3).reshape(batch, q_heads, spans, rows, dim)
    return out, lse.view(batch, kv_heads, spans, group, rows).transpose(2, 3).reshape(batch, q_heads, spans, rows)


def _far_blocks(
    q: torch.Tensor, q_far: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor,
    positions: torch.Tensor, block: int, geometry: Geometry, inv_freq: torch.Tensor, scaling: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Attention of q [B, Hq, n, r, D] to their groups' far blocks, as parts to merge ([B, Hq, n, r, D] each)."""
    batch, q_heads, spans, rows, dim = q.shape
    kv_heads, window, device = keys.shape[1], geometry.window, q.device
    slots = chosen.shape[-1]
    if chosen.shape[1] == 1:
        chosen = chosen.expand(batch, kv_heads, *chosen.shape[2:])  # one selection per layer: every key/value head reads it
    units, groups = chosen.shape[1], chosen.shape[2]
    per_unit = q_heads // units
    padded = groups * block  # the last group of the run may be partial
    flat = positions.reshape(-1)
    first = torch.clamp((flat[::block] // block * block - geometry.local) // window, min=0)  # m of each group [G]

    def by_unit(x: torch.Tensor) -> torch.Tensor:  # [B, Hq, G, ..., b, D] -> [B * U, G * ..., per_unit * b, D]
        x = x.view(batch, units, per_unit, *x.shape[2:]).movedim(2, -3)  # a unit's heads next to their rows
        return x.reshape(batch * units, -1, per_unit * block, dim)

    kv_head = torch.arange(units) // (units // kv_heads)
    k_far = gather_blocks(keys, chosen, kv_head, window).to(device)  # [B, U, G, S, w, D]
    v_far = gather_blocks(values, chosen, kv_head, window).to(device)
    q_rows = F.pad(q.reshape(batch, q_heads, -1, dim), (0, 0, 0, padded - spans * rows)).view(batch, q_heads, groups, block, dim)
    if geometry.one_distance is None:
        # block c in slot i moves n = m - c - (S - i) blocks toward the query: the query is turned back by n * w,
        # once per slot, and attends to each slot's keys in its own call (merged with the rest by log-sum-exp)
        shift = (first[:, None] - chosen - (slots - torch.arange(slots, device=device))) * window  # [B, U, G, S]
        shift = shift.repeat_interleave(per_unit, dim=1)  # [B, Hq, G, S]
        q_slots = rotate(q_rows[:, :, :, None], -shift[..., None], inv_freq)  # [B, Hq, G, S, b, D]
        out, lse = attention_with_lse(
            by_unit(q_slots), k_far.reshape(batch * units, groups * slots, window, dim),
            v_far.reshape(batch * units, groups * slots, window, dim), None, scaling,
        )
        out = out.view(batch, units, groups, slots, per_unit, block, dim).movedim(4, 2).reshape(batch, q_heads, groups, slots, block, dim)
        lse = lse.view(batch, units, groups, slots, per_unit, block).movedim(4, 2).reshape(batch, q_heads, groups, slots, block)
        return [_to_spans(out[:, :, :, slot], lse[:, :, :, slot], spans, rows) for slot in range(slots)]
    q_rows = F.pad(q_far.reshape(batch, q_heads, -1, dim), (0, 0, 0, padded - spans * rows)).view(batch, q_heads, groups, block, dim)
    key_positions = chosen[..., None] * window + torch.arange(window, device=device)  # [B, U, G, S, w]
    k_raw = rotate(k_far, -key_positions.to(device), inv_freq).view(batch * units, groups, slots * window, dim)
    out, lse = attention_with_lse(by_unit(q_rows), k_raw, v_far.view(batch * units, groups, slots * window, dim), None, scaling)
    out = out.view(batch, units, groups, per_unit, block, dim).transpose(2, 3).reshape(batch, q_heads, groups, block, dim)
    lse = lse.view(batch, units, groups, per_unit, block).transpose(2, 3).reshape(batch, q_heads, groups, block)
    return [_to_spans(out, lse, spans, rows)]


def _to_spans(out: torch.Tensor, lse: torch.Tensor, spans: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hq, G, b, D] per group (last one padded) -> [B, Hq, n, r, D] per span."""
    batch, q_heads = out.shape[:2]
    out = out.reshape(batch, q_heads, -1, out.shape[-1])[:, :, : spans * rows]
    lse = lse.reshape(batch, q_heads, -1)[:, :, : spans * rows]
    return out.view(batch, q_heads, spans, rows, -1), lse.view(batch, q_heads, spans, rows)
