"""RoPE arithmetic shared by methods that move cached keys to new positions.

RoPE rotations compose: a vector rotated for position p, rotated again by d, equals the vector rotated for p + d.
So a method can sit behind the standard attention hook (which hands it keys already rotated at their absolute
positions) and still place every key wherever it wants, by rotating it by (new - old) position.
Half-split layout (`rotate_half`), as in Llama, Mistral, Qwen, Gemma, GPT-NeoX; partial rotary dims are kept.
"""

from __future__ import annotations

import torch


def rope_inv_freq(model) -> torch.Tensor:
    """The inverse frequencies the model is using now (after any PI / NTK scaling), shape [rotary_dim // 2]."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{type(model).__name__} has no rotary embedding (model.model.rotary_emb): not a RoPE model")
    return rotary.inv_freq


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
    return torch.cat((out, x_pass.expand(*out.shape[:-1], x_pass.shape[-1])), dim=-1)  # delta may broadcast x
