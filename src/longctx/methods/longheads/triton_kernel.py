"""LongHeads selective attention as one fused Triton kernel (GPU; the PyTorch paths in attention.py are the reference).

One program per (query block, batch x query head). It reads the block's K chosen chunk ids and, slot by slot, streams
each chunk's keys and values straight from the cache (no gathered copy), with an online softmax as in
FlashAttention-2. Remapping moves the key of chunk c in slot i closer to the query by n = j - c - (K - 1 - i) chunks
(j: the query's chunk); a RoPE score depends only on the rotation between query and key, so the query is turned back
by n * w once per slot, in registers, from a cos/sin table indexed by n (built in float64, stored in float32). Only
the last slot (the query's own chunk) needs the causal mask.

Per-token selection (decoding, the exact tail, block_size = 1) is the same kernel with one query row per program.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU paths in attention.py need no Triton
    triton = None


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def shift_table(inv_freq: torch.Tensor, window: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of a shift by n chunks, [rows, rotary_dim / 2] float32, n = 0..rows-1.

    Angles n * w * f reach 1e5 radians at 128k tokens; computing them in float64 keeps the table exact to float32.
    """
    angles = torch.arange(rows, dtype=torch.float64, device=device)[:, None] * window * inv_freq.to(device, torch.float64)
    return angles.cos().float().contiguous(), angles.sin().float().contiguous()


if triton is not None:

    @triton.jit
    def _selective_attention_kernel(
        Q, K, V, Out, Chosen, Cos, Sin,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_cb, stride_ch, stride_cg, stride_cs,
        stride_table,
        q_len, kv_len, q_start, q_heads, group, block, scale_log2,
        WINDOW: tl.constexpr, SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        query_block = tl.program_id(0)
        batch_head = tl.program_id(1)
        b = batch_head // q_heads
        h = batch_head % q_heads
        kv_h = h // group

        # the block's query rows; a block never straddles chunks (block divides w)
        first = query_block * block
        rows = tl.arange(0, BLOCK_M)
        row_ok = (rows < block) & (first + rows < q_len)
        chunk = (q_start + first) // WINDOW
        into_chunk = q_start + first + rows - chunk * WINDOW  # [BLOCK_M]

        # half-split RoPE: dim d pairs with d +- R/2 (R rotary dims); dims past R are not rotated
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        first_half = d < ROT_HALF
        rotary = d < 2 * ROT_HALF
        partner = tl.where(first_half, d + ROT_HALF, tl.where(rotary, d - ROT_HALF, d))
        sign = tl.where(first_half, -1.0, tl.where(rotary, 1.0, 0.0))
        freq = tl.where(first_half, d, d - ROT_HALF)

        q_rows = Q + b * stride_qb + h * stride_qh + (first + rows)[:, None] * stride_qm
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_rows + d[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32)
        q_half = tl.load(q_rows + partner[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32) * sign[None, :]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        keys_in_tile = tl.arange(0, BLOCK_N)
        k_base = K + b * stride_kb + kv_h * stride_kh
        v_base = V + b * stride_vb + kv_h * stride_vh
        chosen_base = Chosen + b * stride_cb + h * stride_ch + query_block * stride_cg
        for slot in range(SLOTS):
            c = tl.load(chosen_base + slot * stride_cs)
            n = chunk - c - (SLOTS - 1 - slot)  # chunks the key moves toward the query, >= 0
            cos = tl.load(Cos + n * stride_table + freq, mask=rotary, other=1.0)
            sin = tl.load(Sin + n * stride_table + freq, mask=rotary, other=0.0)
            # rotate the query back by n * w (scaled for exp2): same score as moving every key forward
            q_slot = ((q * cos[None, :] - q_half * sin[None, :]) * scale_log2).to(K.dtype.element_ty)
            for start in range(0, WINDOW, BLOCK_N):
                t = start + keys_in_tile
                key_pos = c * WINDOW + t
                k_ok = (key_pos < kv_len) & (t < WINDOW)
                kv_mask = k_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + key_pos[:, None] * stride_kn + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
                v = tl.load(v_base + key_pos[:, None] * stride_vn + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
                if IEEE:
                    s = tl.dot(q_slot, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q_slot, tl.trans(k))
                # causal only in the last slot, the query's own chunk
                visible = k_ok[None, :] & ((slot < SLOTS - 1) | (t[None, :] <= into_chunk[:, None]))
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if IEEE:
                    pv = tl.dot(p.to(V.dtype.element_ty), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(V.dtype.element_ty), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new

        out = acc / l_i[:, None]
        out_rows = Out + b * stride_ob + h * stride_oh + (first + rows)[:, None] * stride_om
        tl.store(out_rows + d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=q_mask)


def triton_selective_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    chosen: torch.Tensor,
    q_start: int,
    block: int,
    window: int,
    table: tuple[torch.Tensor, torch.Tensor],
    scaling: float,
    out: torch.Tensor,
) -> None:
    """Write LongHeads attention for `query` [B, Hq, L, D] (positions q_start..) into `out` [B, L, Hq, D].

    keys/values [B, Hkv, N, D] any strides (the cache itself); chosen [B, Hq, ceil(L / block), K] chunk ids in slot
    order; table: `shift_table` with at least N / w + 1 rows.
    """
    batch, q_heads, q_len, dim = query.shape
    slots = chosen.shape[-1]
    chosen = chosen.to(torch.int32).contiguous()
    cos, sin = table
    block_m = max(16, triton.next_power_of_2(block))
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (chosen.shape[2], batch * q_heads)
    _selective_attention_kernel[grid](
        query, keys, values, out, chosen, cos, sin,
        *query.stride(), *keys.stride(), *values.stride(), *out.stride(), *chosen.stride(), cos.stride(0),
        q_len, keys.shape[2], q_start, q_heads, q_heads // keys.shape[1], block, scaling * 1.4426950408889634,
        WINDOW=window, SLOTS=slots, HEAD_DIM=dim, ROT_HALF=cos.shape[1],
        BLOCK_M=block_m, BLOCK_N=min(64, triton.next_power_of_2(window)), BLOCK_D=block_d,
        IEEE=query.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
