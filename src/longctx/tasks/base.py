"""What every task is: a dataclass that runs a loaded (possibly patched) model and returns metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from longctx.models import LoadedModel

# Called once per finished sample with the sample's prediction record (a flat dict of JSON-able values). Every record
# has "sample" (its index in the run) and "length"; a task whose input hides something at known tokens also gives
# "needle_token" and "needle_end" (a span), which chunk-selection heatmaps mark.
SampleCallback = Callable[[dict[str, Any]], None]


class TaskError(ValueError):
    """Bad task input (missing data, impossible length); the message names the fix."""


@dataclass
class Task:
    """Base of all tasks. A task knows nothing of methods: it only calls the model."""

    name: ClassVar[str] = "base"

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
