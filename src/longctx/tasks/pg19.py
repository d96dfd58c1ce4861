"""Long-document perplexity (PG19-style): cut long books into non-overlapping segments of each length, score them.

A method that extends the context should keep perplexity flat (or falling) as the segment grows past the
pretrained length; the loss-by-position curve shows where it breaks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from longctx.data.books import SOURCES, Book, book_files, load_books
from longctx.models import LoadedModel
from longctx.tasks.base import SampleCallback, Task, TaskError, peak_host_memory_gib, reset_peak_host_memory

log = logging.getLogger(__name__)


def tokenize_book(lm: LoadedModel, book: Book) -> torch.Tensor:
    """The book's token ids, no special tokens (a segment starts mid-book, as in PG19 evaluation)."""
    # verbose=False: a book is far longer than the tokenizer's model_max_length, and that warning is noise here.
    ids = lm.tokenizer(book.text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.inference_mode()
def token_nll(lm: LoadedModel, input_ids: torch.Tensor, slice_tokens: int) -> torch.Tensor:
    """Per-token negative log-likelihood (float32, length len(input_ids) - 1) of a 1-D sequence.

    Full-sequence logits would be len x vocab floats (6 GB at 32k tokens with a 49k vocabulary), so the decoder
    runs once and the LM head plus cross entropy run on `slice_tokens` positions at a time. The decoder is called
    like the model would call it, so whatever attention a method registered is the one that runs.
    """
    model = lm.model
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)  # Gemma 2/3 squash logits
    ids = input_ids.to(lm.device)[None]
    # use_cache=False: a KV cache of the whole segment would only cost memory; nothing is generated.
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    nll = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], slice_tokens):
        end = min(start + slice_tokens, targets.shape[0])
        logits = head(hidden[start:end]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        nll[start:end] = F.cross_entropy(logits, targets[start:end], reduction="none")
    return nll


def plan_segments(token_counts: list[int], length: int, count: int) -> list[tuple[int, int]]:
    """(book index, segment index) pairs: up to `count` segments of `length` tokens, taken round-robin over the
    books long enough (first segments of every book, then second segments...), so no single book dominates."""
    per_book = [n // length for n in token_counts]
    plan: list[tuple[int, int]] = []
    for segment in range(max(per_book, default=0)):
        for book, available in enumerate(per_book):
            if segment < available and len(plan) < count:
                plan.append((book, segment))
    return plan


@dataclass
class PG19Perplexity(Task):
    """Perplexity of long books at each segment length, plus mean loss by position inside the segment.

    Args:
        lengths: segment lengths in tokens; each segment is exactly this long and scored on all but its first token.
        num_books: use only the first books of the source (None: all).
        segments_per_length: segments scored per length, round-robin over the books long enough.
        source: ``builtin`` (offline: Austen's novels, Shakespeare's plays, Milton; built once in the cache),
            ``folder`` (``path`` = a folder of .txt books) or ``hub`` (PG19 test split; ``path`` = dataset name).
        path: see ``source``; for ``builtin`` it overrides the corpus cache folder.
        position_buckets: points on the loss-by-position curve per length.
        slice_tokens: positions whose logits are materialised at once (memory: slice x vocab floats).
    """

    name: ClassVar[str] = "pg19"

    lengths: list[int] = field(default_factory=lambda: [1024, 2048])  # CPU-sized; raise past the pretrained length
    num_books: int | None = None
    segments_per_length: int = 4
    source: str = "builtin"
    path: str | None = None
    position_buckets: int = 32
    slice_tokens: int = 1024

    def __post_init__(self) -> None:
        self.lengths = [int(length) for length in self.lengths]  # Hydra hands over a ListConfig
        if not self.lengths or min(self.lengths) < 2:
            raise TaskError(f"task.lengths must be a non-empty list of lengths >= 2 tokens, got {self.lengths}")
        for key in ("segments_per_length", "position_buckets", "slice_tokens"):
            if getattr(self, key) < 1:
                raise TaskError(f"task.{key} must be >= 1, got {getattr(self, key)}")
        if self.source not in SOURCES:
            raise TaskError(f"unknown task.source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.source == "folder":
            if not self.path:
                raise TaskError("task.source=folder needs task.path=<folder of .txt books>")
            book_files(self.path)  # before the model loads: a folder without books is a one-line error
        if self.num_books is not None and self.num_books < 1:
            raise TaskError(f"task.num_books must be >= 1 or null (all), got {self.num_books}")
        # Filled by run(): per length, the summed NLL at each target position and the number of segments summed.
        self._position_sums: dict[int, np.ndarray] = {}
        self._position_counts: dict[int, int] = {}
        self._pretrained_length: int | None = None
        self._books: list[Book] | None = None

    def max_length(self) -> int:
        return max(self.lengths)

    def check(self, lm: LoadedModel) -> None:
        # read before the run folder exists: a hub or corpus that cannot be read fails in one line, first
        self._books = load_books(self.source, self.path, self.num_books)

    def run(self, lm: LoadedModel, on_sample: SampleCallback) -> dict[str, float]:
        books = self._books if self._books is not None else load_books(self.source, self.path, self.num_books)
        tokens: list[torch.Tensor] = []
        for book in books:
            tokens.append(tokenize_book(lm, book))
            # Round-robin starts with the first segment of each book long enough, so once every length has
            # enough such books the later ones would never be read: stop (tokenizing all 48 built-in books takes 15 s).
            if all(sum(len(ids) >= n for ids in tokens) >= self.segments_per_length for n in self.lengths):
                break
        books = books[: len(tokens)]
        counts = [len(ids) for ids in tokens]
        log.info("using %d books, %d to %d tokens", len(books), min(counts), max(counts))

        # Plan every length before scoring any, so an impossible length fails in seconds, not after an hour.
        plans: dict[int, list[tuple[int, int]]] = {}
        skipped: dict[int, int] = {}
        for length in self.lengths:
            skipped[length] = sum(count < length for count in counts)
            if skipped[length]:
                log.info("length %d: skipping %d of %d books shorter than that", length, skipped[length], len(books))
            plans[length] = plan_segments(counts, length, self.segments_per_length)
            if not plans[length]:
                raise TaskError(
                    f"no book has {length} tokens (longest: {max(counts)}): lower task.lengths or use longer books"
                )
            if len(plans[length]) < self.segments_per_length:
                log.warning("length %d: only %d segments available", length, len(plans[length]))

        self._position_sums, self._position_counts = {}, {}
        self._pretrained_length = lm.pretrained_length
        metrics: dict[str, float] = {}
        progress = tqdm(total=sum(map(len, plans.values())), desc="pg19", unit="segment")
        sample = 0  # not progress.n: a disabled bar (TQDM_DISABLE=1) never counts
        for length, plan in plans.items():
            sums = np.zeros(length - 1, dtype=np.float64)
            peaks = []
            for book_index, segment in plan:
                reset_peak_host_memory()
                started = time.perf_counter()
                nll = token_nll(lm, tokens[book_index][segment * length : (segment + 1) * length], self.slice_tokens)
                nll = nll.double().cpu().numpy()
                sums += nll
                mean = float(nll.mean())
                peaks.append(peak_host_memory_gib())
                on_sample(
                    {
                        "sample": sample,
                        "length": length,
                        "book": books[book_index].id,
                        "title": books[book_index].title,
                        "segment": segment,
                        "nll": mean,
                        "ppl": math.exp(mean),
                        "tokens": len(nll),
                        "seconds": time.perf_counter() - started,
                        "peak_rss_gib": peaks[-1],
                    }
                )
                sample += 1
                progress.update()
            self._position_sums[length], self._position_counts[length] = sums, len(plan)
            # Every segment scores the same number of tokens, so the token-weighted mean is the mean over positions.
            mean_nll = float(sums.mean() / len(plan))
            metrics[f"ppl@{length}"] = math.exp(mean_nll)
            metrics[f"nll@{length}"] = mean_nll
            metrics[f"segments@{length}"] = float(len(plan))
            metrics[f"skipped_books@{length}"] = float(skipped[length])
            if None not in peaks:
                metrics[f"peak_rss_gib@{length}"] = max(peaks)
            log.info("length %d: ppl %.3f over %d segments", length, metrics[f"ppl@{length}"], len(plan))
        progress.close()
        return metrics

    def tables(self) -> dict[str, Any]:
        rows = []
        for length, sums in self._position_sums.items():
            # Target positions run 1..length-1; bucket edges split 0..length evenly (bucket 0 has no position 0).
            means = sums / self._position_counts[length]
            edges = np.linspace(0, length, min(self.position_buckets, length - 1) + 1).astype(int)
            for start, end in zip(edges[:-1], edges[1:]):
                bucket = means[max(start - 1, 0) : end - 1]
                if len(bucket):
                    rows.append({"length": length, "bucket_start": int(start), "mean_nll": float(bucket.mean())})
        if not rows:
            return {}
        return {"loss_by_position": pd.DataFrame(rows, columns=["length", "bucket_start", "mean_nll"])}

    def figures(self) -> dict[str, Any]:
        table = self.tables().get("loss_by_position")
        if table is None:
            return {}
        # A bare Figure (no pyplot) draws with the Agg canvas and leaves no global state behind.
        figure = Figure(figsize=(7, 4), layout="constrained")
        axes = figure.subplots()
        for length, curve in table.groupby("length"):
            axes.plot(curve["bucket_start"], curve["mean_nll"], marker=".", label=f"{length} tokens")
        if self._pretrained_length and self._pretrained_length < table["bucket_start"].max():
            axes.axvline(self._pretrained_length, color="grey", linestyle=":", label="pretrained length")
        axes.set_xlabel("token position in segment")
        axes.set_ylabel("mean NLL (nats)")
        axes.set_title(f"Loss by position ({self.source} books)")
        axes.legend()
        return {"loss_by_position": figure}
