"""LongHeads: Multi-Head Attention is Secretly a Long Context Processor (Lu et al. 2024, arXiv 2402.10685)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import Cache

from longctx.methods.base import AttentionMethod, MethodError
from longctx.methods.longheads.attention import KERNELS, Geometry, longheads_attention
from longctx.methods.longheads.cache import LongHeadsCache
from longctx.methods.longheads.triton_kernel import shift_table, triton_available
from longctx.models import LoadedModel

log = logging.getLogger(__name__)

ATTENTION_NAME = "longheads"


@dataclass
class LongHeads(AttentionMethod):
    """Every head attends to the few chunks that matter to it, at remapped positions within the trained range.

    Args:
        window_size: w, chunk length in tokens.
        atten_length: A, tokens one head attends to per query (K = A / w chunks); keep it <= the pretrained length.
        begin_selective_length: B, prefix encoded with ordinary causal attention; None means A. Must be >= A.
        block_size: prefill queries that share one chunk selection (1 = per token, as the authors' release;
            larger is the fast path). Must divide window_size.
        exact_tail: the last prefill queries always select per token: their outputs produce the answer.
        cpu_offload: keep the full key/value cache in host memory; only chosen chunks move to the accelerator.
        record_selection: keep the chunks chosen for the last query of every forward call (for heatmaps).
        gather_budget: key vectors gathered at once by the reference kernel (the triton and torch kernels bound their
            own working sets); lower it if a long prefill through kernel=reference runs out of memory.
        kernel: how the chosen chunks are attended: "triton" (fused GPU kernel), "torch" (stock torch, the CPU fast
            path), "reference" (the plain formulation), or "auto" (triton on CUDA when importable, else torch).
        rope_scaling: optional PI / static NTK / YaRN underneath (see AttentionMethod), e.g. {"name": "pi",
            "factor": 2.0} or YaRN(factor=2); then A may exceed the pretrained length by that factor.
    """

    name = "longheads"
    attention_name = ATTENTION_NAME
    attention_function = staticmethod(longheads_attention)
    window_size: int = 256
    # 2048, not the paper's 4096: on the embedded 8k model A=4096 found the passkey 15/20 at 16k, A=2048 20/20 (README)
    atten_length: int = 2048
    begin_selective_length: int | None = None
    block_size: int = 64
    exact_tail: int = 64
    cpu_offload: bool = False
    record_selection: bool = True
    gather_budget: int = 2**21
    kernel: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        begin = self.begin_selective_length or self.atten_length
        w, a = self.window_size, self.atten_length
        if w <= 0 or a % w:
            raise MethodError(f"longheads atten_length ({a}) must be a multiple of window_size ({w})")
        if a // w < 3:
            raise MethodError(f"longheads needs atten_length >= 3 * window_size (first, previous, current chunk); got {a}/{w}")
        if begin < a or begin % w:
            raise MethodError(f"longheads begin_selective_length ({begin}) must be a multiple of window_size and >= atten_length ({a})")
        if self.block_size <= 0 or w % self.block_size:
            raise MethodError(f"longheads block_size ({self.block_size}) must divide window_size ({w})")
        if self.kernel not in KERNELS:
            raise MethodError(f"longheads kernel must be one of {', '.join(KERNELS)}; got {self.kernel!r}")
        self.geometry = Geometry(w, a // w, begin, self.block_size, max(0, self.exact_tail), self.gather_budget)
        self.active_cache: LongHeadsCache | None = None
        self._shift_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_device(self, device: torch.device) -> None:
        """kernel=triton needs CUDA and Triton: refused before any work, not at the first forward."""
        if self.kernel == "triton" and not triton_available(device):
            raise MethodError(f"longheads kernel=triton needs a CUDA device and the triton package (model on {device}); use kernel=auto or torch")

    def check_length(self, lm: LoadedModel, length: int) -> None:
        super().check_length(lm, length)
        rope_factor = self.rope_scaling.stretch(lm) if self.rope_scaling is not None else 1.0
        if self.atten_length > lm.pretrained_length * rope_factor:
            log.warning(
                "longheads atten_length %d exceeds the pretrained length %d%s: heads will see unseen distances",
                self.atten_length, lm.pretrained_length, f" x rope factor {rope_factor}" if rope_factor != 1 else "",
            )

    def shift_table(self, inv_freq: torch.Tensor, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shifts by 0..rows-1 chunks for the Triton kernel; built once, grown geometrically with the context."""
        key = (inv_freq.data_ptr(), str(device))
        table = self._shift_tables.get(key)
        if table is None or table[0].shape[0] < rows:
            table = shift_table(inv_freq, self.window_size, max(rows, 2 * (0 if table is None else table[0].shape[0])), device)
            self._shift_tables[key] = table
        return table

    def new_cache(self, lm_or_model, reserve: int = 0) -> LongHeadsCache:
        """A fresh cache for one sequence; `generate()` and plain forward calls get one automatically.

        reserve: tokens to allocate for at once when the sequence will be fed in pieces (see LongHeadsCache).
        """
        model = getattr(lm_or_model, "model", lm_or_model)
        return self._fresh_cache(model.config, reserve)

    def _fresh_cache(self, config, reserve: int = 0) -> LongHeadsCache:
        return LongHeadsCache(
            config, self.window_size, offload=self.cpu_offload, record_selection=self.record_selection, reserve=reserve
        )

    def prepare_cache(self, config, cache: Cache | None, use_cache: bool | None) -> LongHeadsCache:
        """Every sequence carries a LongHeadsCache, even with use_cache=False: the summaries live there."""
        if not isinstance(cache, LongHeadsCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise MethodError("longheads needs its own cache: pass method.new_cache(model) as the cache, or none")
            cache = self._fresh_cache(config)
        self.active_cache = cache
        return cache

    def sample_figures(self, record: dict[str, Any]) -> dict[str, Any]:
        """The chunk-selection heatmap of the sample just finished (the runner's method-artefact hook); the chunks of
        a needle the task reports as `needle_token`..`needle_end` are outlined."""
        trace = self.trace()
        if trace is None:
            return {}
        from longctx.viz import chunk_selection_heatmap

        start, end = record.get("needle_token"), record.get("needle_end")
        needle = list(range(start // self.window_size, (end - 1) // self.window_size + 1)) if None not in (start, end) else []
        details = ", ".join(f"{key} {record[key]:.2f}" if isinstance(record[key], float) else f"{key} {record[key]}"
                            for key in ("length", "depth", "correct", "book", "segment") if key in record)
        title = f"{self.name} chunk selection, sample {record['sample']} ({details})"
        return {f"chunk_selection_{record['sample']}": chunk_selection_heatmap(trace["chosen"], trace["num_chunks"], needle, title)}

    def trace(self) -> dict[str, Any] | None:
        """Chunks chosen per (layer, head) for the query that produced the first output token, and for later steps."""
        trace = self.active_cache.trace if self.active_cache is not None else None
        if trace is None:
            return None
        steps = [np.stack([step[layer].cpu().numpy() for layer in sorted(step)]) for step in trace.steps if step]
        if not steps:
            return None
        return {"chosen": steps[0], "steps": steps, "num_chunks": trace.num_chunks, "window_size": self.window_size}
