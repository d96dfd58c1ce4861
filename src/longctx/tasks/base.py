"""What every task is: a dataclass that runs a loaded (possibly patched) model and returns metrics."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import pandas as pd
import torch

from longctx.models import LoadedModel

# Called once per finished sample with the sample's prediction record (a flat dict of JSON-able values). Every record
# has "sample" (its index in the run) and "length"; a task whose input hides something at known tokens also gives
# "needle_token" and "needle_end" (a span), which chunk-selection heatmaps mark.
SampleCallback = Callable[[dict[str, Any]], None]


def split_metric_key(key: str) -> tuple[str, int | None]:
    """A task's metrics are keyed `<metric>@<length>` per input length (`accuracy@4096`) or `<metric>` for the run:
    "accuracy@4096" -> ("accuracy", 4096), "wall_seconds" -> ("wall_seconds", None)."""
    metric, separator, length = key.rpartition("@")
    return (metric, int(length)) if separator and length.isdigit() else (key, None)


class TaskError(ValueError):
    """Bad task input (missing data, impossible length); the message names the fix."""


@dataclass
class Task:
    """Base of all tasks. A task knows nothing of methods: it only calls the model."""

    name: ClassVar[str] = "base"
    # a task whose `seed` field draws its samples: True = that seed follows the run's top-level `seed` by default
    follows_run_seed: ClassVar[bool] = True

    def max_length(self) -> int:
        """The longest input, in tokens, this task will feed the model (checked against the method first)."""
        raise NotImplementedError

    def check(self, lm: LoadedModel) -> None:
        """Raise `TaskError` on input that cannot work (missing data, impossible length) before anything runs."""

    def run(self, lm: LoadedModel, on_sample: SampleCallback) -> dict[str, float]:
        """Evaluate, calling `on_sample(record)` after each sample; return flat metrics (name -> number)."""
        raise NotImplementedError

    def figures(self) -> dict[str, Any]:
        """Matplotlib figures made from the last `run` (name -> Figure); the runner saves and logs them."""
        return {}

    def tables(self) -> dict[str, Any]:
        """pandas DataFrames made from the last `run` (name -> DataFrame); the runner saves and logs them."""
        return {}


def reset_peak_host_memory() -> None:
    """Restart the process's peak resident set size (Linux: VmHWM), so that `peak_host_memory_gib` measures what runs
    from now on. A no-op where /proc cannot do it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_host_memory_gib() -> float | None:
    """Peak resident set size of this process since the last `reset_peak_host_memory` (the whole process: weights
    included), in GiB; None where /proc does not report it."""
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return round(int(found.group(1)) / 2**20, 3) if found else None


@dataclass(frozen=True)
class Generation:
    """A greedy continuation, the seconds it took (prefill + decoding) and the peak memory: GPU allocation (None on a
    CPU) and the process's host resident set (None where /proc does not report it)."""

    text: str
    seconds: float
    peak_gpu_gib: float | None
    peak_rss_gib: float | None = None


def greedy_generate(lm: LoadedModel, input_ids: torch.Tensor, max_new_tokens: int, **options: Any) -> Generation:
    """Greedy decoding of `input_ids` [1, n] with whatever method is applied, timed and measured."""
    on_cuda = lm.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(lm.device)
        torch.cuda.synchronize(lm.device)
    reset_peak_host_memory()
    started = time.perf_counter()
    with torch.inference_mode():
        output = lm.model.generate(
            input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id, **options
        )
    if on_cuda:
        torch.cuda.synchronize(lm.device)
    seconds = time.perf_counter() - started
    text = lm.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    peak = round(torch.cuda.max_memory_allocated(lm.device) / 2**30, 3) if on_cuda else None
    return Generation(text, round(seconds, 3), peak, peak_host_memory_gib())


def sample_record(index: int, length: int, generation: Generation, **fields: Any) -> dict[str, Any]:
    """A task's prediction record: the sample's index in the run and its length first, the task's own `fields`, then
    what the sample cost (seconds, peak GPU memory, peak host memory), as `cost_metrics` reads them."""
    return {"sample": index, "length": length, **fields, "seconds": generation.seconds,
            "peak_gpu_gib": generation.peak_gpu_gib, "peak_rss_gib": generation.peak_rss_gib}


def cost_metrics(records: pd.DataFrame, length: int) -> dict[str, float]:
    """`seconds@<length>`, the median seconds per sample of `records` (one length's `sample_record`s), and where
    measured `peak_gpu_gib@<length>` / `peak_rss_gib@<length>`, their peak memory."""
    metrics = {f"seconds@{length}": float(records.seconds.median())}
    for peak in ("peak_gpu_gib", "peak_rss_gib"):
        if peak in records and records[peak].notna().any():
            metrics[f"{peak}@{length}"] = float(records[peak].max())
    return metrics
