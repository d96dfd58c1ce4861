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
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from longctx.methods.method import Method, MethodError
from longctx.methods.rope import attention_layers
from longctx.models import LoadedModel


@dataclass
class RopeScaling(Method):
    """Swap the model's `config.rope_parameters` for scaled ones and rebuild its rotary embedding from them.

    Cost: quadratic in the context (the model's own attention runs unchanged).
    """

    factor: float | None = None
    _target_length: int | None = field(default=None, init=False, repr=False, compare=False)
    _saved: tuple[Any, dict[str, Any], torch.nn.Module, str, torch.nn.Module] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.factor is not None and self.factor < 1:
            raise MethodError(f"{self.name}: factor must be >= 1 (got {self.factor})")

    def aim(self, length: int) -> None:
        """The length to serve: with factor=None the factor is derived from it. An attention method holding this
        rescaling calls this instead of `check_length`: its own positions decide how far the rescaling must reach."""
        self._target_length = length

    def check_length(self, lm: LoadedModel, length: int) -> None:
        # The runner calls this before `apply`.
        self.aim(length)
        if not getattr(self, "dynamic", False) and self.stretch(lm) * lm.pretrained_length < length:
            raise MethodError(
                f"{self.name} with factor {self.factor:g} reaches {int(self.factor * lm.pretrained_length)} tokens on a model"
                f" trained on {lm.pretrained_length}, not {length}: set factor >= {length / lm.pretrained_length:g} or null"
            )

    def stretch(self, lm: LoadedModel) -> float:
        """How many times the trained length the rescaled positions cover (the factor, resolved)."""
        return self.factor if self.factor is not None else self.length_factor(lm)

    def length_factor(self, lm: LoadedModel) -> float:
        """Target length / pretrained length, at least 1: the smallest stretch that keeps positions in range."""
        if self._target_length is None:
            raise MethodError(f"{self.name}: factor=None needs check_length(lm, target_length) first, or set factor")
        return max(1.0, self._target_length / lm.pretrained_length)

    def scaled(self, lm: LoadedModel, params: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
        """The rope parameters to use instead of `params` (a "default"-type dict holding `rope_theta`)."""
        raise NotImplementedError

    def _scaled_checked(self, lm: LoadedModel, params: Any, rotary_dim: int) -> dict[str, Any]:
        # Already-scaled types (llama3, yarn...) would need their own arithmetic.
        if not isinstance(params, dict) or "rope_theta" not in params or params.get("rope_type") != "default":
            raise MethodError(f"{self.name} needs a model with plain RoPE (rope_type 'default'); got {params}")
        return self.scaled(lm, dict(params), rotary_dim)

    def apply(self, lm: LoadedModel) -> None:
        model_name = type(lm.model).__name__
        try:
            layers = [layer for layer in attention_layers(lm.model) if layer.rotary is not None]
        except ValueError as error:
            raise MethodError(f"{self.name}: {error}") from None
        rotaries = list({id(layer.rotary): layer.rotary for layer in layers}.values())
        if len(rotaries) != 1:
            raise MethodError(
                f"{self.name} needs a RoPE model with one rotary embedding module; {model_name} has {len(rotaries)}"
                + (" (its attention layers get no rotary position embeddings)" if not rotaries else "")
            )
        rotary = rotaries[0]
        config, params = rotary.config, rotary.config.rope_parameters
        if layers[0].layer_type is None:
            config.rope_parameters = self._scaled_checked(lm, params, 2 * layers[0].inv_freq.numel())
        else:
            global_layers = [layer for layer in layers if not layer.is_local(lm.pretrained_length)] or layers
            rotary_dims = {layer.layer_type: 2 * layer.inv_freq.numel() for layer in global_layers}
            config.rope_parameters = {
                **params, **{kind: self._scaled_checked(lm, params[kind], dim) for kind, dim in rotary_dims.items()}
            }
        name = next(name for name, module in lm.model.named_modules() if module is rotary)
        parent_name, _, attribute = name.rpartition(".")
        parent = lm.model.get_submodule(parent_name)
        buffer = next(rotary.buffers())
        setattr(parent, attribute, type(rotary)(config=config).to(buffer.device, buffer.dtype))
        self._saved = (config, params, parent, attribute, rotary)

    def remove(self, lm: LoadedModel) -> None:
        config, params, parent, attribute, rotary = self._saved
        config.rope_parameters = params
        setattr(parent, attribute, rotary)
        self._saved = None


@dataclass
class PositionInterpolation(RopeScaling):
    """Position Interpolation (Chen et al. 2023, "Extending Context Window of Large Language Models via Positional
    Interpolation"): position p is encoded as p / factor, squeezing the target length into the pretrained one.

    factor=None: target length / pretrained length, taken from `check_length`.
    """

    name = "pi"

    def scaled(self, lm: LoadedModel, params: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
        return {**params, "rope_type": "linear", "factor": float(self.stretch(lm))}


@dataclass
class NTKScaling(RopeScaling):
    """NTK-aware RoPE scaling (bloc97 2023, "NTK-Aware Scaled RoPE", r/LocalLLaMA): raise the RoPE base to
    base * factor ** (d / (d - 2)), d the rotary dim, so that the lowest frequency is interpolated by `factor` while
    the highest ones are nearly untouched.

    dynamic=True (Dynamic NTK, emozilla 2023): transformers' "dynamic" type, which recomputes the base for the current
    length n as base * (factor * n / L - (factor - 1)) ** (d / (d - 2)) once n exceeds the pretrained length L and is
    plain RoPE within it. As in transformers, keys already cached keep the frequencies they were computed with.

    factor=None: static -> target length / pretrained length (from `check_length`); dynamic -> 1, which makes the
    scale at length n exactly n / L.
    """

    name = "ntk"
    dynamic: bool = True

    def stretch(self, lm: LoadedModel) -> float:
        if self.dynamic:
            raise MethodError("dynamic ntk has no fixed stretch: its frequencies change with the length")
        return super().stretch(lm)

    def scaled(self, lm: LoadedModel, params: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
        if self.dynamic:
            # transformers measures the pretrained length as config.max_position_embeddings.
            if lm.model.config.max_position_embeddings != lm.pretrained_length:
                raise MethodError(
                    f"dynamic ntk scales from config.max_position_embeddings={lm.model.config.max_position_embeddings}"
                    f" but the pretrained length is {lm.pretrained_length}; use dynamic=false"
                )
            factor = self.factor if self.factor is not None else 1.0
            return {**params, "rope_type": "dynamic", "factor": float(factor)}
        factor = self.stretch(lm)
        return {**params, "rope_theta": params["rope_theta"] * factor ** (rotary_dim / (rotary_dim - 2))}


@dataclass
class YaRN(RopeScaling):
    """YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"), through
    transformers' `yarn` rope type, with a static factor s = `factor`:

    * NTK-by-parts: a RoPE dimension whose wavelength fits more than `beta_fast` times into the trained length L keeps
      its frequency (extrapolation), one that fits fewer than `beta_slow` times is interpolated like PI (frequency / s),
      and the dimensions in between are blended by a ramp linear in the dimension index (the authors' code, which
      transformers follows; the paper writes the ramp in the rotation count);
    * attention temperature: cos and sin are multiplied by 0.1 ln(s) + 1, so every attention logit is scaled by its
      square (the paper's sqrt(1/t) = 0.1 ln(s) + 1).

    factor: s; None means target length / pretrained length (from `check_length`), at least 1. factor 1 is the plain
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

    def scaled(self, lm: LoadedModel, params: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
        return {
            **params,
            "rope_type": "yarn",
            "factor": float(self.stretch(lm)),
            "original_max_position_embeddings": lm.pretrained_length,
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
        valid = {f.name for f in fields(RESCALINGS[name]) if f.init and not f.name.startswith("_")}
        if set(params) - valid:
            raise MethodError(f"{owner}: rope_scaling {name} has no parameter {', '.join(sorted(set(params) - valid))}; valid: {', '.join(sorted(valid))}")
        rescaling = RESCALINGS[name](**params)
    else:
        raise MethodError(f"{owner}: rope_scaling must be a rescaling such as {{name: pi, factor: 2}}, got {value!r}")
    if getattr(rescaling, "dynamic", False):
        # the frequencies would change with the length, under keys already cached and re-rotated with the old ones
        raise MethodError(f"{owner} cannot combine with dynamic {rescaling.name}; use rope_scaling={{name: {rescaling.name}, dynamic: false, factor: F}}")
    return rescaling
