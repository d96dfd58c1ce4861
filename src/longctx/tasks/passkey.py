"""Passkey retrieval (Mohtashami & Jaggi 2023, as used by YaRN and LongHeads).

A task instruction, a repeated filler sentence group, one line holding a random 5-digit key at a chosen depth,
then the question. A sample is correct when the first integer in the greedy continuation is the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from longctx.models import LoadedModel
from longctx.tasks.base import SampleCallback, Task, TaskError, greedy_generate

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

_INTEGER = re.compile(r"\d+")


def first_integer(text: str) -> int | None:
    """The first run of digits in `text` as an int, or None ("key is 12,345" reads 12: the model must answer plainly)."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


@dataclass
class PasskeyPrompt:
    text: str
    key: int
    depth: float
    num_tokens: int
    needle_token: int  # index of the first token of the needle line
    needle_end: int  # index one past its last token


def build_prompt(tokenizer, length: int, depth: float, key: int) -> PasskeyPrompt:
    """A passkey prompt of at most `length` tokens (a few short at most) with the needle at `depth` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise TaskError(f"passkey depth {depth} is outside [0, 1]")

    def count(text: str) -> int:
        # with the tokenizer's own special tokens, as the model reads the prompt (Gemma's <bos>; SmolLM2 adds none)
        return len(tokenizer(text).input_ids)

    needle = NEEDLE.format(key=key)
    fixed = count(INSTRUCTION + needle + QUESTION)
    per_filler = count(FILLER * 20) / 20
    num_fillers = round((length - fixed) / per_filler)
    if num_fillers < 1:
        raise TaskError(f"passkey length {length} is below the prompt's fixed part ({fixed + 1} tokens); use a longer length")

    def assemble(fillers: int, tail: str = "") -> tuple[str, str]:
        before = round(depth * fillers)
        head = INSTRUCTION + FILLER * before
        return head, head + needle + FILLER * (fillers - before) + tail + QUESTION

    # never past the target (a prompt of 8200 tokens is not an 8k test), then top up word by word
    while num_fillers > 1 and count(assemble(num_fillers)[1]) > length:
        num_fillers -= 1
    tail = ""
    for word in FILLER.split(" ")[1:]:
        if count(assemble(num_fillers, f"{tail} {word}")[1]) > length:
            break
        tail = f"{tail} {word}"
    head, text = assemble(num_fillers, tail)
    num_tokens = count(text)
    if num_tokens > length:
        raise TaskError(f"passkey length {length} is below the prompt's fixed part ({num_tokens} tokens); use a longer length")
    return PasskeyPrompt(text, key, depth, num_tokens, count(head), count(head + needle))


@dataclass
class Passkey(Task):
    """Passkey retrieval accuracy per length and per depth.

    Args:
        lengths: prompt lengths in tokens of the model's own tokenizer.
        num_samples: samples per length.
        depths: needle depths to cycle through; None spreads the samples evenly over the whole context.
        max_new_tokens: greedy tokens generated per sample (5 digits plus slack).
        seed: keys and depths are a pure function of (seed, length, sample index).
    """

    name = "passkey"
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    num_samples: int = 3
    depths: list[float] | None = None
    max_new_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        # the whole config is checked here, before a model, a run folder or a wandb run exists
        if not self.lengths or min(self.lengths) < 1:
            raise TaskError(f"task.lengths must be a non-empty list of positive token counts, got {list(self.lengths)}")
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise TaskError(f"task.num_samples and task.max_new_tokens must be >= 1, got {self.num_samples}, {self.max_new_tokens}")
        if self.depths is not None and not all(0.0 <= depth <= 1.0 for depth in self.depths):
            raise TaskError(f"task.depths must lie in [0, 1], got {list(self.depths)}")
        self._records: list[dict[str, Any]] = []

    def max_length(self) -> int:
        return max(self.lengths)

    def check(self, lm: LoadedModel) -> None:
        build_prompt(lm.tokenizer, min(self.lengths), 0.5, 10000)

    def samples(self, tokenizer) -> list[PasskeyPrompt]:
        prompts = []
        for length in self.lengths:
            rng = random.Random(f"{self.seed}-{length}")
            for index in range(self.num_samples):
                if self.depths:
                    depth = self.depths[index % len(self.depths)]
                else:
                    depth = (index + 0.5) / self.num_samples
                prompts.append(build_prompt(tokenizer, length, depth, rng.randint(10000, 99999)))
        return prompts

    def run(self, lm: LoadedModel, on_sample: SampleCallback) -> dict[str, float]:
        self._records = []
        prompts = self.samples(lm.tokenizer)
        for index, prompt in enumerate(tqdm(prompts, desc="passkey", unit="sample")):
            input_ids = lm.tokenizer(prompt.text, return_tensors="pt").input_ids.to(lm.device)
            generation = greedy_generate(lm, input_ids, self.max_new_tokens)
            answer = generation.text
            record = {
                "sample": index,
                "length": self.lengths[index // self.num_samples],
                "prompt_tokens": input_ids.shape[1],
                "depth": prompt.depth,
                "needle_token": prompt.needle_token,
                "needle_end": prompt.needle_end,
                "key": prompt.key,
                "output": answer,
                "correct": first_integer(answer) == prompt.key,
                "seconds": generation.seconds,
                "peak_gpu_gib": generation.peak_gpu_gib,
                "peak_rss_gib": generation.peak_rss_gib,
            }
            self._records.append(record)
            on_sample(record)
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        frame = pd.DataFrame(self._records)
        metrics: dict[str, float] = {"accuracy": float(frame.correct.mean())}
        for length, group in frame.groupby("length"):
            metrics[f"accuracy@{length}"] = float(group.correct.mean())
            metrics[f"seconds@{length}"] = float(group.seconds.median())
            if group.peak_gpu_gib.notna().any():
                metrics[f"peak_gpu_gib@{length}"] = float(group.peak_gpu_gib.max())
            if group.peak_rss_gib.notna().any():
                metrics[f"peak_rss_gib@{length}"] = float(group.peak_rss_gib.max())
        return metrics

    def accuracy_by_depth(self, bins: int = 10) -> pd.DataFrame:
        """Accuracy with needle depth in `bins` bins (rows) x context length (columns)."""
        frame = pd.DataFrame(self._records)
        frame["depth_bin"] = (frame.depth * bins).clip(upper=bins - 1e-9).astype(int) / bins
        return frame.pivot_table(index="depth_bin", columns="length", values="correct", aggfunc="mean")

    def tables(self) -> dict[str, Any]:
        return {"accuracy_by_depth": self.accuracy_by_depth().reset_index()}

    def figures(self) -> dict[str, Any]:
        from longctx.viz import accuracy_heatmap

        return {"accuracy_by_depth": accuracy_heatmap(self.accuracy_by_depth())}
