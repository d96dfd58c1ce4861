"""What every method is: a small dataclass that patches a loaded model and can undo it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Iterator

import torch

from longctx.models import LoadedModel


class MethodError(ValueError):
    """A method cannot serve this model or this length; the message says what to change."""


@dataclass
class Method:
    """Base of all methods. Subclasses set `name`, override `apply`/`remove`, and may override `check_length`.

    Use as a context manager so that one loaded model serves several methods in one process:

        with LongHeads(window_size=256)(lm):
            lm.model.generate(...)
    """

    name: ClassVar[str] = "base"

    def apply(self, lm: LoadedModel) -> None:
        """Patch the model in place."""

    def remove(self, lm: LoadedModel) -> None:
        """Undo `apply` exactly."""

    def check_device(self, device: torch.device) -> None:
        """Raise `MethodError` if this method cannot run on `device`; the runner asks before loading the model."""

    def check_length(self, lm: LoadedModel, length: int) -> None:
        """Raise `MethodError` if this method cannot run the model at `length` tokens."""

    def trace(self) -> dict[str, Any] | None:
        """Method-specific record of the last forward pass (e.g. chosen chunks), or None."""
        return None

    def config(self) -> dict[str, Any]:
        """{"name": ..., parameter: value, ...}: what a run records, and what `build_method(**config)` rebuilds. A
        method held as a parameter (a RoPE rescaling) is written as its own config."""
        config: dict[str, Any] = {"name": self.name}
        for field in fields(self):
            if field.init and not field.name.startswith("_"):
                value = getattr(self, field.name)
                config[field.name] = value.config() if isinstance(value, Method) else value
        return config

    @contextmanager
    def __call__(self, lm: LoadedModel) -> Iterator[LoadedModel]:
        self.apply(lm)
        try:
            yield lm
        finally:
            self.remove(lm)
