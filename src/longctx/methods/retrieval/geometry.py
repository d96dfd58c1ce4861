"""What a query attends to in a retrieval method, and where those keys sit: the numbers both methods share.

The context is cut into blocks of w tokens (LongHeads' chunks, InfLLM's memory blocks). A query at position t, in a
group of queries that share one selection and starts at g, attends to
  * the sink: the first `sink` blocks (LongHeads: the first chunk; InfLLM: the n_init initial tokens);
  * the `top_k` retrieved blocks: the best-scoring of the blocks between the sink and block m, m = (g - local) // w;
  * the recent span: every token from m * w up to t (LongHeads: the previous and the current chunk; InfLLM: the
    n_local tokens of its local window and the few older ones not yet in a memory block).
Queries before `begin` retrieve nothing: they attend to every earlier token (m = 0, no blocks).

Where the keys sit (the position seam), `one_distance`:
  * None, consecutive slots (LongHeads): sink and retrieved blocks side by side in their original order, slot i at
    positions i*w.., then the recent span at its true relative positions, the query at its end. A far block c in slot
    i moves n = m - c - (sink + top_k - i) blocks toward the query.
  * an integer D, one distance (InfLLM): a key within `local` tokens of the query keeps its distance; every other
    attended key sits at distance D = local - 1 (the release rotates the query to position n_local - 1 and leaves
    memory keys at 0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """The fixed numbers of one retrieval configuration (see the module docstring)."""

    window: int  # w, tokens per block
    sink: int  # blocks at the start that every query attends to
    top_k: int  # blocks retrieved per selection
    local: int  # a multiple of w: blocks ending within `local` tokens before a group are recent, never retrieved
    begin: int  # first query position that retrieves; earlier ones attend to every earlier token
    block: int  # prefill queries sharing one selection (1 = per token)
    exact_tail: int  # last prefill queries that always select per token
    gather_budget: int  # key vectors gathered at once by the reference kernel; bounds its working memory
    one_distance: int | None = None  # None: consecutive slots; D: every key beyond `local` at distance D
    whole_groups: bool = True  # the per-token tail starts at a group boundary (False: exactly the last exact_tail)

    @property
    def slots(self) -> int:
        """Far slots per selection: the sink blocks and the retrieved ones."""
        return self.sink + self.top_k

    def first_recent(self, group_start: int) -> int:
        """m: the first block of the recent span of a query group starting at `group_start`."""
        return max(0, (group_start - self.local) // self.window)
