"""Attention under several position schemes at once, merged by log-sum-exp.

Self-Extend, Dual Chunk Attention and LM-Infinite let one query see different keys at different (remapped)
positions: neighbours at their true distance, far keys at grouped, chunk-local or capped ones. A RoPE score depends
on both vectors' rotations, so one attention call cannot hold two schemes; each scheme is its own attention "part"
over the keys it covers, and the parts are merged exactly:

    out = sum_p exp(lse_p - lse) * out_p,   lse = log sum_p exp(lse_p),

where out_p and lse_p are part p's softmax-weighted values and the log-sum-exp of its scores. This is one softmax
over the union of the parts' keys, which is what the papers' masked score matrices compute, without ever forming
the score matrix: each part runs in a fused attention kernel (FlashAttention on a GPU in the authors' releases; here
PyTorch's CPU flash kernel, which also returns the log-sum-exp).
"""

from __future__ import annotations

import torch

# PyTorch's fused CPU attention that also returns the log-sum-exp: F.scaled_dot_product_attention runs the same
# kernel on CPU but keeps the log-sum-exp to itself. (On other devices the blockwise float32 path below serves.)
_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# Scores materialised at once by the float32 path (queries x keys x heads), a few tens of MB.
SCORE_BUDGET = 2**23


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part: softmax over the visible keys of scaling * q . k, applied to the values, and its log-sum-exp.

    query [B, Hq, q, D]; key, value [B, Hkv, n, D] with Hq a multiple of Hkv (query head h reads KV head h // (Hq /
    Hkv), as transformers' repeat_kv); visible: bool [q, n] shared by batch and heads, or None (every key).
    Returns out [B, Hq, q, Dv] in the query's dtype and lse [B, Hq, q] in float32; a query that sees no key gets
    out 0 and lse -inf, so that it weighs nothing in `merge`.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    # the heads of a GQA group share keys: stack their queries along the query axis instead of copying the keys
    folded = query.reshape(batch, kv_heads, group * q_len, dim)
    mask = None if visible is None else visible.repeat(group, 1)  # [group * q, n]
    if query.device.type == "cpu" and n_keys:
        bias = None if mask is None else torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
        out, lse = _CPU_FLASH(folded, key, value, 0.0, False, attn_mask=bias, scale=scaling)
        lse = lse.float()
    else:
        out, lse = _float32_attention(folded, key, value, mask, scaling)
    out = out.reshape(batch, q_heads, q_len, value.shape[-1])
    lse = lse.reshape(batch, q_heads, q_len)
    if visible is not None:
        blind = ~visible.any(dim=-1)  # the fused kernel returns lse 0 for a row it cannot see anything from
        if blind.any():
            lse = lse.masked_fill(blind, float("-inf"))
            out = out.masked_fill(blind[:, None], 0.0)
    return out.to(query.dtype), lse


def _float32_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same part written out, in float32, a block of queries at a time; query [B, H, q, D], key [B, H, n, D]."""
    n_keys = key.shape[2]
    rows = max(1, SCORE_BUDGET // max(1, n_keys * query.shape[0] * query.shape[1]))
    outs, lses = [], []
    for start in range(0, query.shape[2], rows):
        scores = (query[:, :, start : start + rows].float() @ key.float().transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask[start : start + rows], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # a row that sees nothing: lse -inf, weights 0
        outs.append(weights @ value.float())
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


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
        parts.append(attention_with_lse(query, key[:, :, shared - offset : first - offset],
                                        value[:, :, shared - offset : first - offset], None, scaling))
        edges = [(low, shared), (first, stop)]
    positions = torch.cat([torch.arange(lo, hi, device=query.device) for lo, hi in edges])
    keys = torch.cat([key[:, :, lo - offset : hi - offset] for lo, hi in edges], dim=2)
    values = torch.cat([value[:, :, lo - offset : hi - offset] for lo, hi in edges], dim=2)
    t = torch.arange(first, stop, device=query.device)[:, None]
    parts.append(attention_with_lse(query, keys, values, (positions <= t) & (positions > t - window), scaling))
    return parts


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over the union of the parts' keys, from each part's (out [..., q, Dv], lse [..., q])."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    merged = sum(torch.exp(lse - total)[..., None] * out.float() for out, lse in parts)
    return merged.to(parts[0][0].dtype)
