"""LongHeads: Multi-Head Attention is Secretly a Long Context Processor (Lu et al. 2024, arXiv 2402.10685)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from longctx.methods.base import MethodError
from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.retrieval.method import Retrieval, RetrievalPlan
from longctx.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LongHeads(Retrieval):
    """Every head attends to the few chunks that matter to it, at remapped positions within the trained range.

    On the shared retrieval machinery (methods/retrieval/): chunks are its blocks, the first chunk its sink, the
    previous and current chunk its recent span, K - 3 retrieved chunks per head, consecutive slots.

    Args:
        chunk_size: w, chunk length in tokens (the release's `window_size`).
        atten_length: A, tokens one head attends to per query (K = A / w chunks); keep it <= the pretrained length.
        begin_selective_length: B, prefix encoded with ordinary causal attention; None means A. Must be >= A.
        query_block: prefill queries that share one chunk selection (1 = per token, as the authors' release;
            larger is the fast path). Must divide chunk_size.
        exact_tail: the last prefill queries always select per token: their outputs produce the answer.
        cpu_offload: keep the full key/value cache in host memory; only chosen chunks move to the accelerator.
        record_selection: keep the chunks chosen for the last query of every forward call (for heatmaps).
        gather_budget: key vectors gathered at once by the reference kernel (the triton and torch kernels bound their
            own working sets); lower it if a long prefill through kernel=reference runs out of memory.
        kernel: how the chosen chunks are attended: "triton" (fused GPU kernel), "torch" (stock torch, the CPU fast
            path), "reference" (the plain formulation), or "auto" (triton on CUDA when importable, else torch).
        rope_scaling: optional PI / static NTK / YaRN underneath (see AttentionMethod), e.g. {"name": "pi",
            "factor": 2.0} or YaRN(factor=2); then A may exceed the pretrained length by that factor.
        summary, sharing, positions, repr_topk: the retrieval seams (see `Retrieval`); LongHeads' own are
            in_chunk_attention, head, consecutive. With positions=one_distance the previous chunk's far half and
            every selected chunk sit at distance w - 1 (InfLLM's layout with a one-chunk local window).
    """

    name = "longheads"
    label_params = ("atten_length", "chunk_size", "query_block", "exact_tail", "cpu_offload", "summary", "sharing", "positions")
    renamed = {"window_size": "chunk_size", "block_size": "query_block"}
    block_word = "chunk"
    chunk_size: int = 256
    # 2048, not the paper's 4096: see docs/methods.md (LongHeads) and the passkey_h100 report, "How A was chosen"
    atten_length: int = 2048
    begin_selective_length: int | None = None
    query_block: int = 64
    exact_tail: int = 64

    def __post_init__(self) -> None:
        begin = self.begin_selective_length or self.atten_length
        w, a = self.chunk_size, self.atten_length
        if w <= 0 or a % w:
            raise MethodError(f"longheads atten_length ({a}) must be a multiple of chunk_size ({w})")
        if a // w < 3:
            raise MethodError(f"longheads needs atten_length >= 3 * chunk_size (first, previous, current chunk); got {a}/{w}")
        if begin < a or begin % w:
            raise MethodError(f"longheads begin_selective_length ({begin}) must be a multiple of chunk_size and >= atten_length ({a})")
        if self.query_block <= 0 or w % self.query_block:
            raise MethodError(f"longheads query_block ({self.query_block}) must divide chunk_size ({w})")
        super().__post_init__()

    def geometry(self) -> Geometry:
        w = self.chunk_size
        return Geometry(
            window=w, sink=1, top_k=self.atten_length // w - 3, local=w,
            begin=self.begin_selective_length or self.atten_length, block=self.query_block,
            exact_tail=max(0, self.exact_tail), gather_budget=self.gather_budget,
            one_distance=w - 1 if self.positions == "one_distance" else None,
        )

    def resolve(self, lm: LoadedModel, max_length: int | None, trained_span: int) -> RetrievalPlan:
        if self.atten_length > trained_span:
            log.warning("longheads atten_length %d exceeds the trained length %d: heads will see unseen distances",
                        self.atten_length, trained_span)
        return super().resolve(lm, max_length, trained_span)
