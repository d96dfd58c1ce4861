"""Training-free RoPE rescaling baselines: Position Interpolation and NTK-aware scaling.

Both only change the model's rope parameters and rebuild its rotary embedding from them, so they touch neither the
attention implementation nor the weights. That makes them composable: another method (LongHeads) can hold one of
these and call its `apply`/`remove` around its own patch; the attention layers then see the scaled frequencies.

Where RoPE differs per layer type (Gemma 3: theta 1e4 for local sliding-window layers, 1e6 for global ones), only the
types of the global layers are rescaled: a local layer never sees a distance past its window, so stretching its
positions would only blur it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from longctx.methods.base import Method, MethodError
from longctx.methods.rope import attention_layers
from longctx.models import LoadedModel


@dataclass
class _RopeScaling(Method):
    """Swap the model's `config.rope_parameters` for scaled ones and rebuild its rotary embedding from them."""

    factor: float | None = None
    _target_length: int | None = field(default=None, init=False, repr=False, compare=False)
    _saved: tuple[Any, dict[str, Any], torch.nn.Module, str, torch.nn.Module] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.factor is not None and self.factor < 1:
            raise MethodError(f"{self.name}: factor must be >= 1 (got {self.factor})")

    def check_length(self, lm: LoadedModel, length: int) -> None:
        # The runner calls this before `apply`; with factor=None the factor is derived from this length.
        self._target_length = length

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
class PositionInterpolation(_RopeScaling):
    """Position Interpolation (Chen et al. 2023, "Extending Context Window of Large Language Models via Positional
    Interpolation"): position p is encoded as p / factor, squeezing the target length into the pretrained one.

    factor=None: target length / pretrained length, taken from `check_length`.
    """

    name = "pi"

    def scaled(self, lm: LoadedModel, params: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
        factor = self.factor if self.factor is not None else self.length_factor(lm)
        return {**params, "rope_type": "linear", "factor": float(factor)}


@dataclass
class NTKScaling(_RopeScaling):
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
        factor = self.factor if self.factor is not None else self.length_factor(lm)
        return {**params, "rope_theta": params["rope_theta"] * factor ** (rotary_dim / (rotary_dim - 2))}
