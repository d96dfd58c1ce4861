"""The cache of the retrieval methods: keys and values in pages that grow by whole blocks, and per layer the block
summaries a selection reads (LongHeads' chunk summaries, InfLLM's representative keys) with what they still need
(the queries of the open chunk, the attention received by tokens not yet in a block)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def pin(tensor: torch.Tensor) -> None:
    """Page-lock a host tensor in place for fast, asynchronous copies to the GPU.

    Not `pin_memory=True`: torch's pinned allocator rounds every block up to a power of two and keeps freed blocks,
    which for a 7B model's 128k-token cache (64 buffers of 1.07 GB) asks for 128 GB of locked host memory.
    """
    cudart = torch.cuda.cudart()
    pointer = tensor.data_ptr()
    if int(cudart.cudaHostRegister(pointer, tensor.numel() * tensor.element_size(), 0)) == 0:
        weakref.finalize(tensor, cudart.cudaHostUnregister, pointer)  # else it stays pageable: slower, still right


class GrowingLayer(DynamicLayer):
    """Keys and values in a buffer that grows by whole chunks, geometrically (x1.25), instead of `DynamicLayer`'s
    concatenation, which copies the whole cache at every decoding step. `keys`/`values` are views of the filled part.

    With `host=True` (`cpu_offload`) the buffer lives in host memory, pinned when the states come from a
    GPU: `update` returns the host tensors and the attention moves what it needs to the accelerator.
    """

    def __init__(self, page: int, host: bool = False, reserve: int = 0) -> None:
        super().__init__()
        self.page, self.host, self.reserve = page, host, reserve
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.length = 0
            self.key_store = self.value_store = None
        end = self.length + key_states.shape[-2]
        if self.key_store is None or end > self.key_store.shape[-2]:
            self._grow(key_states, end)
        self.key_store[..., self.length : end, :].copy_(key_states)
        self.value_store[..., self.length : end, :].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def _grow(self, states: torch.Tensor, needed: int) -> None:
        old = 0 if self.key_store is None else self.key_store.shape[-2]
        capacity = -(-max(needed + 1, old + old // 4, self.reserve) // self.page) * self.page
        device = "cpu" if self.host else states.device
        shape = (*states.shape[:-2], capacity, states.shape[-1])
        stores = []
        for previous in (self.key_store, self.value_store):
            store = torch.empty(shape, dtype=states.dtype, device=device)
            if self.host and states.is_cuda:
                pin(store)
            if previous is not None:
                store[..., : self.length, :].copy_(previous[..., : self.length, :])
            stores.append(store)
        self.key_store, self.value_store = stores

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self.key_store[..., :length, :]
        self.values = self.value_store[..., :length, :]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self.key_store is not None:
            self._set_length(self.keys.shape[-2])

    def _adopt(self) -> None:
        """Rebuild the buffer from `keys`/`values` after an operation that replaced them (batch repeat or select)."""
        if self.is_initialized and self.keys is not None and self.keys.numel():
            self.key_store, self.value_store = self.keys.contiguous(), self.values.contiguous()
            self._set_length(self.keys.shape[-2])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the filled part of the buffer in place (`DynamicLayer`'s would leave `keys` pointing
        at a copy while later steps write to the buffer in the old order; in place also keeps a pinned buffer pinned)."""
        if self.is_initialized and self.length:
            for store in (self.key_store, self.value_store):
                filled = store[..., : self.length, :]
                filled.copy_(filled.index_select(0, beam_idx.to(store.device)))

    def reset(self) -> None:
        super().reset()
        self.length = 0
        self.key_store = self.value_store = None


@dataclass
class LayerState:
    """Block summaries of one layer and what the next ones are made from.

    keys: [batch, q_heads, done_blocks, head_dim] float32, one summary per block (LongHeads: the key summary c of each
        completed chunk; InfLLM: the mean of each memory block's representative keys, without RoPE).
    open_queries: [batch, q_heads, tokens, head_dim], RoPE'd queries of the chunk still filling up (LongHeads: its
        summary needs all of its queries, and decoding brings them one at a time).
    pending_scores: [batch, q_heads, tokens] float32, attention each token past the last summarised block has received
        from the queries whose local window holds it (InfLLM: the representative tokens are the top ones).
    """

    keys: torch.Tensor | None = None
    open_queries: torch.Tensor | None = None
    pending_scores: torch.Tensor | None = None

    @property
    def done_chunks(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def map(self, change) -> None:
        """Apply a change of the batch (a reorder, repeat or selection of sequences) to every tensor held."""
        for name in ("keys", "open_queries", "pending_scores"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, change(value))


@dataclass
class SelectionTrace:
    """Blocks attended by every (layer, selection unit) for the queries that produce output tokens, batch element 0:
    the selected ones (sink and retrieved) and the recent ones the query reads anyway."""

    steps: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per forward call: layer -> [units, blocks]
    num_chunks: int = 0


class RetrievalCache(DynamicCache):
    """A `DynamicCache` that also holds the block summaries, with growing (not concatenating) K/V layers.

    Layers of other kinds (a sliding-window layer of a model that mixes layer types) are left as the model made them.
    `reserve` (tokens) sizes the first allocation, so a sequence fed in pieces is not copied as it grows: with
    `offload`, freed pinned host buffers stay in torch's host cache, so regrowth would cost host memory too.
    """

    def __init__(
        self, config, window: int, offload: bool = False, record_selection: bool = False, reserve: int = 0
    ) -> None:
        super().__init__(config=config)
        self.layers = [
            GrowingLayer(window, host=offload, reserve=reserve) if type(layer) is DynamicLayer else layer
            for layer in self.layers
        ]
        self.offload = offload
        self.summaries: dict[int, LayerState] = {}
        self.trace = SelectionTrace() if record_selection else None
        self.workspace: dict[str, torch.Tensor] = {}  # the torch kernel's buffers, reused from one layer to the next

    def layer_state(self, layer_idx: int) -> LayerState:
        return self.summaries.setdefault(layer_idx, LayerState())

    # The summaries are per sequence like the keys: every change of the batch (beam search's reordering, a repeat or a
    # selection of sequences) applies to them too, or one beam would select chunks by another beam's summaries.
    def _map_summaries(self, change) -> None:
        for state in self.summaries.values():
            state.map(change)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_summaries(lambda states: states.index_select(0, beam_idx.to(states.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_summaries(lambda states: states.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_summaries(lambda states: states[indices.to(states.device)])
