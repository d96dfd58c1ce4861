"""InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory (Xiao et al. 2024,
NeurIPS; arXiv 2402.04617; release thunlp/InfLLM, inf_llm/attention/context_manager.py).

A query attends to the n_init initial tokens (`sink_tokens`), the n_local most recent ones (`recent_window`), and the
`topk` memory blocks (of block_size tokens, `chunk_size`) that its chunk of exc_block_size queries (`query_block`)
looks up. A block is represented by its repr_topk
tokens that received the most attention while they were in a local window; a chunk scores a block by its mean query
against the block's representative keys and keeps the top ones. Every key beyond the local window (initial tokens,
retrieved blocks, and the few recent tokens not yet in a block) sits at one distance, n_local - 1, the farthest a
local key can be: the release rotates those queries to position n_local - 1 and leaves memory keys unrotated. Local
and memory attention form one softmax (the release merges them inside its attention kernel).

Granularity of the lookup, as the release ships it: per layer, shared by all heads (`perhead: false` is the
default and every config uses it; the score is the dot product of the concatenated heads' mean queries with the
concatenated representative keys, i.e. summed over heads). `sharing="head"` is the release's `perhead: true`.

Where we differ from the release, and why:
* The memory part of the release's prefill masks its recent tokens with an offset that lets a chunk's early
  queries see up to exc_block_size - 1 local-window tokens a second time at the one distance (thunlp/InfLLM issue
  #61, open). We follow the method as written: a key inside the query's local window is seen once, at its true
  distance; in decoding the release and we agree.
* Chunks are aligned to absolute positions (the release aligns them to the start of each forward call; its
  generation loop feeds multiples of 512). As its generation loop feeds the last prompt token alone, the last
  `exact_tail` (1) prompt tokens look up per token and the chunk before them may be partial.
* Memory blocks stay in the method's cache (on the accelerator, or all in host memory with cpu_offload); the
  release's GPU LRU of `max_cached_block` blocks is a memory-management detail with no effect on the output.
* Scores accumulate in float32 (the release: the model's dtype).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from longctx.methods.base import MethodError
from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.retrieval.method import Retrieval, RetrievalPlan
from longctx.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InfLLM(Retrieval):
    """InfLLM (see the module docstring). Defaults: the release's config for an 8k-trained model
    (config/llama-3-inf-llm.yaml: n_local = half the trained length, as for its 4k and 32k models up to 4096).

    Args (the release's names in brackets):
        chunk_size: tokens per memory block (block_size).
        sink_tokens: initial tokens every query attends to, a multiple of chunk_size: they are the first blocks (n_init).
        recent_window: the local window: most recent tokens attended at their true distance, a multiple of
            chunk_size (n_local).
        topk: memory blocks retrieved per lookup.
        repr_topk: representative tokens per block.
        query_block: prefill queries that share one lookup (exc_block_size, the release's chunk); 1 looks up per token.
        exact_tail: the last prefill queries look up per token (their outputs produce the answer).
        summary, sharing, positions: the retrieval seams (see `Retrieval`); InfLLM's own are representative_tokens,
            layer and one_distance.
        cpu_offload, record_selection, gather_budget, kernel: as for LongHeads.
    """

    name = "infllm"
    label_params = ("chunk_size", "sink_tokens", "recent_window", "topk", "repr_topk", "query_block", "exact_tail",
                    "cpu_offload", "summary", "sharing", "positions")
    renamed = {"block_size": "chunk_size", "n_init": "sink_tokens", "n_local": "recent_window", "exc_block_size": "query_block"}
    summary: str = "representative_tokens"
    sharing: str = "layer"
    positions: str = "one_distance"
    chunk_size: int = 128
    sink_tokens: int = 128
    recent_window: int = 4096
    topk: int = 16
    query_block: int = 512
    exact_tail: int = 1

    def __post_init__(self) -> None:
        w, queries = self.chunk_size, self.query_block
        if w <= 0 or self.sink_tokens < 0 or self.sink_tokens % w:
            raise MethodError(f"infllm sink_tokens ({self.sink_tokens}) must be a multiple of chunk_size ({w})")
        if self.recent_window < w or self.recent_window % w:
            raise MethodError(f"infllm recent_window ({self.recent_window}) must be a positive multiple of chunk_size ({w})")
        if self.topk < 1:
            raise MethodError(f"infllm topk must be at least 1; got {self.topk}")
        if not 1 <= self.repr_topk <= w:
            raise MethodError(f"infllm repr_topk ({self.repr_topk}) must be between 1 and chunk_size ({w})")
        if queries < 1 or (queries % w if queries >= w else w % queries):
            raise MethodError(f"infllm query_block ({queries}) must divide chunk_size ({w}) or be a multiple of it")
        if queries > self.recent_window:
            raise MethodError(f"infllm query_block ({queries}) must not exceed recent_window ({self.recent_window}), as in the release")
        super().__post_init__()

    def geometry(self) -> Geometry:
        w = self.chunk_size
        return Geometry(
            window=w, sink=self.sink_tokens // w, top_k=self.topk, local=self.recent_window,
            begin=self.attended_tokens, block=self.query_block, exact_tail=max(0, self.exact_tail),
            gather_budget=self.gather_budget,
            one_distance=self.recent_window - 1 if self.positions == "one_distance" else None, whole_groups=False,
        )

    @property
    def attended_tokens(self) -> int:
        """Keys one query attends to once lookups start: sink_tokens + topk * chunk_size + recent_window."""
        return self.sink_tokens + self.topk * self.chunk_size + self.recent_window

    def resolve(self, lm: LoadedModel, max_length: int | None, trained_span: int) -> RetrievalPlan:
        farthest = self.largest_distance()
        if farthest >= trained_span:
            log.warning("infllm attends at distances up to %d, beyond the trained length %d: set recent_window lower",
                        farthest, trained_span)
        return super().resolve(lm, max_length, trained_span)
