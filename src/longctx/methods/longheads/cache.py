"""The cache LongHeads needs besides keys and values: per-layer chunk summaries and the queries of the open chunk."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class HostLayer(DynamicLayer):
    """A cache layer whose keys and values live in host memory (LongHeads `cpu_offload`).

    `update` returns the host tensors: the LongHeads attention moves only the chunks it picks to the accelerator.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        pin = key_states.device.type == "cuda"
        key_host = key_states.to("cpu", non_blocking=False)
        value_host = value_states.to("cpu", non_blocking=False)
        if pin:
            key_host, value_host = key_host.pin_memory(), value_host.pin_memory()
        return super().update(key_host, value_host, *args, **kwargs)


@dataclass
class LayerSummaries:
    """Chunk summaries of one layer, for every query head.

    keys: [batch, q_heads, done_chunks, head_dim], the key summary c of each completed chunk.
    open_queries: [batch, q_heads, tokens, head_dim], RoPE'd queries of the chunk still filling up
        (its summary needs all of its queries, and decoding brings them one at a time).
    """

    keys: torch.Tensor | None = None
    open_queries: torch.Tensor | None = None

    @property
    def done_chunks(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


@dataclass
class SelectionTrace:
    """Chunks chosen by every (layer, head) for the queries that produce output tokens, batch element 0."""

    steps: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per forward call: layer -> [heads, slots]
    num_chunks: int = 0


class LongHeadsCache(DynamicCache):
    """A `DynamicCache` that also holds LongHeads' chunk summaries (and, with offload, keeps K/V in host memory)."""

    def __init__(self, config, offload: bool = False, record_selection: bool = False) -> None:
        super().__init__(config=config)
        if offload:
            self.layers = [HostLayer() for _ in self.layers]
        self.offload = offload
        self.summaries: dict[int, LayerSummaries] = {}
        self.trace = SelectionTrace() if record_selection else None

    def layer_summaries(self, layer_idx: int) -> LayerSummaries:
        return self.summaries.setdefault(layer_idx, LayerSummaries())
