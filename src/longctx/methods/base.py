"""What every method is: a small dataclass that patches a loaded model and can undo it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache

from longctx.models import LoadedModel


class MethodError(ValueError):
    """A method cannot serve this model or this length; the message says what to change."""


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_start: int, scaling: float, dropout: float = 0.0
) -> torch.Tensor:
    """Ordinary causal attention at true positions; query [B, Hq, L, D] starts at position q_start, keys at 0."""
    q_len, kv_len = query.shape[2], key.shape[2]
    options = dict(dropout_p=dropout, scale=scaling, enable_gqa=True)
    if q_start == 0 and q_len == kv_len:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, **options)
    positions = torch.arange(q_start, q_start + q_len, device=query.device)
    mask = torch.arange(kv_len, device=query.device)[None, :] <= positions[:, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, **options)


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

    def check_length(self, lm: LoadedModel, length: int) -> None:
        """Raise `MethodError` if this method cannot run the model at `length` tokens."""

    def trace(self) -> dict[str, Any] | None:
        """Method-specific record of the last forward pass (e.g. chosen chunks), or None."""
        return None

    @contextmanager
    def __call__(self, lm: LoadedModel) -> Iterator[LoadedModel]:
        self.apply(lm)
        try:
            yield lm
        finally:
            self.remove(lm)


@dataclass
class AttentionMethod(Method):
    """A method that swaps every layer's attention for a registered function and brings its own KV cache.

    The plumbing lives here once: register `attention_function` with transformers' `AttentionInterface`, point every
    attention module at this method (the function finds it as `module.longctx_method`), and hook the decoder's forward
    so that each sequence carries the cache `prepare_cache` returns (plain `model(...)` and `generate()` alike).
    Batches must not be padded: transformers builds no mask for a custom attention function.
    """

    attention_name: ClassVar[str] = "base"

    @staticmethod
    def attention_function(module, query, key, value, attention_mask, **kwargs):
        raise NotImplementedError

    def prepare_cache(self, config, cache: Cache | None, use_cache: bool | None) -> Cache | None:
        """The cache this forward call should use, given the one it was called with."""
        return cache

    def apply(self, lm: LoadedModel) -> None:
        model = lm.model
        AttentionInterface.register(self.attention_name, self.attention_function)
        modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
        if not modules:
            raise MethodError(f"{self.name} found no attention layers (with q_proj and layer_idx) in {type(model).__name__}")
        for module in modules:
            module.longctx_method = self
        # on the decoder, not the LM wrapper: tasks that call the decoder directly (perplexity) pass through it too
        hook = model.get_decoder().register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._installed = (model.config._attn_implementation, hook, modules)
        model.config._attn_implementation = self.attention_name

    def remove(self, lm: LoadedModel) -> None:
        implementation, hook, modules = self._installed
        lm.model.config._attn_implementation = implementation
        hook.remove()
        for module in modules:
            del module.longctx_method
        del self._installed

    def _before_forward(self, decoder, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise MethodError(f"{self.name} does not support padded batches; run one sequence (or equal lengths) at a time")
        kwargs["past_key_values"] = self.prepare_cache(decoder.config, kwargs.get("past_key_values"), kwargs.get("use_cache"))
        return args, kwargs
