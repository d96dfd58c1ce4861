"""Attention over the chosen blocks and the recent span, as laid out by a `Geometry` (see geometry.py): two of the
three interchangeable kernels (the third, "triton", is triton_kernel.py). Each takes the queries of one run
[B, Hq, L, D] at positions q_start.., the layer's whole cache [B, Hkv, N, D] (RoPE'd at absolute positions, as
transformers hands it over; possibly in host memory), and `chosen` [B, units, groups, slots]: the far blocks (sink,
then retrieved) of every group of `block` queries, for each selection unit (query head, key/value head or layer;
see selection.py). No slots means a dense group: every earlier token is in its recent span. Both return the output
[B, Hq, L, D] and its log-sum-exp [B, Hq, L] (float32, or float64 for a float64 model), which InfLLM's summaries need.

* `attend_reference`: the plain formulation, the tests' yardstick: gather every attended key, turn the query (and for
  the one-distance layout the keys) so that each score sees the key at its assigned distance, einsum, softmax.
* `attend_torch` (the CPU fast path, stock torch): the same softmax in parts merged by log-sum-exp (merge.py), each a
  fused attention call: the recent span read in place from the cache (overlapping windows, one per run of queries
  sharing it), the far blocks gathered already turned (see `FarBlocks`) into buffers the sequence keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx.methods.merge import attention_with_lse, merge
from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.rope import rotate

# elements of far keys (and as many values) the torch kernel gathers per batch of query groups (64 MB in float32, in
# buffers allocated once per sequence): large batches mean few operations, and on a busy CPU each costs milliseconds
TORCH_WORKING_SET = 2**24
# blocks (x batch x kv heads) rotated at once into the torch kernel's slot copies: bounds their temporaries
SLOT_COPY_BLOCKS = 256


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
    precision = torch.promote_types(query.dtype, torch.float32)
    lse = torch.empty(batch, q_heads, groups, block, dtype=precision, device=device)
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
        lse[:, :, group] = scores.to(precision).logsumexp(dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=precision).to(values.dtype)
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
    workspace: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock-torch kernel (see the module docstring): (out [B, Hq, L, D], lse [B, Hq, L]).

    Queries come in spans: aligned runs of max(block, w) that share one recent span (from block m to the span's
    end). Whole spans are batched (their masks are the same); a partial span at either end of the run goes alone.
    The softmax comes in parts merged by log-sum-exp: the recent span, read in place (and, at one distance, its
    tokens beyond the local window), and the far blocks, gathered.
    Everything that does not depend on the batch (the turned queries, the retrieved blocks' rows, the masks) is
    computed once per call: on a busy 2-core CPU each operation costs milliseconds whatever its size. `workspace`
    (the sequence's cache keeps one) holds the large buffers from one layer to the next.
    """
    batch, q_heads, q_len, dim = query.shape
    window, local, slots = geometry.window, geometry.local, chosen.shape[-1]
    span = max(block, window)
    if slots and chosen.shape[1] == 1:
        chosen = chosen.expand(batch, keys.shape[1], *chosen.shape[2:])  # one selection per layer: every kv head reads it
    positions = q_start + torch.arange(q_len, device=query.device)
    group_start = q_start + torch.arange(q_len, device=query.device) // block * block
    q_far = far = None
    if geometry.one_distance is not None:
        q_far = _at_one_distance(query, positions, geometry, inv_freq)
    elif slots:  # the query ends the recent span, after the far slots: moved (slots - m) blocks on
        first = torch.clamp((group_start - local) // window, min=0)
        q_far = turn(query, (slots - first) * window, inv_freq)
    if slots:
        far = FarBlocks(keys, values, chosen, geometry, inv_freq, workspace)
    per_span_keys = batch * chosen.shape[1] * (span // block) * max(1, slots) * window * dim
    per_batch = 1 if slots == 0 else max(1, TORCH_WORKING_SET // per_span_keys)
    masks: dict[tuple, tuple] = {}
    out = torch.empty_like(query)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.promote_types(query.dtype, torch.float32), device=query.device)
    position, end = q_start, q_start + q_len
    while position < end:
        span_start = position // span * span
        whole = (end - span_start) // span if position == span_start and span_start + span <= keys.shape[2] else 0
        spans = max(1, min(whole, per_batch))
        stop = min(end, span_start + spans * span)
        rows = slice(position - q_start, stop - q_start)
        parts = _recent_attention(query[:, :, rows], None if q_far is None else q_far[:, :, rows], keys, values,
                                  span_start, position, spans, span, slots == 0, geometry, inv_freq, scaling, masks)
        if far is not None:
            groups = slice((position - q_start) // block, -(-(stop - q_start) // block))
            parts.append(_far_attention(q_far[:, :, rows], far, groups, block, scaling))
        out[:, :, rows], lse[:, :, rows] = merge(parts)
        position = stop
    return out, lse


def _recent_attention(
    query: torch.Tensor, q_far: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, span_start: int,
    q_start: int, spans: int, span: int, dense: bool, geometry: Geometry, inv_freq: torch.Tensor, scaling: float,
    masks: dict,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Attention of the rows from q_start of `spans` spans from span_start to their recent span, as parts to merge
    ([B, Hq, rows, D], [B, Hq, rows]): at true positions, and for the one-distance layout beyond the local window at
    the one distance (q_far: the queries turned there)."""
    batch, q_heads, rows, dim = query.shape
    window, local = geometry.window, geometry.local
    per_span = rows // spans  # == span when several spans come together
    lead = q_start - span_start  # rows of the (single) span before the first query
    # the recent span of a span's queries starts `back` tokens before the span: `local` in whole blocks, or at 0
    back = span_start if dense else span_start - max(0, span_start - local) // window * window
    width = back + span
    lo, hi = span_start - back, span_start - back + (spans - 1) * span + width
    source_k, source_v = keys[:, :, lo : min(hi, keys.shape[2])], values[:, :, lo : min(hi, keys.shape[2])]
    if hi > keys.shape[2]:  # only a last, partial span reaches past the cache
        source_k, source_v = (F.pad(t, (0, 0, 0, hi - keys.shape[2])) for t in (source_k, source_v))
    # one window of back + span tokens per span: views into the cache (overlapping, no copy)
    k_win = source_k.to(query.device).unfold(2, width, span).transpose(-1, -2)  # [B, Hkv, n, width, D]
    v_win = source_v.to(query.device).unfold(2, width, span).transpose(-1, -2)
    reach = back + span - local if geometry.one_distance is not None else 0  # tokens some query sees beyond its window
    key = (back, lead, per_span, width)
    if key not in masks:
        distance = (back + lead + torch.arange(per_span, device=query.device))[:, None] - torch.arange(width, device=query.device)
        near = (distance >= 0) & (distance < local if geometry.one_distance is not None else True)
        masks[key] = (_mask(near, query), _mask(distance[:, :reach] >= local, query) if reach > 0 else None)
    near_mask, far_mask = masks[key]
    q = query.view(batch, q_heads, spans, per_span, dim)
    parts = [_shared_attention(q, k_win, v_win, near_mask, scaling)]
    if reach > 0:  # beyond the local window, the same tokens without RoPE, seen by the query at the one distance
        key_positions = lo + torch.arange(spans, device=query.device)[:, None] * span + torch.arange(reach, device=query.device)
        k_raw = rotate(k_win[:, :, :, :reach], -key_positions, inv_freq)
        parts.append(_shared_attention(q_far.view(batch, q_heads, spans, per_span, dim), k_raw, v_win[:, :, :, :reach],
                                       far_mask, scaling))
    return [(o.reshape(batch, q_heads, rows, dim), l.reshape(batch, q_heads, rows)) for o, l in parts]


def _mask(visible: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(additive float mask [r, s], the rows it hides every key from, or None)."""
    additive = torch.zeros(visible.shape, dtype=like.dtype, device=like.device).masked_fill_(~visible, float("-inf"))
    blind = ~visible.any(dim=-1)
    return additive, (blind if bool(blind.any()) else None)


def _shared_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: tuple | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query head of a key/value head over the same keys: q [B, Hq, n, r, D], k/v [B, Hkv, n, s, D], mask from
    `_mask` ([r, s], the same for every span) or None. A GQA group's heads are stacked along the query axis (keys not
    copied)."""
    batch, q_heads, spans, rows, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[3]
    group = q_heads // kv_heads
    additive, blind = mask if mask is not None else (None, None)
    stacked = q.view(batch, kv_heads, group, spans, rows, dim).transpose(2, 3).reshape(batch * kv_heads, spans, group * rows, dim)
    out, lse = attention_with_lse(stacked, k.reshape(batch * kv_heads, spans, keys, dim),
                                  v.reshape(batch * kv_heads, spans, keys, dim),
                                  None if additive is None else additive.repeat(group, 1), scaling,
                                  blind=None if blind is None else blind.repeat(group))
    out = out.view(batch, kv_heads, spans, group, rows, dim).transpose(2, 3).reshape(batch, q_heads, spans, rows, dim)
    return out, lse.view(batch, kv_heads, spans, group, rows).transpose(2, 3).reshape(batch, q_heads, spans, rows)


def _far_attention(
    q_far: torch.Tensor, far: "FarBlocks", groups: slice, block: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries [B, Hq, rows, D] (turned as the layout wants, the first one starting a group) to their
    groups' far blocks: (out [B, Hq, rows, D], lse [B, Hq, rows])."""
    batch, q_heads, rows, dim = q_far.shape
    units, slots, window = far.units, far.slots, far.window
    count = groups.stop - groups.start
    per_unit = q_heads // units
    k_far, v_far = far.gather(groups, q_far.device)  # [B * U * G * S, w * D] each
    q = F.pad(q_far, (0, 0, 0, count * block - rows))  # the last group of a run may be partial
    if per_unit > 1:  # a unit's heads stacked along the query axis
        q = q.view(batch, units, per_unit, count, block, dim).transpose(2, 3)
    q = q.reshape(batch * units, count, per_unit * block, dim)
    out, lse = attention_with_lse(q, k_far.view(batch * units, count, slots * window, dim),
                                  v_far.view(batch * units, count, slots * window, dim), None, scaling)
    if per_unit > 1:
        out = out.view(batch, units, count, per_unit, block, dim).transpose(2, 3)
        lse = lse.view(batch, units, count, per_unit, block).transpose(2, 3)
    return out.reshape(batch, q_heads, -1, dim)[:, :, :rows], lse.reshape(batch, q_heads, -1)[:, :, :rows]


class FarBlocks:
    """The far blocks of one call (`chosen` [B, U, G, S]: sink, then retrieved), gathered already turned to where the
    layout puts them: block c in slot i rotated by (i - c) * w (consecutive; the query then turned once per group), or
    to no RoPE (one distance).

    How they are turned is chosen here, once: when a call gathers more keys than the layer's cache holds (a prefill),
    each retrieved slot gets a rotated copy of the cache's blocks and the picks are read from those copies (top_k
    rotations of the cache instead of one per pick; sink slot i always holds block i, unmoved); a decoding step
    rotates the few blocks it gathers. Both apply the same rotation to the same keys, so prefill and decoding agree to
    the last bit. The copies and the buffers the picks are gathered into live in `workspace` from one layer to the
    next: allocated once, not paid in page faults per layer.
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, chosen: torch.Tensor, geometry: Geometry, inv_freq: torch.Tensor,
        workspace: dict[str, torch.Tensor] | None,
    ) -> None:
        batch, kv_heads, length, dim = keys.shape
        self.geometry, self.inv_freq, self.window, self.chosen = geometry, inv_freq, geometry.window, chosen
        self.units, self.slots = chosen.shape[1], chosen.shape[-1]
        self.workspace = {} if workspace is None else workspace
        self.key_rows, per_head = _block_rows(keys, self.window)
        self.value_rows, _ = _block_rows(values, self.window)
        head = (torch.arange(batch, device=chosen.device)[:, None] * kv_heads
                + torch.arange(self.units, device=chosen.device) // (self.units // kv_heads))  # [B, U]: batch x kv head
        self.rows = (head * per_head)[:, :, None, None] + chosen  # [B, U, G, S]: blocks of the cache
        self.copies = None
        retrieved = chosen.numel() * geometry.top_k // max(1, self.slots)
        if geometry.one_distance is None and retrieved * self.window > geometry.top_k * kv_heads * length * batch:
            heads = batch * kv_heads
            self.copies = self._slot_copies(keys, per_head)
            slot = torch.arange(self.slots, device=chosen.device)
            in_copy = (slot - geometry.sink) * (heads * per_head) + self.rows  # a retrieved slot reads its copy,
            in_sink = geometry.top_k * heads * per_head + (head * geometry.sink)[:, :, None, None] + chosen  # a sink slot its block
            self.copy_rows = torch.where(slot >= geometry.sink, in_copy, in_sink)

    def _slot_copies(self, keys: torch.Tensor, per_head: int) -> torch.Tensor:
        """Rows [top_k * B * Hkv * per_head + B * Hkv * sink, w * D]: every complete block turned into each retrieved
        slot, then the sink blocks as cached."""
        geometry, window = self.geometry, self.window
        batch, kv_heads, length, dim = keys.shape
        complete, heads = length // window, batch * kv_heads
        per_slot = heads * per_head
        copies = self._buffer("slot_copies", geometry.top_k * per_slot + heads * geometry.sink, window * dim, keys)
        retrieved = copies[: geometry.top_k * per_slot].view(geometry.top_k, heads, per_head, window, dim)
        blocks = keys[:, :, : complete * window].reshape(heads, complete, window, dim)
        step = max(1, SLOT_COPY_BLOCKS // heads)  # blocks turned at once: bounded temporaries
        for first in range(0, complete, step):
            last = min(complete, first + step)
            start = torch.arange(first, last, device=keys.device)[:, None] * window
            for index in range(geometry.top_k):
                turn(blocks[:, first:last], (geometry.sink + index) * window - start, self.inv_freq,
                     out=retrieved[index, :, first:last])
        copies[geometry.top_k * per_slot :].view(heads, geometry.sink, window * dim).copy_(
            blocks[:, : geometry.sink].reshape(heads, geometry.sink, window * dim)
        )
        return copies

    def gather(self, groups: slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the far blocks of `groups`, turned for the layout: [B * U * G * S, w * D] each."""
        if self.copies is not None:
            keys = self._select("keys", self.copies, self.copy_rows[:, :, groups]).to(device)
        else:
            keys = self._select("keys", self.key_rows, self.rows[:, :, groups]).to(device)
            chosen = self.chosen[:, :, groups].to(device)
            keys = self.turn(keys.view(*chosen.shape, self.window, -1), chosen).view(-1, keys.shape[1])
        return keys, self._select("values", self.value_rows, self.rows[:, :, groups]).to(device)

    def turn(self, keys: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Gathered blocks [B, U, G, S, w, D] as cached -> where the layout puts them."""
        window = self.window
        if self.geometry.one_distance is not None:  # no RoPE: each key turned back by its position
            return turn(keys, -(chosen[..., None] * window + torch.arange(window, device=keys.device)), self.inv_freq)
        slot = torch.arange(self.slots, device=keys.device)
        return turn(keys, ((slot - chosen) * window)[..., None], self.inv_freq)

    def _buffer(self, name: str, rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """A buffer of at least `rows` rows from the workspace, grown (never shrunk) as the sequence grows."""
        buffer = self.workspace.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != width or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.workspace[name] = torch.empty(max(rows, 5 * (0 if buffer is None else buffer.shape[0]) // 4),
                                                        width, dtype=like.dtype, device=like.device)
        return buffer[:rows]

    def _select(self, name: str, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """index_select of rows into a workspace buffer."""
        index = index.reshape(-1).to(source.device)
        return torch.index_select(source, 0, index, out=self._buffer(name, index.numel(), source.shape[1], source))


def turn(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`rope.rotate` (the same products and sums, so the same bits) with half the temporaries, optionally into `out`:
    the torch kernel's slot copies are a third of a prefill's elementwise work."""
    half = inv_freq.numel()
    angles = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=torch.float32)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    shape = torch.broadcast_shapes(x.shape, (*cos.shape[:-1], x.shape[-1]))
    out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    first, second = x[..., :half], x[..., half : 2 * half]
    torch.mul(first, cos, out=out[..., :half]).sub_(second * sin)
    torch.mul(second, cos, out=out[..., half : 2 * half]).add_(first * sin)
    if x.shape[-1] > 2 * half:
        out[..., 2 * half :] = x[..., 2 * half :]
    return out


def _block_rows(cache: torch.Tensor, window: int) -> tuple[torch.Tensor, int]:
    """(rows [B * Hkv * blocks_per_head, w * D], blocks_per_head): the cache's blocks as rows. The retrieval cache
    grows by whole blocks, so its store holds a whole number of them per (batch, kv head): a view then, else a copy
    of the complete blocks."""
    batch, kv_heads, length, dim = cache.shape
    head_stride = cache.stride(1)
    if cache.stride(3) == 1 and cache.stride(2) == dim and head_stride % (window * dim) == 0 and (
        batch == 1 or cache.stride(0) == kv_heads * head_stride
    ):
        per_head = head_stride // (window * dim)
        return cache.as_strided((batch * kv_heads * per_head, window * dim), (window * dim, 1)), per_head
    complete = length // window
    return cache[:, :, : complete * window].reshape(batch * kv_heads * complete, window * dim), complete
