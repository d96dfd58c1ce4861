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
    def _attend_chosen(
        q, q_half, chosen_base, stride_cs, chunk, into_chunk,
        k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd, kv_len,
        Cos, Sin, stride_table, scale_log2, d, d_ok, freq, rotary,
        WINDOW: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Online-softmax attention of query rows q [BLOCK_M, BLOCK_D] (RoPE'd at their true positions, kept in the model's
        dtype to spare registers; q_half is rotate_half(q)) over the K chunks listed at chosen_base: [BLOCK_M, BLOCK_D]
        float32. The query is turned once per slot, then streams the slot's keys tile by tile."""
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for slot in range(SLOTS):
            c = tl.load(chosen_base + slot * stride_cs)
            n = chunk - c - (SLOTS - 1 - slot)  # chunks the key moves toward the query, >= 0
            cos = tl.load(Cos + n * stride_table + freq, mask=rotary, other=1.0)
            sin = tl.load(Sin + n * stride_table + freq, mask=rotary, other=0.0)
            # rotate the query back by n * w (scaled for exp2): the same score as moving every key forward
            q_slot = ((q.to(tl.float32) * cos[None, :] - q_half.to(tl.float32) * sin[None, :]) * scale_log2)
            q_slot = q_slot.to(k_base.dtype.element_ty)
            for start in range(0, WINDOW, BLOCK_N):
                t = start + tl.arange(0, BLOCK_N)
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
                    pv = tl.dot(p.to(v_base.dtype.element_ty), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v_base.dtype.element_ty), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        return acc / l_i[:, None]

    @triton.jit
    def _rope_lanes(HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
        """Half-split RoPE: dim d pairs with d +- R/2 (R rotary dims) with sign -/+; dims past R are not rotated."""
        d = tl.arange(0, BLOCK_D)
        first_half = d < ROT_HALF
        rotary = d < 2 * ROT_HALF
        partner = tl.where(first_half, d + ROT_HALF, tl.where(rotary, d - ROT_HALF, d))
        sign = tl.where(first_half, -1.0, tl.where(rotary, 1.0, 0.0))
        freq = tl.where(first_half, d, d - ROT_HALF)
        return d, d < HEAD_DIM, rotary, partner, sign, freq

    @triton.jit
    def _select(
        raw, summaries, stride_sc, stride_sd, score_row, chosen_row, chunk, done, d, d_ok,
        SLOTS: tl.constexpr, BLOCK_C: tl.constexpr, TILE_C: tl.constexpr,
    ):
        """Write the K chunks for the un-rotated query `raw` [BLOCK_D] (float32) to chosen_row: first, the top (K - 3)
        middle chunks 1..chunk-2 by raw . c in original order, previous, current. score_row: BLOCK_C floats of scratch
        through which the scores, computed tile by tile, become one vector."""
        for c0 in range(0, BLOCK_C, TILE_C):
            c_tile = c0 + tl.arange(0, TILE_C)
            summary = tl.load(
                summaries + c_tile[:, None] * stride_sc + d[None, :] * stride_sd,
                mask=(c_tile < done)[:, None] & d_ok[None, :], other=0.0,
            )
            score = tl.sum(summary * raw[None, :], axis=1)
            tl.store(score_row + c_tile, tl.where((c_tile >= 1) & (c_tile <= chunk - 2), score, float("-inf")))
        tl.debug_barrier()
        c_all = tl.arange(0, BLOCK_C)
        scores = tl.load(score_row + c_all)
        picked = c_all < 0
        for _ in range(SLOTS - 3):  # top (K - 3), one argmax at a time
            hit = c_all == tl.argmax(scores, axis=0)
            picked = picked | hit
            scores = tl.where(hit, float("-inf"), scores)
        # slots in original order: a picked chunk's slot is the number of picked chunks up to it (1..K-3)
        order = tl.cumsum(picked.to(tl.int32), axis=0)
        tl.store(chosen_row + tl.where(picked, order, 0), c_all, mask=picked)
        tl.store(chosen_row, 0)
        tl.store(chosen_row + SLOTS - 2, chunk - 1)
        tl.store(chosen_row + SLOTS - 1, chunk)

    @triton.jit
    def _select_block_kernel(
        Q, Summaries, Scores, Chosen, InvFreq,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_sb, stride_sh, stride_sc, stride_sd,
        q_len, q_start, q_heads, block, done,
        WINDOW: tl.constexpr, SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, TILE_C: tl.constexpr,
    ):
        """Block selection, one program per (query block, batch x query head): the block's score is the mean of its
        queries' scores, i.e. the mean un-rotated query against each summary. Chosen [B*Hq, blocks, K]."""
        query_block = tl.program_id(0)
        batch_head = tl.program_id(1)
        b = batch_head // q_heads
        h = batch_head % q_heads
        first = query_block * block
        rows = tl.arange(0, BLOCK_M)
        row_ok = (rows < block) & (first + rows < q_len)
        d, d_ok, rotary, partner, sign, freq = _rope_lanes(HEAD_DIM, ROT_HALF, BLOCK_D)
        q_rows = Q + b * stride_qb + h * stride_qh + (first + rows)[:, None] * stride_qm
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_rows + d[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32)
        q_half = tl.load(q_rows + partner[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32) * sign[None, :]
        # selection uses queries WITHOUT RoPE: turn each back by its position (float32 angles, as transformers)
        angle = (q_start + first + rows).to(tl.float32)[:, None] * tl.load(InvFreq + freq, mask=rotary, other=0.0)[None, :]
        raw = tl.sum(tl.where(q_mask, q * tl.cos(angle) - q_half * tl.sin(angle), 0.0), axis=0)
        raw = raw / tl.sum(row_ok.to(tl.float32), axis=0)
        lane = batch_head * tl.num_programs(0) + query_block
        _select(raw, Summaries + b * stride_sb + h * stride_sh, stride_sc, stride_sd, Scores + lane * BLOCK_C,
                Chosen + lane * SLOTS, (q_start + first) // WINDOW, done, d, d_ok, SLOTS, BLOCK_C, TILE_C)

    @triton.jit
    def _block_kernel(
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
        """One program per (query block, batch x query head); the block's chunks were chosen beforehand."""
        query_block = tl.program_id(0)
        batch_head = tl.program_id(1)
        b = batch_head // q_heads
        h = batch_head % q_heads
        kv_h = h // group
        first = query_block * block  # a block never straddles chunks (block divides w)
        rows = tl.arange(0, BLOCK_M)
        row_ok = (rows < block) & (first + rows < q_len)
        chunk = (q_start + first) // WINDOW
        into_chunk = q_start + first + rows - chunk * WINDOW
        d, d_ok, rotary, partner, sign, freq = _rope_lanes(HEAD_DIM, ROT_HALF, BLOCK_D)

        q_rows = Q + b * stride_qb + h * stride_qh + (first + rows)[:, None] * stride_qm
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_rows + d[None, :] * stride_qd, mask=q_mask, other=0.0)
        q_half = tl.load(q_rows + partner[None, :] * stride_qd, mask=q_mask, other=0.0) * sign[None, :].to(q.dtype)
        out = _attend_chosen(
            q, q_half, Chosen + b * stride_cb + h * stride_ch + query_block * stride_cg, stride_cs, chunk, into_chunk,
            K + b * stride_kb + kv_h * stride_kh, stride_kn, stride_kd, V + b * stride_vb + kv_h * stride_vh,
            stride_vn, stride_vd, kv_len, Cos, Sin, stride_table, scale_log2, d, d_ok, freq, rotary,
            WINDOW, SLOTS, BLOCK_M, BLOCK_N, BLOCK_D, IEEE,
        )
        out_rows = Out + b * stride_ob + h * stride_oh + (first + rows)[:, None] * stride_om
        tl.store(out_rows + d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _token_kernel(
        Q, K, V, Out, Summaries, Scores, Chosen, InvFreq, Cos, Sin,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_sb, stride_sh, stride_sc, stride_sd,
        stride_table,
        kv_len, q_start, q_heads, group, done, scale_log2,
        WINDOW: tl.constexpr, SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, TILE_C: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Per-token selection and attention in one program per (query, batch x query head): a decoding step is one
        launch per layer. Chosen [L, B*Hq, K] receives the chunks, Scores [L, B*Hq, BLOCK_C] is scratch."""
        row = tl.program_id(0)
        batch_head = tl.program_id(1)
        lane = row * tl.num_programs(1) + batch_head
        b = batch_head // q_heads
        h = batch_head % q_heads
        kv_h = h // group
        pos = q_start + row
        chunk = pos // WINDOW
        d, d_ok, rotary, partner, sign, freq = _rope_lanes(HEAD_DIM, ROT_HALF, BLOCK_D)

        # selection scores the query WITHOUT RoPE: turn it back by its position (float32 angles, as transformers)
        q_ptr = Q + b * stride_qb + h * stride_qh + row * stride_qm
        q = tl.load(q_ptr + d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        q_half = tl.load(q_ptr + partner * stride_qd, mask=d_ok, other=0.0).to(tl.float32) * sign
        angle = pos.to(tl.float32) * tl.load(InvFreq + freq, mask=rotary, other=0.0)
        raw = q * tl.cos(angle) - q_half * tl.sin(angle)
        chosen_row = Chosen + lane * SLOTS
        _select(raw, Summaries + b * stride_sb + h * stride_sh, stride_sc, stride_sd, Scores + lane * BLOCK_C,
                chosen_row, chunk, done, d, d_ok, SLOTS, BLOCK_C, TILE_C)
        tl.debug_barrier()

        # the attention reuses the block path with 16 copies of the query (tl.dot needs 16 rows); row 0 is stored
        rows = tl.arange(0, 16)
        q_rows = q_ptr + rows[:, None] * 0
        q16 = tl.load(q_rows + d[None, :] * stride_qd, mask=d_ok[None, :], other=0.0).to(tl.float32)
        q16_half = tl.load(q_rows + partner[None, :] * stride_qd, mask=d_ok[None, :], other=0.0).to(tl.float32) * sign[None, :]
        into_chunk = pos - chunk * WINDOW + rows * 0
        out = _attend_chosen(
            q16, q16_half, chosen_row, 1, chunk, into_chunk,
            K + b * stride_kb + kv_h * stride_kh, stride_kn, stride_kd, V + b * stride_vb + kv_h * stride_vh,
            stride_vn, stride_vd, kv_len, Cos, Sin, stride_table, scale_log2, d, d_ok, freq, rotary,
            WINDOW, SLOTS, 16, BLOCK_N, BLOCK_D, IEEE,
        )
        out_rows = Out + b * stride_ob + h * stride_oh + row * stride_om + rows[:, None] * 0
        tl.store(out_rows + d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=(rows == 0)[:, None] & d_ok[None, :])


def triton_block_selection(
    query: torch.Tensor, summaries: torch.Tensor, q_start: int, block: int, window: int, slots: int, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Chunks for each block of `block` queries [B, Hq, L, D] at positions q_start..: [B, Hq, blocks, K] int32, as
    attention.block_selection computes them (summaries [B, Hq, done, D] float32)."""
    batch, q_heads, q_len, dim = query.shape
    blocks, done = -(-q_len // block), summaries.shape[2]
    block_c = max(16, triton.next_power_of_2(done))
    scores = torch.empty(batch * q_heads * blocks, block_c, dtype=torch.float32, device=query.device)
    chosen = torch.empty(batch, q_heads, blocks, slots, dtype=torch.int32, device=query.device)
    _select_block_kernel[(blocks, batch * q_heads)](
        query, summaries, scores, chosen, inv_freq, *query.stride(), *summaries.stride(),
        q_len, q_start, q_heads, block, done,
        WINDOW=window, SLOTS=slots, HEAD_DIM=dim, ROT_HALF=inv_freq.numel(),
        BLOCK_M=triton.next_power_of_2(block), BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_C=block_c, TILE_C=min(block_c, 64), num_warps=4,
    )
    return chosen


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
    _block_kernel[grid](
        query, keys, values, out, chosen, cos, sin,
        *query.stride(), *keys.stride(), *values.stride(), *out.stride(), *chosen.stride(), cos.stride(0),
        q_len, keys.shape[2], q_start, q_heads, q_heads // keys.shape[1], block, scaling * 1.4426950408889634,
        WINDOW=window, SLOTS=slots, HEAD_DIM=dim, ROT_HALF=cos.shape[1],
        BLOCK_M=block_m, BLOCK_N=min(64, triton.next_power_of_2(window)), BLOCK_D=block_d,
        IEEE=query.dtype == torch.float32,
        num_warps=8 if block_d >= 128 else 4, num_stages=2,
    )


def triton_token_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    summaries: torch.Tensor,
    q_start: int,
    window: int,
    slots: int,
    inv_freq: torch.Tensor,
    table: tuple[torch.Tensor, torch.Tensor],
    scaling: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Per-token LongHeads (selection and attention fused) for `query` [B, Hq, L, D] at positions q_start.., written
    into `out` [B, L, Hq, D]. summaries [B, Hq, done, D] float32. Returns the chosen chunks [B, Hq, L, K]."""
    batch, q_heads, q_len, dim = query.shape
    done = summaries.shape[2]
    cos, sin = table
    block_c = max(16, triton.next_power_of_2(done))
    scores = torch.empty(q_len, batch * q_heads, block_c, dtype=torch.float32, device=query.device)
    chosen = torch.empty(q_len, batch * q_heads, slots, dtype=torch.int32, device=query.device)
    _token_kernel[(q_len, batch * q_heads)](
        query, keys, values, out, summaries, scores, chosen, inv_freq, cos, sin,
        *query.stride(), *keys.stride(), *values.stride(), *out.stride(), *summaries.stride(), cos.stride(0),
        keys.shape[2], q_start, q_heads, q_heads // keys.shape[1], done, scaling * 1.4426950408889634,
        WINDOW=window, SLOTS=slots, HEAD_DIM=dim, ROT_HALF=cos.shape[1],
        BLOCK_N=min(64, triton.next_power_of_2(window)), BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_C=block_c, TILE_C=min(block_c, 64), IEEE=query.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return chosen.view(q_len, batch, q_heads, slots).permute(1, 2, 0, 3)


def triton_select(*args, **kwargs):  # placeholder until the generic kernel lands
    raise NotImplementedError


def triton_attend(*args, **kwargs):  # placeholder until the generic kernel lands
    raise NotImplementedError
