from __future__ import annotations

from dataclasses import dataclass

from longctx.methods.method import Method


@dataclass(frozen=True)
class FullAttention(Method):
    """The unmodified model: ordinary causal attention over the whole context, at true positions.

    The reference every method is measured against; it breaks past the pretrained length, which is the point.
    """

    name = "full"
