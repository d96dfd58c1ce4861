"""Training-free RoPE rescaling: Position Interpolation, NTK-aware scaling and YaRN.

Each only changes the model's rope parameters and rebuilds its rotary embedding from them, so it touches neither the
attention implementation nor the weights. All three cost what full attention costs (quadratic in the context).

They are methods of their own (`method=pi`) and also values that any attention method takes
(`method=dca method.rope_scaling={name:yarn,factor:2}`, or `DualChunkAttention(rope_scaling=YaRN(factor=2))`): the
attention method applies the rescaling first, then finds each layer's (rescaled) frequencies and re-rotates with them.
Re-rotating already-rotated queries and keys by a position difference is a pure rotation, so YaRN's attention factor,
which multiplies cos and sin and hence every query and key, is carried through untouched.

Where RoPE differs per layer type (Gemma 3: theta 1e4 for local sliding-window layers, 1e6 for global ones), only the
types of the global layers are rescaled: a local layer never sees a distance past its window, so stretching its
positions would only blur it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from longctx.methods.method import Installation, Method, MethodError, Plan, parameters
from longctx.methods.rope import AttentionLayer, attention_layers
from longctx.models import LoadedModel


@dataclass(frozen=True)
class RopePlan(Plan):
    """factor: the stretch resolved for this model and length (None for dynamic NTK, whose stretch follows the
    length); rope_parameters: what replaces the model's `config.rope_parameters`."""

    factor: float | None = None
    rope_parameters: Any = None


