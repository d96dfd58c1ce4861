"""What LongHeads and InfLLM share as methods: the plan, the installation (its cache, the kernels' tables, the trace
and its heatmap), and the three seams a researcher can set on either (`summary`, `sharing`, `positions`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Cache

from longctx.methods.base import AttentionInstallation, AttentionMethod, AttentionPlan, MethodError
from longctx.methods.retrieval.attention import KERNELS, retrieval_attention
from longctx.methods.retrieval.cache import RetrievalCache
from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.retrieval.selection import SHARING
from longctx.methods.retrieval.summaries import InChunkAttention, RepresentativeTokens
from longctx.methods.retrieval.triton_kernel import shift_table, triton_available
from longctx.models import LoadedModel

SUMMARIES = ("in_chunk_attention", "representative_tokens")
POSITIONS = ("consecutive", "one_distance")


@dataclass(frozen=True, kw_only=True)
class RetrievalPlan(AttentionPlan):
    """The numbers and choices the retrieval attention reads (see attention.py)."""

    geometry: Geometry
    summary: InChunkAttention | RepresentativeTokens
    sharing: str
    kernel: str
    cpu_threads: int
    cpu_offload: bool
    record_selection: bool


class RetrievalInstallation(AttentionInstallation):
    """A retrieval method installed: the cache of the sequence running now (its summaries and trace), and the
    Triton kernel's shift tables, built once per layer frequency and device."""

    plan: RetrievalPlan

    def __init__(self, method: Retrieval, lm: LoadedModel, plan: RetrievalPlan) -> None:
        super().__init__(method, lm, plan)
        self.active_cache: RetrievalCache | None = None
        self._shift_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_cache(self, reserve: int = 0) -> RetrievalCache:
        """A fresh cache for one sequence; `generate()` and plain forward calls get one automatically.

        reserve: tokens to allocate for at once when the sequence will be fed in pieces (see RetrievalCache).
        """
        return RetrievalCache(self.lm.model.config, self.plan.geometry.window, offload=self.plan.cpu_offload,
                              record_selection=self.plan.record_selection, reserve=reserve)

    def shift_table(self, inv_freq: torch.Tensor, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shifts by 0..rows-1 blocks for the Triton kernel; built once, grown geometrically with the context."""
        key = (inv_freq.data_ptr(), str(device))
        table = self._shift_tables.get(key)
        if table is None or table[0].shape[0] < rows:
            table = shift_table(inv_freq, self.plan.geometry.window, max(rows, 2 * (0 if table is None else table[0].shape[0])), device)
            self._shift_tables[key] = table
        return table

    def trace(self) -> dict[str, Any] | None:
        """Blocks attended per (layer, selection unit) by the query that produced the first output token, and by later
        steps: the sink and retrieved blocks, then the recent span's."""
        trace = self.active_cache.trace if self.active_cache is not None else None
        if trace is None:
            return None
        steps = [np.stack([step[layer].cpu().numpy() for layer in sorted(step)]) for step in trace.steps if step]
        if not steps:
            return None
        return {"chosen": steps[0], "steps": steps, "num_chunks": trace.num_chunks, "chunk_size": self.plan.geometry.window}

    def sample_figures(self, record: dict[str, Any]) -> dict[str, Any]:
        """The block-selection heatmap of the sample just finished; the blocks of a needle the task reports as
        `needle_token`..`needle_end` are outlined."""
        trace = self.trace()
        if trace is None:
            return {}
        from longctx.viz import chunk_selection_heatmap

        window = self.plan.geometry.window
        start, end = record.get("needle_token"), record.get("needle_end")
        needle = list(range(start // window, (end - 1) // window + 1)) if None not in (start, end) else []
        details = ", ".join(f"{key} {record[key]:.2f}" if isinstance(record[key], float) else f"{key} {record[key]}"
                            for key in ("length", "depth", "correct", "book", "segment") if key in record)
        word = self.method.block_word
        title = f"{self.method.name}: {word}s attended, sample {record['sample']} ({details})"
        return {f"chunk_selection_{record['sample']}": chunk_selection_heatmap(trace["chosen"], trace["num_chunks"], needle, title)}


@dataclass(frozen=True)
class Retrieval(AttentionMethod):
    """Base of the block-retrieval methods. A subclass sets its paper's parameters and their defaults for the seams,
    and builds its `geometry()` (geometry.py) from them.

    Seams (any method takes any value, so mixes are a parameter away):
        summary: how a block is summarised for selection: "in_chunk_attention" (LongHeads) or
            "representative_tokens" (InfLLM; `repr_topk` tokens per block).
        sharing: who shares one selection: "head" (LongHeads), "kv_group" or "layer" (InfLLM).
        positions: where the attended blocks sit: "consecutive" slots (LongHeads) or "one_distance" (InfLLM).
    cpu_threads: torch threads the retrieval attention runs on when the model is on a CPU (0: torch's setting, the
        default; 1 when other jobs share the CPU, see attention.cpu_threads).
    """

    installation_class = RetrievalInstallation
    attention_function = staticmethod(retrieval_attention)
    block_word: ClassVar[str] = "block"  # what the paper calls its blocks, for figures
    summary: str = "in_chunk_attention"
    sharing: str = "head"
    positions: str = "consecutive"
    repr_topk: int = 4
    cpu_offload: bool = False
    record_selection: bool = True
    gather_budget: int = 2**21
    kernel: str = "auto"
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for option, valid in (("summary", SUMMARIES), ("sharing", SHARING), ("positions", POSITIONS), ("kernel", KERNELS)):
            if getattr(self, option) not in valid:
                raise MethodError(f"{self.name} {option} must be one of {', '.join(valid)}; got {getattr(self, option)!r}")
        if self.summary == "representative_tokens" and self.repr_topk < 1:
            raise MethodError(f"{self.name} repr_topk must be at least 1; got {self.repr_topk}")
        if self.cpu_threads < 0:
            raise MethodError(f"{self.name} cpu_threads must be 0 (torch's setting) or more; got {self.cpu_threads}")
        geometry = self.geometry()
        if geometry.local % geometry.window or geometry.begin % geometry.window:
            raise MethodError(f"{self.name}: a retrieval geometry needs its recent span and first retrieval in whole blocks")

    def geometry(self) -> Geometry:
        """What a query attends to and where those keys sit, from this method's parameters (geometry.py)."""
        raise NotImplementedError

    def largest_distance(self) -> int:
        """The farthest any attended key sits from its query, in positions (what must stay in the trained range)."""
        g = self.geometry()
        if g.one_distance is not None:
            return max(g.local - 1, 0)
        # the query ends the recent span, which starts `local` (plus a partial block) before its group
        return g.slots * g.window + g.local + max(g.block, g.window) - 1

    def check_device(self, device: torch.device) -> None:
        """kernel=triton needs CUDA and Triton: refused before any work, not at the first forward."""
        if self.kernel == "triton" and not triton_available(device):
            raise MethodError(f"{self.name} kernel=triton needs a CUDA device and the triton package (model on {device}); use kernel=auto or torch")

    def resolve(self, lm: LoadedModel, max_length: int | None, trained_span: int) -> RetrievalPlan:
        summary = InChunkAttention() if self.summary == "in_chunk_attention" else RepresentativeTokens(self.repr_topk)
        return RetrievalPlan(
            geometry=self.geometry(), summary=summary, sharing=self.sharing, kernel=self.kernel,
            cpu_threads=self.cpu_threads, cpu_offload=self.cpu_offload, record_selection=self.record_selection,
        )

    def prepare_cache(self, installation: RetrievalInstallation, config, cache: Cache | None, use_cache: bool | None) -> RetrievalCache:
        """Every sequence carries a RetrievalCache, even with use_cache=False: the summaries live there."""
        if not isinstance(cache, RetrievalCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise MethodError(f"{self.name} needs its own cache: pass installation.new_cache() as the cache, or none")
            cache = installation.new_cache()
        installation.active_cache = cache
        return cache
