"""Retrieval attention (LongHeads, InfLLM) as a transformers attention function.

transformers hands us, per layer, queries [batch, q_heads, q_len, head_dim] and the whole cache's keys/values
[batch, kv_heads, kv_len, head_dim], all already RoPE-rotated at their absolute positions. In the order the papers
tell it, for every forward call:
1. the block summaries are brought up to date (summaries.py: LongHeads' in-chunk attention, InfLLM's representative
   tokens);
2. queries before `begin` attend to every earlier token; the others go in groups that share one selection (`block`
   queries in the bulk of a prefill, one query in decoding and in the last `exact_tail` prefill queries);
3. each group's selection units (selection.py: per head, per key/value head or per layer) score the summaries and keep
   the sink blocks and the top-k others;
4. the group attends to those blocks and its recent span, at the positions the geometry assigns (geometry.py:
   consecutive slots or one distance), with one of three kernels: "triton" (triton_kernel.py), "torch" or
   "reference" (kernels.py); all three give the same output up to rounding.
When summaries depend on the attention paid (InfLLM), step 1 runs again before every group and the group's
attention is credited to its local window after it (the release does the same, one `exc_block_size` chunk at a time).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from longctx.methods.base import attention_call, causal_attention
from longctx.methods.retrieval.cache import RetrievalCache
from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.retrieval.kernels import attend_reference, attend_torch
from longctx.methods.retrieval.selection import block_selection, selection_units
from longctx.methods.retrieval.triton_kernel import triton_attend, triton_available, triton_select

KERNELS = ("auto", "triton", "torch", "reference")
# queries selected and attended at once when the summaries do not depend on the attention: bounds the selection state
QUERY_PIECE = 32768


def retrieval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered with transformers' `AttentionInterface` for every retrieval method."""
    call = attention_call(module, query, key, dropout, kwargs)
    with cpu_threads(call.plan.cpu_threads, query.device):
        return attend_layer(call.installation, module, query, key, value, scaling), None