@dataclass(frozen=True)
class RopeScaling(Method):
    """Swap the model's `config.rope_parameters` for scaled ones and rebuild its rotary embedding from them.

    factor=None: target length / pretrained length (at least 1); with no target length given, 1 (the trained range),
    and an input longer than that is refused in one line.
    Cost: quadratic in the context (the model's own attention runs unchanged).
    """

    label_params = ("factor",)
    factor: float | None = None

    def __post_init__(self) -> None:
        if self.factor is not None and self.factor < 1:
            raise MethodError(f"{self.name}: factor must be >= 1 (got {self.factor})")

    def resolved_factor(self, pretrained_length: int, max_length: int | None) -> float | None:
        """The stretch: `factor`, or the smallest one that covers `max_length` (1 when no length is given)."""
        if self.factor is not None:
            return float(self.factor)
        return max(1.0, (max_length or pretrained_length) / pretrained_length)

    def rope_parameters(self, params: dict[str, Any], rotary_dim: int, pretrained_length: int, max_length: int | None) -> dict[str, Any]:
        """The rope parameters to use instead of `params` (a "default"-type dict holding `rope_theta`), for a model
        trained on `pretrained_length` tokens and inputs of up to `max_length`: the one place this rescaling's
        arithmetic lives, for any engine."""
        if not isinstance(params, dict) or "rope_theta" not in params or params.get("rope_type", "default") != "default":
            # already-scaled types (llama3, yarn...) would need their own arithmetic
            raise MethodError(f"{self.name} needs a model with plain RoPE (rope_type 'default'); got {params}")
        return self.scaled(dict(params), rotary_dim, pretrained_length, max_length)

    def scaled(self, params: dict[str, Any], rotary_dim: int, pretrained_length: int, max_length: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def plan(self, lm: LoadedModel, max_length: int | None = None) -> RopePlan:
        plan = self.scaling_plan(lm, max_length)
        if plan.factor is None:
            return plan
        reach = int(plan.factor * lm.pretrained_length)
        if max_length is not None and reach < max_length:
            raise MethodError(
                f"{self.name} with factor {plan.factor:g} reaches {reach} tokens on a model trained on"
                f" {lm.pretrained_length}, not {max_length}: set factor >= {max_length / lm.pretrained_length:g} or null"
            )
        return replace(plan, reach=reach)

    def scaling_plan(self, lm: LoadedModel, max_length: int | None = None) -> RopePlan:
        """The rescaled parameters, without a reach: what an attention method holding this rescaling plans with (its
        own positions decide how far the model reaches)."""
        factor = self.resolved_factor(lm.pretrained_length, max_length)
        layers = self._rotary_layers(lm)
        params = layers[0].rotary.config.rope_parameters
        if layers[0].layer_type is None:
            scaled = self.rope_parameters(params, 2 * layers[0].inv_freq.numel(), lm.pretrained_length, max_length)
        else:
            # only the global layer types: a local layer never sees a distance past its window
            global_layers = [layer for layer in layers if not layer.is_local(lm.pretrained_length)] or layers
            rotary_dims = {layer.layer_type: 2 * layer.inv_freq.numel() for layer in global_layers}
            scaled = {**params, **{kind: self.rope_parameters(params[kind], dim, lm.pretrained_length, max_length)
                                   for kind, dim in rotary_dims.items()}}
        return RopePlan(factor=factor, rope_parameters=scaled)

    def _rotary_layers(self, lm: LoadedModel) -> list[AttentionLayer]:
        try:
            layers = [layer for layer in attention_layers(lm.model) if layer.rotary is not None]
        except ValueError as error:
            raise MethodError(f"{self.name}: {error}") from None
        rotaries = {id(layer.rotary) for layer in layers}
        if len(rotaries) != 1:
            raise MethodError(
                f"{self.name} needs a RoPE model with one rotary embedding module; {type(lm.model).__name__} has"
                f" {len(rotaries)}" + (" (its attention layers get no rotary position embeddings)" if not rotaries else "")
            )
        return layers

    def install(self, lm: LoadedModel, plan: RopePlan) -> Installation:
        installation = Installation(self, lm, plan)
        self.swap_rotary(lm, plan, installation)
        return installation

    def swap_rotary(self, lm: LoadedModel, plan: RopePlan, installation: Installation) -> None:
        """Put the plan's rope parameters in the model's config and a rotary embedding built from them in the model;
        the installation puts both back."""
        rotary = self._rotary_layers(lm)[0].rotary
        config, params = rotary.config, rotary.config.rope_parameters
        name = next(name for name, module in lm.model.named_modules() if module is rotary)
        parent_name, _, attribute = name.rpartition(".")
        parent = lm.model.get_submodule(parent_name)
        buffer = next(rotary.buffers())
        config.rope_parameters = plan.rope_parameters
        try:
            setattr(parent, attribute, type(rotary)(config=config).to(buffer.device, buffer.dtype))
        except BaseException:
            config.rope_parameters = params
            raise

        def restore() -> None:
            config.rope_parameters = params
            setattr(parent, attribute, rotary)

        installation.on_remove(restore)


@dataclass(frozen=True)
class PositionInterpolation(RopeScaling):
    """Position Interpolation (Chen et al. 2023, "Extending Context Window of Large Language Models via Positional
    Interpolation"): position p is encoded as p / factor, squeezing the target length into the pretrained one.

    factor=None: target length / pretrained length (see RopeScaling).
    """

    name = "pi"

    def scaled(self, params: dict[str, Any], rotary_dim: int, pretrained_length: int, max_length: int | None) -> dict[str, Any]:
        return {**params, "rope_type": "linear", "factor": self.resolved_factor(pretrained_length, max_length)}


@dataclass(frozen=True)
class NTKScaling(RopeScaling):
    """NTK-aware RoPE scaling (bloc97 2023, "NTK-Aware Scaled RoPE", r/LocalLLaMA): raise the RoPE base to
    base * factor ** (d / (d - 2)), d the rotary dim, so that the lowest frequency is interpolated by `factor` while
    the highest ones are nearly untouched.

    dynamic=True (Dynamic NTK, emozilla 2023): transformers' "dynamic" type, which recomputes the base for the current
    length n as base * (factor * n / L - (factor - 1)) ** (d / (d - 2)) once n exceeds the pretrained length L and is
    plain RoPE within it. As in transformers, keys already cached keep the frequencies they were computed with.

    factor=None: static -> target length / pretrained length (see RopeScaling); dynamic -> 1, which makes the
    scale at length n exactly n / L. Dynamic NTK reaches any length (its plan has no fixed factor).
    """

    name = "ntk"
    label_params = ("factor", "dynamic")
    dynamic: bool = True

    def resolved_factor(self, pretrained_length: int, max_length: int | None) -> float | None:
        return None if self.dynamic else super().resolved_factor(pretrained_length, max_length)

    def plan(self, lm: LoadedModel, max_length: int | None = None) -> RopePlan:
        # transformers measures the pretrained length of dynamic NTK as config.max_position_embeddings
        if self.dynamic and lm.model.config.max_position_embeddings != lm.pretrained_length:
            raise MethodError(
                f"dynamic ntk scales from config.max_position_embeddings={lm.model.config.max_position_embeddings}"
                f" but the pretrained length is {lm.pretrained_length}; use dynamic=false"
            )
        return super().plan(lm, max_length)

    def scaled(self, params: dict[str, Any], rotary_dim: int, pretrained_length: int, max_length: int | None) -> dict[str, Any]:
        if self.dynamic:
            return {**params, "rope_type": "dynamic", "factor": float(self.factor if self.factor is not None else 1.0)}
        factor = self.resolved_factor(pretrained_length, max_length)
        return {**params, "rope_theta": params["rope_theta"] * factor ** (rotary_dim / (rotary_dim - 2))}


@dataclass(frozen=True)
class YaRN(RopeScaling):
    """YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"), through
    transformers' `yarn` rope type, with a static factor s = `factor`:

    * NTK-by-parts: a RoPE dimension whose wavelength fits more than `beta_fast` times into the trained length L keeps
      its frequency (extrapolation), one that fits fewer than `beta_slow` times is interpolated like PI (frequency / s),
      and the dimensions in between are blended by a ramp linear in the dimension index (the authors' code, which
      transformers follows; the paper writes the ramp in the rotation count);
    * attention temperature: cos and sin are multiplied by 0.1 ln(s) + 1, so every attention logit is scaled by its
      square (the paper's sqrt(1/t) = 0.1 ln(s) + 1).

    factor: s; None means target length / pretrained length (see RopeScaling), at least 1. factor 1 is the plain
        model (no dimension is interpolated and the temperature is 1).
    beta_fast, beta_slow: the ramp's bounds in rotations over the trained length (the paper's alpha = 1, beta = 32 for
        Llama, written in transformers' names).
    dynamic: refused. Dynamic YaRN recomputes the frequencies for the current length, while cached keys keep the ones
        they were rotated with, so a decoded token would see other positions than the same token in a prefill.

    Cost: quadratic in the context, as full attention.
    """

    name = "yarn"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    dynamic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dynamic:
            raise MethodError("yarn: dynamic YaRN changes the frequencies under keys already cached; use a static factor (dynamic=false)")
        if not 0 < self.beta_slow < self.beta_fast:
            raise MethodError(f"yarn: need 0 < beta_slow < beta_fast (got {self.beta_slow}, {self.beta_fast})")

    def scaled(self, params: dict[str, Any], rotary_dim: int, pretrained_length: int, max_length: int | None) -> dict[str, Any]:
        return {
            **params,
            "rope_type": "yarn",
            "factor": self.resolved_factor(pretrained_length, max_length),
            "original_max_position_embeddings": pretrained_length,
            "beta_fast": float(self.beta_fast),
            "beta_slow": float(self.beta_slow),
        }


# The rescalings an attention method takes as its `rope_scaling`, by name.
RESCALINGS: dict[str, type[RopeScaling]] = {cls.name: cls for cls in (PositionInterpolation, NTKScaling, YaRN)}


def rope_scaling_value(value: RopeScaling | dict[str, Any] | None, owner: str) -> RopeScaling | None:
    """The rescaling an attention method `owner` was given, as an object: a `RopeScaling`, or its config as a dict
    ({"name": "yarn", "factor": 2}, as Hydra passes `method.rope_scaling={name:yarn,factor:2}`). Raises MethodError
    (one line) on an unknown name or parameter, and on a rescaling whose frequencies change with the length."""
    if value is None or isinstance(value, RopeScaling):
        rescaling = value
    elif isinstance(value, Mapping):
        params = dict(value)
        name = params.pop("name", None)
        if name not in RESCALINGS:
            raise MethodError(f"{owner}: rope_scaling needs name: one of {', '.join(RESCALINGS)} (got {name!r})")
        valid = {field.name for field in parameters(RESCALINGS[name])}
        if set(params) - valid:
            raise MethodError(f"{owner}: rope_scaling {name} has no parameter {', '.join(sorted(set(params) - valid))}; valid: {', '.join(sorted(valid))}")
        rescaling = RESCALINGS[name](**params)
    else:
        raise MethodError(f"{owner}: rope_scaling must be a rescaling such as {{name: pi, factor: 2}}, got {value!r}")
    if getattr(rescaling, "dynamic", False):
        # the frequencies would change with the length, under keys already cached and re-rotated with the old ones
        raise MethodError(f"{owner} cannot combine with dynamic {rescaling.name}; use rope_scaling={{name: {rescaling.name}, dynamic: false, factor: F}}")
    return rescaling
