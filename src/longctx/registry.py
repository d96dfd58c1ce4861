"""Name -> class for methods and tasks. Adding one is a module, a config file and a line here."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from longctx.methods.base import Method
from longctx.methods.full import FullAttention
from longctx.methods.longheads import LongHeads
from longctx.methods.rope_scaling import NTKScaling, PositionInterpolation
from longctx.methods.window import SlidingWindow
from longctx.tasks.base import Task
from longctx.tasks.longbench import LongBench, LongBenchV2
from longctx.tasks.passkey import Passkey
from longctx.tasks.pg19 import PG19Perplexity

METHODS: dict[str, type[Method]] = {
    "full": FullAttention,
    "longheads": LongHeads,
    "pi": PositionInterpolation,
    "ntk": NTKScaling,
    "window": SlidingWindow,
}

TASKS: dict[str, type[Task]] = {
    "passkey": Passkey,
    "pg19": PG19Perplexity,
    "longbench": LongBench,
    "longbench_v2": LongBenchV2,
}

T = TypeVar("T")


class RegistryError(ValueError):
    """Unknown name or parameter; the message lists what is valid."""


def _build(kind: str, registry: dict[str, type[T]], name: str, params: dict[str, Any]) -> T:
    if name not in registry:
        raise RegistryError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(registry))}")
    cls = registry[name]
    valid = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - valid)
    if unknown:
        raise RegistryError(f"{kind} {name!r} has no parameter {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return cls(**params)


def build_method(name: str, **params: Any) -> Method:
    """`build_method("longheads", window_size=256)` -> a configured method instance."""
    return _build("method", METHODS, name, params)


def build_task(name: str, **params: Any) -> Task:
    """`build_task("passkey", lengths=[4096])` -> a configured task instance."""
    return _build("task", TASKS, name, params)
