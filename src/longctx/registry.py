"""Name -> class for methods and tasks. Adding one is a module and a line here.

The dataclasses are the one source of defaults: `register_configs` turns each into the Hydra config-group option
`method=<name>` / `task=<name>` (through Hydra's ConfigStore), so the CLI, the API and the benchmarks start from the
same values. Experiments (conf/experiment/) hold only overrides.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from longctx.methods.method import Method, parameters, refuse_renamed
from longctx.methods.dca import DualChunkAttention
from longctx.methods.full import FullAttention
from longctx.methods.infllm import InfLLM
from longctx.methods.lm_infinite import LMInfinite
from longctx.methods.longheads import LongHeads
from longctx.methods.rope_scaling import NTKScaling, PositionInterpolation, YaRN
from longctx.methods.self_extend import SelfExtend
from longctx.methods.window import SlidingWindow
from longctx.tasks.base import Task
from longctx.tasks.longbench import LongBench, LongBenchV2
from longctx.tasks.passkey import Passkey
from longctx.tasks.pg19 import PG19Perplexity
from longctx.tasks.ruler import Ruler

METHODS: dict[str, type[Method]] = {
    "full": FullAttention,
    "infllm": InfLLM,
    "longheads": LongHeads,
    "pi": PositionInterpolation,
    "ntk": NTKScaling,
    "window": SlidingWindow,
    "yarn": YaRN,
    "self_extend": SelfExtend,
    "dca": DualChunkAttention,
    "lm_infinite": LMInfinite,
}

TASKS: dict[str, type[Task]] = {
    "passkey": Passkey,
    "pg19": PG19Perplexity,
    "longbench": LongBench,
    "longbench_v2": LongBenchV2,
    "ruler": Ruler,
}

T = TypeVar("T")


class RegistryError(ValueError):
    """Unknown name or parameter; the message lists what is valid."""


def _build(kind: str, registry: dict[str, type[T]], name: str, params: dict[str, Any]) -> T:
    if name not in registry:
        raise RegistryError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(registry))}")
    cls = registry[name]
    refuse_renamed(f"{kind} {name}", getattr(cls, "renamed", {}), params)
    valid = {f.name for f in parameters(cls)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise RegistryError(f"{kind} {name!r} has no parameter {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    hints = get_type_hints(cls)
    for key, value in params.items():
        if not _matches(value, hints[key]):
            raise RegistryError(f"{kind}.{key} must be {_describe(hints[key])}; got {value!r}")
    return cls(**params)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value (from Hydra: str, int, float, bool, None, lists, dicts) fits a field's annotation."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        return isinstance(value, Sequence) and not isinstance(value, str) and all(_matches(v, args[0]) for v in value) if args else True
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, Mapping)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    """A field's annotation as a user reads it: `list of int`, `float or null`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple, Sequence):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def build_method(name: str, **params: Any) -> Method:
    """`build_method("longheads", chunk_size=256)` -> a configured method instance."""
    return _build("method", METHODS, name, params)


def build_task(name: str, **params: Any) -> Task:
    """`build_task("passkey", lengths=[4096])` -> a configured task instance."""
    return _build("task", TASKS, name, params)


def default_config(name: str, cls: type) -> dict[str, Any]:
    """The config-group entry of a method or task: its name and every field's default. A task's `seed` follows the
    run's top-level `seed` unless the task keeps a seed of its own (RULER: its prepare.py's 42)."""
    config: dict[str, Any] = {"name": name}
    for field in parameters(cls):
        if field.default is not MISSING:
            default = field.default
        elif field.default_factory is not MISSING:
            default = field.default_factory()
        else:
            default = "???"  # Hydra's "must be given"
        follows = field.name == "seed" and getattr(cls, "follows_run_seed", False)
        config[field.name] = "${seed}" if follows else default
    return config


# A label becomes part of a run folder's path: a simple name, never a path (no separator, no "..", not hidden).
SIMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


def label_problem(key: str, value: Any) -> str | None:
    """Why `value` cannot be the label `key` (model.name, method.name, task.name, an experiment's name), or None."""
    if SIMPLE_NAME.fullmatch(str(value)) and ".." not in str(value):
        return None
    fix = re.sub(r"[^A-Za-z0-9_.+=-]+", "_", str(value).replace("..", "_")).strip("._") or "run"
    return f"{key}={value!r} is not a simple name (letters, digits and _ . + = -): it names the run folder; use e.g. {key}={fix}"


def simple_label(value: Any, key: str) -> Any:
    """The `${label:${model.name},model.name}` resolver of the run folder's path: the label itself, or, for anything
    with a path separator or "..", one line on stderr and exit status 2, before Hydra creates a folder."""
    problem = label_problem(key, value)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)  # SystemExit passes through OmegaConf and Hydra, which would wrap an exception in a long trace
    return value


def register_configs() -> None:
    """Make every registered method and task a Hydra config-group option, and the run-folder label check a resolver
    (idempotent)."""
    OmegaConf.register_new_resolver("label", simple_label, replace=True)
    store = ConfigStore.instance()
    for group, registry in (("method", METHODS), ("task", TASKS)):
        for name, cls in registry.items():
            store.store(group=group, name=name, node=default_config(name, cls))


register_configs()
