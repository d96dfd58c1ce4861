"""InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory (Xiao et al. 2024,
NeurIPS; arXiv 2402.04617; release thunlp/InfLLM, inf_llm/attention/context_manager.py).

A query attends to the n_init initial tokens, the n_local most recent ones, and the `topk` memory blocks (of
block_size tokens) that its chunk of exc_block_size queries looks up. A block is represented by its repr_topk
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
from longctx.methods.retrieval.method import Retrieval
from longctx.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class InfLLM(Retrieval):
    """InfLLM (see the module docstring). Defaults: the release's config for an 8k-trained model
    (config/llama-3-inf-llm.yaml: n_local = half the trained length, as for its 4k and 32k models up to 4096).

    Args:
        block_size: tokens per memory block.
        n_init: initial tokens every query attends to (a multiple of block_size: they are the first blocks).
        n_local: the local window: most recent tokens attended at their true distance (a multiple of block_size).
        topk: memory blocks retrieved per lookup.
        repr_topk: representative tokens per block.
        exc_block_size: prefill queries that share one lookup (the release's chunk); 1 looks up per token.
        exact_tail: the last prefill queries look up per token (their outputs produce the answer).
        summary, sharing, positions: the retrieval seams (see `Retrieval`); InfLLM's own are representative_tokens,
            layer and one_distance.
        cpu_offload, record_selection, gather_budget, kernel: as for LongHeads.
    """

    name = "infllm"
    attention_name = "infllm"
    summary: str = "representative_tokens"
    sharing: str = "layer"
    positions: str = "one_distance"
    block_size: int = 128
    n_init: int = 128
    n_local: int = 4096
    topk: int = 16
    exc_block_size: int = 512
    exact_tail: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        w, chunk = self.block_size, self.exc_block_size
        if w <= 0 or self.n_init < 0 or self.n_init % w:
            raise MethodError(f"infllm n_init ({self.n_init}) must be a multiple of block_size ({w})")
        if self.n_local < w or self.n_local % w:
            raise MethodError(f"infllm n_local ({self.n_local}) must be a positive multiple of block_size ({w})")
        if self.topk < 1:
            raise MethodError(f"infllm topk must be at least 1; got {self.topk}")
        if not 1 <= self.repr_topk <= w:
            raise MethodError(f"infllm repr_topk ({self.repr_topk}) must be between 1 and block_size ({w})")
        if chunk < 1 or (chunk % w if chunk >= w else w % chunk):
            raise MethodError(f"infllm exc_block_size ({chunk}) must divide block_size ({w}) or be a multiple of it")
        if chunk > self.n_local:
            raise MethodError(f"infllm exc_block_size ({chunk}) must not exceed n_local ({self.n_local}), as in the release")
        self.check_seams()
        self.geometry = Geometry(
            window=w, sink=self.n_init // w, top_k=self.topk, local=self.n_local,
            begin=self.n_init + self.topk * w + self.n_local, block=chunk, exact_tail=max(0, self.exact_tail),
            gather_budget=self.gather_budget, one_distance=self.n_local - 1 if self.positions == "one_distance" else None,
            whole_groups=False,
        )

    @property
    def attended_tokens(self) -> int:
        """Keys one query attends to once lookups start: n_init + topk * block_size + n_local."""
        return self.n_init + self.topk * self.block_size + self.n_local

    def check_length(self, lm: LoadedModel, length: int) -> None:
        super().check_length(lm, length)
        farthest = self.largest_distance()
        if farthest >= lm.pretrained_length * self.rope_stretch(lm):
            log.warning("infllm attends at distances up to %d, beyond the pretrained length %d: set n_local lower",
                        farthest, lm.pretrained_length)
