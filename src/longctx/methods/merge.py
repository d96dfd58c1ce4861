"""Attention over several key sets, each under its own position scheme, merged by log-sum-exp.

Self-Extend, Dual Chunk Attention and LM-Infinite let one query see different keys at different (remapped)
positions: neighbours at their true distance, far keys at grouped, chunk-local or capped ones. LongHeads and InfLLM
attend to retrieved blocks at remapped positions and to the recent tokens at their true ones. A RoPE score depends on
both vectors' rotations, so one attention call cannot hold two schemes; each scheme is its own attention "part" over
the keys it covers, and the parts are merged exactly:

    out = sum_p exp(lse_p - lse) * out_p,   lse = log sum_p exp(lse_p),

where out_p and lse_p are part p's softmax-weighted values and the log-sum-exp of its scores. This is one softmax
over the union of the parts' keys, which is what the papers' masked score matrices compute, without ever forming
the score matrix: each part runs in a fused attention kernel (FlashAttention or Triton on a GPU; here PyTorch's CPU
flash kernel, which also returns the log-sum-exp).
"""

from __future__ import annotations

import torch

# SDPA returns no log-sum-exp; on CPU its fused flash kernel does, through this op (torch >= 2.2): about 4x faster
# than the matmul-softmax-matmul fallback on the shapes the retrieval kernels use (2-core CPU, float32)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Scores materialised at once by the written-out path (queries x keys x heads), a few tens of MB.
SCORE_BUDGET = 2**23


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    blind: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: (out [N, M, L, D] in the query's dtype, lse [N, M, L] in float32 or
    wider).

    query [N, M, L, D], key/value [N, M, S, D] (any strides with a contiguous last dim), mask: additive float
    mask broadcastable to [N, M, L, S] or None. `blind` (broadcastable to [N, M, L]) marks the queries the mask hides
    every key from: they get out = 0 and lse = -inf, so they add nothing to a merge.
    """
    if mask is not None:
        mask = mask.to(query.dtype)
    if _CPU_FLASH is not None and key.shape[-2] and query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = _CPU_FLASH(query, key, value, 0.0, False, attn_mask=mask, scale=scaling)
        lse = lse.float()
    else:
        out, lse = _written_out_attention(query, key, value, mask, scaling)
    if blind is not None:  # the flash kernel reports lse = 0 for a fully masked row; a merge must see -inf there
        lse = lse.masked_fill(blind, float("-inf"))
        out = out.masked_fill(blind[..., None], 0.0)
    return out, lse


def _written_out_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention written out in float32 or wider, a block of queries at a time so that the scores stay
    within SCORE_BUDGET."""
    precision = torch.promote_types(query.dtype, torch.float32)
    rows = max(1, SCORE_BUDGET // max(1, key.shape[-2] * query.shape[0] * query.shape[1]))
    outs, lses = [], []
    for start in range(0, query.shape[-2], rows):
        scores = torch.matmul(query[..., start : start + rows, :].to(precision), key.to(precision).transpose(-1, -2))
        scores = scores * scaling
        if mask is not None:
            scores = scores + (mask if mask.shape[-2] == 1 else mask[..., start : start + rows, :])
        lse = scores.logsumexp(dim=-1)
        probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])  # a blind row: all zeros
        outs.append(torch.matmul(probs, value.to(precision)))
        lses.append(lse)
    return torch.cat(outs, dim=-2).to(query.dtype), torch.cat(lses, dim=-1)


def attention_part(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part for a GQA model: softmax over the visible keys of scaling * q . k, applied to the values, and its
    log-sum-exp.

    query [B, Hq, q, D]; key, value [B, Hkv, n, D] with Hq a multiple of Hkv (query head h reads KV head h // (Hq /
    Hkv), as transformers' repeat_kv); visible: bool [q, n] shared by batch and heads, or None (every key).
    Returns out [B, Hq, q, Dv] and lse [B, Hq, q]; a query that sees no key gets out 0 and lse -inf.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    # the heads of a GQA group share keys: stack their queries along the query axis instead of copying the keys
    folded = query.reshape(batch, kv_heads, group * q_len, dim)
    mask = blind = None
    if visible is not None:
        rows = visible.repeat(group, 1)  # [group * q, n]
        mask = torch.zeros(rows.shape, dtype=query.dtype, device=query.device).masked_fill_(~rows, float("-inf"))
        blind = ~rows.any(dim=-1)
    out, lse = attention_with_lse(folded, key, value, mask, scaling, blind)
    return out.reshape(batch, q_heads, q_len, value.shape[-1]), lse.reshape(batch, q_heads, q_len)


def recent_parts(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, first: int, window: int, scaling: float, offset: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Causal attention from queries at positions first, first + 1, ... to their `window` most recent keys
    (t - window < j <= t) at the positions they were rotated with, as parts for `merge`: Self-Extend's neighbours,
    LM-Infinite's local branch.

    query [B, Hq, q, D]; the key of position p sits at slot p - offset of key/value [B, Hkv, n, D]. The keys every
    query of the block sees go to the kernel unmasked; only the two edges of the band (at most 2q keys) carry a mask.
    """
    stop = first + query.shape[2]
    low, shared = max(0, first - window + 1), max(0, stop - window)
    parts, edges = [], [(low, stop)]
    if shared < first:  # keys [shared, first) are within every query's window
        parts.append(attention_part(query, key[:, :, shared - offset : first - offset],
                                    value[:, :, shared - offset : first - offset], None, scaling))
        edges = [(low, shared), (first, stop)]
    positions = torch.cat([torch.arange(lo, hi, device=query.device) for lo, hi in edges])
    keys = torch.cat([key[:, :, lo - offset : hi - offset] for lo, hi in edges], dim=2)
    values = torch.cat([value[:, :, lo - offset : hi - offset] for lo, hi in edges], dim=2)
    t = torch.arange(first, stop, device=query.device)[:, None]
    parts.append(attention_part(query, keys, values, (positions <= t) & (positions > t - window), scaling))
    return parts


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the union of the parts' keys, from each part's (out [..., L, D], lse [..., L]).

    Returns (out in the first part's dtype, lse). Every query must see a key in at least one part.
    """
    out, lse = parts[0]
    for part_out, part_lse in parts[1:]:  # pairwise: few, large operations (they dominate on a busy CPU)
        total = torch.logaddexp(lse, part_lse)
        # weight of the merged-so-far part; a part that saw nothing (lse = -inf) gets weight 0
        weight = torch.exp(lse - total)[..., None]
        precision = torch.promote_types(out.dtype, torch.float32)
        out = torch.lerp(part_out.to(precision), out.to(precision), weight.to(precision))
        lse = total
    return out.to(parts[0][0].dtype), lse
