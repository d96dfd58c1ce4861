"""Attention over several key sets, each under its own position scheme, merged by log-sum-exp.

A softmax over the union of key sets equals the softmax of each set merged by their log-sum-exps:
out = sum_i exp(lse_i - lse) * out_i with lse = logsumexp_i(lse_i). So a method can attend to its keys in parts
(chosen blocks at remapped positions, recent tokens at true ones, far tokens at one distance) with a fused
attention kernel per part, and still compute the one softmax its paper writes.
"""

from __future__ import annotations

import torch

# SDPA returns no log-sum-exp; on CPU its fused flash kernel does, through this op (torch >= 2.2): about 4x faster
# than the matmul-softmax-matmul fallback on the shapes the retrieval kernels use (2-core CPU, float32)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    blind: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: (out [N, M, L, D], lse [N, M, L], float32 or wider).

    query [N, M, L, D], key/value [N, M, S, D] (S > 0; any strides with a contiguous last dim), mask: additive float
    mask broadcastable to [N, M, L, S] or None. `blind` (broadcastable to [N, M, L]) marks the queries the mask hides
    every key from: they get out = 0 and lse = -inf, so they add nothing to a merge.
    """
    if mask is not None:
        mask = mask.to(query.dtype)
    if _CPU_FLASH is not None and query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = _CPU_FLASH(query, key, value, 0.0, False, attn_mask=mask, scale=scaling)
        lse = lse.float()
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)).to(torch.promote_types(query.dtype, torch.float32)) * scaling
        if mask is not None:
            scores = scores + mask
        lse = scores.logsumexp(dim=-1)
        probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])  # a blind row: all zeros
        out = torch.matmul(probs.to(value.dtype), value)
    if blind is not None:  # the flash kernel reports lse = 0 for a fully masked row; a merge must see -inf there
        lse = lse.masked_fill(blind, float("-inf"))
        out = out.masked_fill(blind[..., None], 0.0)
    return out, lse


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
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
