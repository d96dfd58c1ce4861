"""Which blocks a group of queries retrieves (the sharing seam: who shares one selection).

A group's score for a block is the mean of its queries' scores, i.e. the mean query (without RoPE, then as the
summary wants it) against the block's summary, summed over the query heads of one selection unit:
  * "head": every query head selects for itself (LongHeads);
  * "kv_group": the query heads of one key/value head select together;
  * "layer": all heads of the layer select together (InfLLM: the release scores blocks by the concatenation of all
    heads' queries against the concatenation of their representative keys).
The sink blocks come first; then the top-k blocks between the sink and the recent span, in their original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.rope import rotate

SHARING = ("head", "kv_group", "layer")


def selection_units(sharing: str, q_heads: int, kv_heads: int) -> int:
    """How many selections a layer makes: one per query head, per key/value head, or one."""
    return {"head": q_heads, "kv_group": kv_heads, "layer": 1}[sharing]


def mean_raw_queries(query: torch.Tensor, q_start: int, block: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """The mean query without RoPE of each group of `block` queries [B, Hq, L, D] at positions q_start..: float32 (or
    wider) [B, Hq, groups, D] (the last group may be partial)."""
    batch, q_heads, q_len, dim = query.shape
    groups = -(-q_len // block)
    positions = q_start + torch.arange(groups * block, device=query.device).view(groups, block)
    valid = (positions < q_start + q_len).float()
    precision = torch.promote_types(query.dtype, torch.float32)
    raw = rotate(F.pad(query, (0, 0, 0, groups * block - q_len)).view(batch, q_heads, groups, block, dim).to(precision),
                 -positions, inv_freq)
    return (raw * valid[..., None]).sum(dim=-2) / valid.sum(dim=-1)[:, None]


def block_selection(
    query: torch.Tensor, summaries: torch.Tensor, q_start: int, block: int, geometry: Geometry, units: int,
    inv_freq: torch.Tensor, distance: int | None = None,
) -> torch.Tensor:
    """Blocks each selection unit retrieves for each group of `block` queries [B, Hq, L, D] at positions q_start..:
    [B, units, groups, sink + top_k], in original order.

    summaries [B, Hq, done, D] float32 are scored by each group's mean query without RoPE, turned to `distance` when
    the summaries are keys at position 0 (InfLLM's representative keys) and left raw otherwise (LongHeads).
    """
    scoring = mean_raw_queries(query, q_start, block, inv_freq)
    if distance is not None:
        scoring = rotate(scoring, torch.tensor(distance, device=scoring.device), inv_freq)
    batch, q_heads, groups, _ = scoring.shape
    group_starts = q_start + torch.arange(groups, device=query.device) * block
    scores = torch.einsum("bhgd,bhcd->bhgc", scoring, summaries.to(scoring.dtype))
    scores = scores.view(batch, units, q_heads // units, groups, -1).sum(dim=2)
    block_ids = torch.arange(summaries.shape[2], device=scores.device)
    first_recent = torch.clamp((group_starts - geometry.local) // geometry.window, min=0)
    candidate = (block_ids[None, :] >= geometry.sink) & (block_ids[None, :] < first_recent[:, None])  # [groups, done]
    scores = scores.masked_fill(~candidate, float("-inf"))
    top = scores.topk(geometry.top_k, dim=-1).indices.sort(dim=-1).values
    sink = torch.arange(geometry.sink, device=top.device).expand(*top.shape[:-1], geometry.sink)
    return torch.cat((sink, top), dim=-1)
