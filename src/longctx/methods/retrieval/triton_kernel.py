"""Retrieval attention as Triton kernels (GPU; kernels.py holds the PyTorch reference and CPU path).

`triton_attend`: one program per (tile of at most 64 query rows of one group, batch x query head), FlashAttention-2's
online softmax (`m_i`, `l_i`, `acc`) over
  * the group's far blocks, read straight from the cache (no gathered copy): in consecutive slots the query is turned
    back by n * w once per slot (a RoPE score depends only on the rotation between query and key; n = m - c -
    (S - i), cos/sin from a float64-built table indexed by n); at one distance every key tile is turned back to no
    RoPE by its position and the query is turned to the distance once;
  * the recent span, block m up to the query's block, read in place: at true positions (causal), and for the
    one-distance layout its tokens beyond the local window a second time, at the distance.
It writes the output in the layout the model wants and the log-sum-exp InfLLM's summaries need.
`triton_select`: one program per (group, batch x selection unit): the mean query without RoPE of each of the unit's
heads (turned to the distance when the summaries are keys without RoPE), scores against the summaries summed over the
unit's heads, top-k among the blocks between the sink and the recent span by repeated argmax, in original order.
"""

from __future__ import annotations

import math

import torch

from longctx.methods.retrieval.geometry import Geometry

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU paths in kernels.py need no Triton
    triton = None


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def shift_table(inv_freq: torch.Tensor, window: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of a shift by n blocks, [rows, rotary_dim / 2] float32, n = 0..rows-1.

    Angles n * w * f reach 1e5 radians at 128k tokens; computing them in float64 keeps the table exact to float32.
    """
    angles = torch.arange(rows, dtype=torch.float64, device=device)[:, None] * window * inv_freq.to(device, torch.float64)
    return angles.cos().float().contiguous(), angles.sin().float().contiguous()


if triton is not None:

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
    def _turn(x, x_half, angle):
        """Rotate RoPE rows x by `angle` (radians per lane, [rows, lanes]): x_half is rotate_half(x). Returns
        (rotated, rotate_half(rotated)), both float32."""
        cos, sin = tl.cos(angle), tl.sin(angle)
        return x * cos + x_half * sin, x_half * cos - x * sin

    @triton.jit
    def _online(s, v, visible, m_i, l_i, acc, IEEE: tl.constexpr):
        """One FlashAttention-2 step: scores s [M, N] (log2 units) over values v [N, D], keys hidden where not visible."""
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays empty
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _dot(q, k, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(q, tl.trans(k), input_precision="ieee")
        return tl.dot(q, tl.trans(k))

    @triton.jit
    def _attend_kernel(
        Q, K, V, Out, Lse, Chosen, Cos, Sin, InvFreq,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_cb, stride_cu, stride_cg, stride_cs,
        stride_table,
        q_len, kv_len, q_start, q_heads, kv_group, per_unit, block, scale_log2, lse_scale,
        WINDOW: tl.constexpr, SLOTS: tl.constexpr, LOCAL: tl.constexpr, DISTANCE: tl.constexpr,
        ONE_DISTANCE: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        tile = tl.program_id(0)
        batch_head = tl.program_id(1)
        b = batch_head // q_heads
        h = batch_head % q_heads
        k_base = K + b * stride_kb + (h // kv_group) * stride_kh
        v_base = V + b * stride_vb + (h // kv_group) * stride_vh
        first = tile * ROWS  # a tile never straddles groups (ROWS divides the group size)
        group = first // block
        group_start = q_start + group * block
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = (tl.arange(0, BLOCK_M) < ROWS) & (rows < q_len)
        t = q_start + rows  # the queries' positions
        d, d_ok, rotary, partner, sign, freq = _rope_lanes(HEAD_DIM, ROT_HALF, BLOCK_D)
        inv_freq = tl.load(InvFreq + freq, mask=rotary, other=0.0)
        q_ptr = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + d[None, :] * stride_qd, mask=q_mask, other=0.0)
        q_half = tl.load(q_ptr + partner[None, :] * stride_qd, mask=q_mask, other=0.0) * sign[None, :].to(q.dtype)
        if SLOTS > 0:
            recent = tl.maximum(group_start - LOCAL, 0) // WINDOW
        else:
            recent = 0
        if ONE_DISTANCE:
            # the query without RoPE (turned back by its position), then at the one distance
            raw, raw_half = _turn(q.to(tl.float32), q_half.to(tl.float32), -t.to(tl.float32)[:, None] * inv_freq[None, :])
            q_far, _ = _turn(raw, raw_half, DISTANCE * inv_freq[None, :])
            q_far = (q_far * scale_log2).to(k_base.dtype.element_ty)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        chosen_base = Chosen + b * stride_cb + (h // per_unit) * stride_cu + group * stride_cg
        for slot in range(SLOTS):
            c = tl.load(chosen_base + slot * stride_cs)
            if not ONE_DISTANCE:
                n = recent - c - (SLOTS - slot)  # blocks the key moves toward the query, >= 0
                cos = tl.load(Cos + n * stride_table + freq, mask=rotary, other=1.0)
                sin = tl.load(Sin + n * stride_table + freq, mask=rotary, other=0.0)
                # rotate the query back by n * w (scaled for exp2): the same score as moving every key forward
                q_slot = ((q.to(tl.float32) * cos[None, :] - q_half.to(tl.float32) * sin[None, :]) * scale_log2)
                q_slot = q_slot.to(k_base.dtype.element_ty)
            for start in range(0, WINDOW, BLOCK_N):
                offset = start + tl.arange(0, BLOCK_N)
                x = c * WINDOW + offset
                k_ok = (x < kv_len) & (offset < WINDOW)
                kv_mask = k_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + x[:, None] * stride_kn + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
                v = tl.load(v_base + x[:, None] * stride_vn + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
                if ONE_DISTANCE:
                    k_half = tl.load(k_base + x[:, None] * stride_kn + partner[None, :] * stride_kd, mask=kv_mask, other=0.0)
                    k_raw, _ = _turn(k.to(tl.float32), k_half.to(tl.float32) * sign[None, :], -x.to(tl.float32)[:, None] * inv_freq[None, :])
                    s = _dot(q_far, k_raw.to(k.dtype), IEEE)
                else:
                    s = _dot(q_slot, k, IEEE)
                m_i, l_i, acc = _online(s, v, k_ok[None, :] & row_ok[:, None], m_i, l_i, acc, IEEE)
        # the recent span: blocks `recent` .. the last row's block, in place
        q_near = (q.to(tl.float32) * scale_log2).to(k_base.dtype.element_ty)
        last = (q_start + tl.minimum(first + ROWS, q_len) - 1) // WINDOW
        for c in range(recent, last + 1):
            for start in range(0, WINDOW, BLOCK_N):
                offset = start + tl.arange(0, BLOCK_N)
                x = c * WINDOW + offset
                k_ok = (x < kv_len) & (offset < WINDOW)
                kv_mask = k_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + x[:, None] * stride_kn + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
                v = tl.load(v_base + x[:, None] * stride_vn + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
                distance = t[:, None] - x[None, :]
                visible = k_ok[None, :] & row_ok[:, None] & (distance >= 0)
                if ONE_DISTANCE:
                    m_i, l_i, acc = _online(_dot(q_near, k, IEEE), v, visible & (distance < LOCAL), m_i, l_i, acc, IEEE)
                    k_half = tl.load(k_base + x[:, None] * stride_kn + partner[None, :] * stride_kd, mask=kv_mask, other=0.0)
                    k_raw, _ = _turn(k.to(tl.float32), k_half.to(tl.float32) * sign[None, :], -x.to(tl.float32)[:, None] * inv_freq[None, :])
                    m_i, l_i, acc = _online(_dot(q_far, k_raw.to(k.dtype), IEEE), v, visible & (distance >= LOCAL), m_i, l_i, acc, IEEE)
                else:
                    m_i, l_i, acc = _online(_dot(q_near, k, IEEE), v, visible, m_i, l_i, acc, IEEE)
        l_i = tl.where(row_ok, l_i, 1.0)  # rows past the run: nothing to normalise
        out = acc / l_i[:, None]
        out_ptr = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om
        tl.store(out_ptr + d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=q_mask)
        tl.store(Lse + batch_head * q_len + rows, (m_i + tl.log2(l_i)) * lse_scale, mask=row_ok)

    @triton.jit
    def _select_kernel(
        Q, Summaries, Means, Scores, Chosen, InvFreq,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_sb, stride_sh, stride_sc, stride_sd,
        q_len, q_start, q_heads, units, block, done,
        WINDOW: tl.constexpr, SINK: tl.constexpr, TOP_K: tl.constexpr, LOCAL: tl.constexpr, DISTANCE: tl.constexpr,
        AT_DISTANCE: tl.constexpr, PER_UNIT: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, TILE_C: tl.constexpr,
    ):
        """Chosen [B, U, groups, SINK + TOP_K]; Means [B * U * groups, PER_UNIT, BLOCK_D] and Scores [.., BLOCK_C] are
        scratch through which the heads' mean queries and the scores, computed tile by tile, become vectors."""
        group = tl.program_id(0)
        batch_unit = tl.program_id(1)
        b = batch_unit // units
        unit = batch_unit % units
        lane = batch_unit * tl.num_programs(0) + group
        group_start = q_start + group * block
        d, d_ok, rotary, partner, sign, freq = _rope_lanes(HEAD_DIM, ROT_HALF, BLOCK_D)
        inv_freq = tl.load(InvFreq + freq, mask=rotary, other=0.0)
        count = tl.minimum(block, q_len - group * block).to(tl.float32)
        for i in range(PER_UNIT):  # each head's mean query without RoPE (at the distance if the summaries want it)
            h = unit * PER_UNIT + i
            mean = tl.zeros([BLOCK_D], dtype=tl.float32)
            for first in range(0, block, BLOCK_M):
                rows = group * block + first + tl.arange(0, BLOCK_M)
                row_ok = (first + tl.arange(0, BLOCK_M) < block) & (rows < q_len)
                q_rows = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm
                q_mask = row_ok[:, None] & d_ok[None, :]
                q = tl.load(q_rows + d[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32)
                q_half = tl.load(q_rows + partner[None, :] * stride_qd, mask=q_mask, other=0.0).to(tl.float32) * sign[None, :]
                # selection uses queries WITHOUT RoPE: turn each back by its position (float32 angles, as transformers)
                raw, raw_half = _turn(q, q_half, -(q_start + rows).to(tl.float32)[:, None] * inv_freq[None, :])
                if AT_DISTANCE:
                    raw, _ = _turn(raw, raw_half, DISTANCE * inv_freq[None, :])
                mean += tl.sum(tl.where(q_mask, raw, 0.0), axis=0)
            tl.store(Means + (lane * PER_UNIT + i) * BLOCK_D + d, mean / count)
        tl.debug_barrier()
        recent = tl.maximum(group_start - LOCAL, 0) // WINDOW
        score_row = Scores + lane * BLOCK_C
        for c0 in range(0, BLOCK_C, TILE_C):
            c_tile = c0 + tl.arange(0, TILE_C)
            score = tl.zeros([TILE_C], dtype=tl.float32)
            for i in range(PER_UNIT):
                h = unit * PER_UNIT + i
                mean = tl.load(Means + (lane * PER_UNIT + i) * BLOCK_D + d)
                summary = tl.load(
                    Summaries + b * stride_sb + h * stride_sh + c_tile[:, None] * stride_sc + d[None, :] * stride_sd,
                    mask=(c_tile < done)[:, None] & d_ok[None, :], other=0.0,
                )
                score += tl.sum(summary * mean[None, :], axis=1)
            tl.store(score_row + c_tile, tl.where((c_tile >= SINK) & (c_tile < recent), score, float("-inf")))
        tl.debug_barrier()
        c_all = tl.arange(0, BLOCK_C)
        scores = tl.load(score_row + c_all)
        picked = c_all < 0
        for _ in range(TOP_K):  # one argmax at a time
            hit = c_all == tl.argmax(scores, axis=0)
            picked = picked | hit
            scores = tl.where(hit, float("-inf"), scores)
        # retrieved blocks in original order: a pick's slot is SINK - 1 + the number of picks up to it
        order = tl.cumsum(picked.to(tl.int32), axis=0)
        chosen_row = Chosen + lane * (SINK + TOP_K)
        tl.store(chosen_row + SINK - 1 + order, c_all, mask=picked)
        sink = tl.arange(0, BLOCK_C)
        tl.store(chosen_row + sink, sink, mask=sink < SINK)


def _rows_per_program(block: int) -> int:
    """Query rows of one program: a whole group when it has at most 64 rows, else a tile that divides it."""
    return block if block <= 64 else math.gcd(block, 64)


def triton_attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor, q_start: int, block: int,
    geometry: Geometry, inv_freq: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor], scaling: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write retrieval attention for `query` [B, Hq, L, D] (positions q_start.., groups of `block` from q_start) into
    `out` [B, L, Hq, D]; return its log-sum-exp [B, Hq, L] float32.

    keys/values [B, Hkv, N, D] any strides (the cache itself); chosen [B, U, groups, S] far blocks per selection unit
    (S = 0: dense groups); table: `shift_table` with at least N / w + 1 rows (consecutive slots).
    """
    batch, q_heads, q_len, dim = query.shape
    units, slots = chosen.shape[1], chosen.shape[-1]
    chosen = chosen.to(torch.int32).contiguous()
    cos, sin = table
    rows = _rows_per_program(block)
    block_m = max(16, triton.next_power_of_2(rows))
    block_d = max(16, triton.next_power_of_2(dim))
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    grid = (-(-q_len // block) * (block // rows), batch * q_heads)
    if chosen.numel() == 0:  # a dense run: the kernel never reads the selection
        chosen = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=query.device)
    _attend_kernel[grid](
        query, keys, values, out, lse, chosen, cos, sin, inv_freq,
        *query.stride(), *keys.stride(), *values.stride(), *out.stride(), *chosen.stride(), cos.stride(0),
        q_len, keys.shape[2], q_start, q_heads, q_heads // keys.shape[1], q_heads // units, block,
        scaling * 1.4426950408889634, math.log(2),
        WINDOW=geometry.window, SLOTS=slots, LOCAL=geometry.local, DISTANCE=geometry.one_distance or 0,
        ONE_DISTANCE=geometry.one_distance is not None, ROWS=rows, HEAD_DIM=dim, ROT_HALF=inv_freq.numel(),
        BLOCK_M=block_m, BLOCK_N=min(64, triton.next_power_of_2(geometry.window)), BLOCK_D=block_d,
        IEEE=query.dtype == torch.float32, num_warps=8 if block_d >= 128 else 4, num_stages=2,
    )
    return lse


def triton_select(
    query: torch.Tensor, summaries: torch.Tensor, q_start: int, block: int, geometry: Geometry, units: int,
    inv_freq: torch.Tensor, distance: int | None = None,
) -> torch.Tensor:
    """Far blocks [B, units, groups, sink + top_k] int32 of each group of `block` queries [B, Hq, L, D] at positions
    q_start.., as selection.block_selection computes them (summaries [B, Hq, done, D] float32)."""
    batch, q_heads, q_len, dim = query.shape
    groups, done = -(-q_len // block), summaries.shape[2]
    slots = geometry.sink + geometry.top_k
    block_c = max(16, triton.next_power_of_2(max(done, slots)))
    block_d = max(16, triton.next_power_of_2(dim))
    lanes = batch * units * groups
    means = torch.empty(lanes, q_heads // units, block_d, dtype=torch.float32, device=query.device)
    scores = torch.empty(lanes, block_c, dtype=torch.float32, device=query.device)
    chosen = torch.empty(batch, units, groups, slots, dtype=torch.int32, device=query.device)
    _select_kernel[(groups, batch * units)](
        query, summaries, means, scores, chosen, inv_freq, *query.stride(), *summaries.stride(),
        q_len, q_start, q_heads, units, block, done,
        WINDOW=geometry.window, SINK=geometry.sink, TOP_K=geometry.top_k, LOCAL=geometry.local,
        DISTANCE=distance or 0, AT_DISTANCE=distance is not None, PER_UNIT=q_heads // units, HEAD_DIM=dim,
        ROT_HALF=inv_freq.numel(), BLOCK_M=min(64, max(16, triton.next_power_of_2(block))), BLOCK_D=block_d,
        BLOCK_C=block_c, TILE_C=min(block_c, 64), num_warps=4,
    )
    return chosen
