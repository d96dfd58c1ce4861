"""A model's attention layers and the RoPE each one uses, read from the model itself; and RoPE arithmetic.

RoPE rotations compose: a vector rotated for position p, rotated again by d, equals the vector rotated for p + d.
So a method can sit behind the standard attention hook (which hands it keys already rotated at their absolute
positions) and still place every key wherever it wants, by rotating it by (new - old) position.
Half-split layout (`rotate_half`), as in Llama, Mistral, Qwen, Phi-3, Gemma, GPT-NeoX; partial rotary dims are kept.

Which modules are attention layers, and which frequencies rotate their queries and keys, is not guessed from names
(`q_proj` misses fused-QKV models; one `rotary_emb.inv_freq` misses Gemma 3's per-layer-type bases): a two-token probe
forward records the modules that call transformers' attention interface, the sliding window each passes to it, and
the cos/sin each receives from a rotary embedding module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel

PROBE_ATTENTION = "longctx_probe"

# RoPE types whose frequencies change with the sequence length: keys cached earlier were rotated with other ones.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# Arguments some layers pass to their attention that change its result: logit soft-capping (Gemma 2), learned sinks
# (gpt-oss). Methods that replace the attention would silently drop them.
ATTENTION_EXTRAS = ("softcap", "s_aux")


@dataclass(frozen=True)
class AttentionLayer:
    """One module that calls the attention interface, as the probe saw it.

    sliding_window: the local window the layer passes to its attention (None: it attends to the whole context).
    rotary: the rotary embedding module whose cos/sin the layer receives (None: no RoPE, e.g. GPT-2).
    layer_type: the `layer_types` entry the rotary module was called for (Gemma 3: "sliding_attention" /
        "full_attention"), None when the model has one RoPE for all layers.
    extras: the `ATTENTION_EXTRAS` the layer passes to its attention (not None).
    """

    module: torch.nn.Module
    index: int
    sliding_window: int | None
    rotary: torch.nn.Module | None
    layer_type: str | None
    extras: tuple[str, ...] = ()

    @property
    def inv_freq(self) -> torch.Tensor:
        """The frequencies rotating this layer's queries and keys now, float32 [rotary_dim // 2] (< head_dim // 2 for
        partial rotary)."""
        name = f"{self.layer_type}_inv_freq" if self.layer_type else "inv_freq"
        return getattr(self.rotary, name).detach().float()

    @property
    def rope_type(self) -> str | None:
        rope_type = getattr(self.rotary, "rope_type", None)
        return rope_type.get(self.layer_type) if isinstance(rope_type, dict) else rope_type

    def is_local(self, pretrained_length: int) -> bool:
        """A sliding-window layer whose window is shorter than the trained context: it never sees far tokens."""
        return self.sliding_window is not None and self.sliding_window < pretrained_length


def attention_layers(model: PreTrainedModel) -> list[AttentionLayer]:
    """The model's attention layers in order, found by a two-token forward pass (no cache, no gradients).

    Raises ValueError (one line) when a layer gets a RoPE that is not in the half-split layout.
    """
    calls: dict[torch.nn.Module, dict[str, Any]] = {}
    given: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    produced: list[tuple[tuple[torch.Tensor, torch.Tensor], torch.nn.Module, str | None, torch.Tensor]] = []

    def probe_attention(module, query, key, value, attention_mask, **kwargs):
        calls.setdefault(module, kwargs)
        # the output only has to have the right shape: nothing downstream of the probe is read
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    def record_position_embeddings(module, args, kwargs):
        if kwargs.get("position_embeddings") is not None:
            given[module] = kwargs["position_embeddings"]

    def record_rotary_output(module, args, kwargs, output):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        layer_type = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
        produced.append((output, module, layer_type if isinstance(layer_type, str) else None, positions))

    hooks = [m.register_forward_pre_hook(record_position_embeddings, with_kwargs=True) for m in model.modules()]
    hooks += [
        m.register_forward_hook(record_rotary_output, with_kwargs=True)
        for m in model.modules()
        if any(name.endswith("inv_freq") for name, _ in m.named_buffers(recurse=False))
    ]
    AttentionInterface.register(PROBE_ATTENTION, probe_attention)
    implementation = model.config._attn_implementation  # no public getter; the setter below is public
    model.set_attn_implementation(PROBE_ATTENTION)
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        model.set_attn_implementation(implementation)
        for hook in hooks:
            hook.remove()

    layers = []
    for order, (module, kwargs) in enumerate(calls.items()):
        rotary, layer_type, positions = None, None, None
        cos_sin = given.get(module)
        for output, candidate, candidate_type, candidate_positions in produced:
            if cos_sin is not None and output[0] is cos_sin[0]:
                rotary, layer_type, positions = candidate, candidate_type, candidate_positions
                break
        extras = tuple(name for name in ATTENTION_EXTRAS if kwargs.get(name) is not None)
        index = getattr(module, "layer_idx", order)
        layer = AttentionLayer(module, index, kwargs.get("sliding_window"), rotary, layer_type, extras)
        if rotary is not None:
            _check_half_split(layer, cos_sin, positions)
        layers.append(layer)
    return layers


def _check_half_split(layer: AttentionLayer, cos_sin: tuple[torch.Tensor, torch.Tensor], positions) -> None:
    """Refuse a RoPE whose cos/sin are not cat(freqs, freqs) of the found frequencies (e.g. GPT-J's interleaved)."""
    cos, sin = (t.float() for t in cos_sin)
    scale = (cos**2 + sin**2).sqrt()  # YaRN / LongRoPE multiply cos and sin by an attention scaling
    angles = positions.float()[..., None].to(cos.device) * layer.inv_freq.to(cos.device)
    angles = torch.cat((angles, angles), dim=-1)
    if angles.shape != cos.shape or not (
        torch.allclose(cos / scale, angles.cos(), atol=2e-2) and torch.allclose(sin / scale, angles.sin(), atol=2e-2)
    ):
        raise ValueError(
            f"attention layer {layer.index} ({type(layer.module).__name__}) gets a RoPE that is not in the half-split"
            " (rotate_half) layout longctx re-rotates"
        )


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE vectors `x` [..., head_dim] by `delta` positions (broadcastable to x.shape[:-1]).

    Angles are computed in float32 then applied in x's dtype, as transformers does.
    """
    rot_dim = inv_freq.numel() * 2
    angles = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated_half * sin
    if not x_pass.numel():
        return out
    # delta may broadcast x to more dims (one query turned for every slot): the un-rotated part follows
    return torch.cat((out, x_pass.expand(*out.shape[:-1], x_pass.shape[-1])), dim=-1)