def attend_layer(installation, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Steps 1-4 of the module docstring for one layer: the output [B, L, Hq, D]."""
    cache: RetrievalCache = installation.active_cache
    plan = installation.plan
    geometry: Geometry = plan.geometry
    summary = plan.summary
    inv_freq = module.longctx_inv_freq  # this layer's RoPE (layer types may differ, e.g. Gemma 3)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch, q_heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    q_start = kv_len - q_len
    kernel = choose_kernel(plan.kernel, query, key)
    state = cache.layer_state(module.layer_idx)
    summary.start(state, query, key, value, geometry, inv_freq, scaling)

    out = torch.empty(batch, q_len, q_heads, dim, dtype=query.dtype, device=query.device)  # the layout the model wants
    out_heads = out.transpose(1, 2)
    position = q_start
    if geometry.one_distance is None and not summary.observes:
        # before `begin` every earlier token sits at its true position: ordinary causal attention, in one call
        dense = min(max(geometry.begin - q_start, 0), q_len)
        if dense:
            visible = min(kv_len, geometry.begin)
            out_heads[:, :, :dense] = causal_attention(
                query[:, :, :dense], key[:, :, :visible].to(query.device), value[:, :, :visible].to(query.device),
                q_start, scaling,
            )
        position += dense
    if key.device != query.device and q_len > 1:
        # cpu_offload prefill: the layer's cache crosses once, not once per query group
        key, value = key.to(query.device, non_blocking=True), value.to(query.device, non_blocking=True)
    units = selection_units(plan.sharing, q_heads, key.shape[1])
    last = None
    for start, end, block in query_runs(position, kv_len, geometry, q_len):
        span = max(block, geometry.window)  # queries that share one recent span
        piece_size = span if summary.observes else QUERY_PIECE // span * span
        dense_until = -(-geometry.begin // block) * block  # groups starting before `begin` attend densely
        piece = start
        while piece < end:
            stop = min(end, (piece // piece_size + 1) * piece_size, dense_until if piece < dense_until else end)
            rows = slice(piece - q_start, stop - q_start)
            summary.before(state, key, piece, geometry, inv_freq, query.device)
            chosen = select(kernel, query[:, :, rows], state, piece, block, geometry, units, summary, inv_freq)
            if kernel == "triton":
                table = installation.shift_table(inv_freq, -(-kv_len // geometry.window) + 1, query.device)
                lse = triton_attend(
                    query[:, :, rows], key, value, chosen, piece, block, geometry, inv_freq, table, scaling, out[:, rows]
                )
            elif kernel == "torch":
                out_heads[:, :, rows], lse = attend_torch(query[:, :, rows], key, value, chosen, piece, block, geometry,
                                                          inv_freq, scaling, workspace=cache.workspace)
            else:
                out_heads[:, :, rows], lse = attend_reference(query[:, :, rows], key, value, chosen, piece, block, geometry,
                                                              inv_freq, scaling)
            summary.after(state, query[:, :, rows], key, lse, piece, geometry, inv_freq, scaling)
            last = (chosen[:, :, -1], stop - 1, block)
            piece = stop
    if cache.trace is not None:
        record_selection(cache, module.layer_idx, last, kv_len, geometry)
    return out


@contextmanager
def cpu_threads(threads: int, device: torch.device):
    """Run the retrieval attention on `threads` of torch's intra-op threads on a CPU (0: leave torch's setting).

    Its operations are many and mid-sized (per batch of query groups): on an idle CPU every thread helps, so the
    default is torch's setting; when other jobs share a small CPU, each parallel operation waits for a thread that is
    not running, and 1 thread is faster (docs/methods.md, `cpu_threads`; the speed report's CPU runs).
    """
    if device.type != "cpu" or not threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def choose_kernel(requested: str, query: torch.Tensor, key: torch.Tensor) -> str:
    """The one place where the kernel is chosen. "auto" is triton on CUDA when Triton is importable, else torch.
    Triton reads the cache on the query's device: a decoding step over a cache offloaded to host memory runs the torch
    kernel, which gathers the chosen blocks on the host and moves only those."""
    if requested == "auto":
        requested = "triton" if triton_available(query.device) else "torch"
    if requested == "triton":
        if not triton_available(query.device):
            raise RuntimeError("kernel=triton needs a CUDA device and the triton package; use kernel=auto or torch")
        if key.device != query.device:
            return "torch"
    return requested


def query_runs(start: int, kv_len: int, geometry: Geometry, q_len: int) -> list[tuple[int, int, int]]:
    """Split query positions [start, kv_len) into (start, end, block) runs of one group size.

    Groups of `block` queries (aligned to absolute positions) cover the bulk of a prefill; decoding steps, an unaligned
    head and the last `exact_tail` prefill queries (the ones whose output becomes the answer) select per token. With
    `whole_groups` (LongHeads) the tail starts at a group boundary, so it may hold up to block - 1 queries more;
    otherwise (InfLLM, whose release feeds the last prompt token alone) the group before it may be partial.
    """
    block = geometry.block if q_len > 1 else 1
    if block == 1:
        return [(start, kv_len, 1)] if kv_len > start else []
    aligned = min(kv_len, -(-start // block) * block)
    tail = kv_len - geometry.exact_tail
    tail = min(kv_len, max(aligned, tail // block * block if geometry.whole_groups else tail))
    runs = [(start, aligned, 1), (aligned, tail, block), (tail, kv_len, 1)]
    return [run for run in runs if run[1] > run[0]]


def select(
    kernel: str, query: torch.Tensor, state, q_start: int, block: int, geometry: Geometry, units: int, summary,
    inv_freq: torch.Tensor,
) -> torch.Tensor:
    """Far blocks [B, units, groups, slots] of each group of `block` queries from q_start; no slots for groups that
    start before `begin` (they attend densely)."""
    batch, q_heads, q_len, _ = query.shape
    groups = -(-q_len // block)
    if q_start < geometry.begin:  # a run never straddles `begin` in groups (see query_runs and the method's checks)
        return torch.empty(batch, units, groups, 0, dtype=torch.long, device=query.device)
    choose = triton_select if kernel == "triton" else block_selection
    return choose(query, state.keys, q_start, block, geometry, units, inv_freq, summary.scoring_distance(geometry))


def record_selection(cache: RetrievalCache, layer: int, last, kv_len: int, geometry: Geometry) -> None:
    """Blocks attended by the last query of this call, per selection unit of batch element 0: the far ones, then
    the recent span's, as the trace and the heatmaps show them."""
    cache.trace.num_chunks = -(-kv_len // geometry.window)
    if last is None:
        return
    chosen, position, block = last
    group_start = position // block * block
    first = 0 if chosen.shape[-1] == 0 else geometry.first_recent(group_start)
    recent = torch.arange(first, position // geometry.window + 1, device=chosen.device)
    row = torch.cat((chosen[0], recent.expand(chosen.shape[1], -1).to(chosen.dtype)), dim=-1)
    if not cache.trace.steps or layer in cache.trace.steps[-1]:  # a new forward call
        cache.trace.steps.append({})  # (not keyed on layer 0: on Gemma 3 the first layers are local, left alone)
    cache.trace.steps[-1][layer] = row.clone()  # to host only when read: no sync per layer
