"""What every method is, and its life: a frozen config, a plan for one model and length, an installation.

    method = LongHeads(atten_length=2048)              # the config: frozen, checked on its own, reusable
    plan = method.plan(lm, max_length=32768)           # validated against the model and the length; frozen
    with method(lm, max_length=32768) as installed:    # plan + install; undone exactly on exit
        lm.model.generate(...)
        installed.trace()                              # what the method did (retrieval methods: chosen chunks)

Nothing is stored between "check" and "use": `plan` stores nothing on the method, and everything an installed
method needs at run time (its plan, the hooks to undo, the cache of the sequence running now) lives on the
`Installation`, which dies with the `with` block. One method object therefore serves any number of models, lengths
and threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar

import torch

from longctx.models import LoadedModel


class MethodError(ValueError):
    """A method cannot serve this model or this length; the message says what to change."""


def parameters(cls: type) -> list[Field]:
    """The fields a user sets (the constructor's): a method's or task's parameters, in declaration order."""
    return [field for field in fields(cls) if field.init and not field.name.startswith("_")]


def refuse_renamed(owner: str, renamed: Mapping[str, str], given: Mapping[str, Any]) -> None:
    """One line for a parameter given under a name it no longer has."""
    old = next((name for name in given if name in renamed), None)
    if old is not None:
        raise MethodError(f"{owner}: parameter {old} is now called {renamed[old]}")


@dataclass(frozen=True)
class Plan:
    """What a method resolved for one model and length. `reach`: the most tokens a sequence may hold under it
    (None: any); an installed method refuses a longer input in one line instead of computing a wrong number."""

    reach: int | None = None


class Installation:
    """A method installed on one model: its plan, what it changed (undone by `remove`, in reverse order), and what
    it observed while installed."""

    def __init__(self, method: Method, lm: LoadedModel, plan: Plan) -> None:
        self.method, self.lm, self.plan = method, lm, plan
        self._undo: list[Callable[[], None]] = []
        if plan.reach is not None:
            hook = lm.model.get_decoder().register_forward_pre_hook(self._check_reach, with_kwargs=True)
            self.on_remove(hook.remove)

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register what `remove` must undo (last registered, first undone)."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Restore the model exactly."""
        while self._undo:
            self._undo.pop()()

    def trace(self) -> dict[str, Any] | None:
        """A record of the last forward pass (retrieval methods: the blocks chosen), or None."""
        return None

    def sample_figures(self, record: dict[str, Any]) -> dict[str, Any]:
        """Figures (name -> matplotlib Figure) of the sample just finished, described by the task's prediction record."""
        return {}

    def _check_reach(self, decoder, args, kwargs):
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
        length = (inputs.shape[1] if inputs is not None else 0) + (cache.get_seq_length() if cache is not None else 0)
        if length > self.plan.reach:
            raise MethodError(
                f"{self.method.name} was planned for at most {self.plan.reach} tokens and got {length}:"
                f" apply it with max_length={length} (method(lm, max_length=...)) or set its parameters for that length"
            )


@dataclass(frozen=True)
class Method:
    """Base of all methods: a frozen dataclass of parameters. Subclasses set `name`, override `plan` (validate and
    resolve against a model and a length) and `install` (patch the model, registering the undo on the Installation).

    label_params: the parameters that tell two configurations of this method apart in a table label, in order.
    renamed: old parameter name -> new one, refused in one line by `build_method` and read when old run folders are
        aggregated.
    """

    name: ClassVar[str] = "base"
    label_params: ClassVar[tuple[str, ...]] = ()
    renamed: ClassVar[Mapping[str, str]] = {}

    def check_device(self, device: torch.device) -> None:
        """Raise `MethodError` if this method cannot run on `device`; asked before the model loads."""

    def plan(self, lm: LoadedModel, max_length: int | None = None) -> Plan:
        """Validate this method against `lm` and inputs of up to `max_length` tokens (None: no length promised) and
        resolve what the installed method reads. Raises `MethodError` (one line); changes nothing."""
        return Plan()

    def install(self, lm: LoadedModel, plan: Plan) -> Installation:
        """Patch `lm` in place according to `plan`; the returned Installation undoes it."""
        return Installation(self, lm, plan)

    def apply(self, lm: LoadedModel, max_length: int | None = None) -> Installation:
        """Plan and install, for callers that cannot use a `with` block (call `.remove()` on the result)."""
        self.check_device(lm.device)
        return self.install(lm, self.plan(lm, max_length))

    def config(self) -> dict[str, Any]:
        """{"name": ..., parameter: value, ...}: what a run records, and what `build_method(**config)` rebuilds. A
        method held as a parameter (a RoPE rescaling) is written as its own config."""
        config: dict[str, Any] = {"name": self.name}
        for field in parameters(type(self)):
            value = getattr(self, field.name)
            config[field.name] = value.config() if isinstance(value, Method) else value
        return config

    @contextmanager
    def __call__(self, lm: LoadedModel, max_length: int | None = None) -> Iterator[Installation]:
        installation = self.apply(lm, max_length)
        try:
            yield installation
        finally:
            installation.remove()
