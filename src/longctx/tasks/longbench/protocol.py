"""The official LongBench protocol: per-dataset prompts (data in longbench.yaml beside this file), the chat template, middle
truncation in tokens of the model's tokenizer, greedy generation and post-processing.

Where we differ from the official `pred.py`, on purpose: the official code truncates the prompt to `max_length` tokens
by decoding its head and tail back to text, re-encodes it and then wraps it in the chat template, so the model sees a
few tokens more or less than `max_length`. We cut the token ids themselves and count the chat template's tokens in
the budget, so every prompt lands within `max_length` exactly (the kept text is the same).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import yaml

from longctx.models import LoadedModel
from longctx.tasks.base import Generation, TaskError, greedy_generate

LONGBENCH_E_SUFFIX = "_e"  # LongBench-E files are <dataset>_e.jsonl and use <dataset>'s protocol
_SENTINEL = "\x00LONGBENCH_PROMPT\x00"


@dataclass(frozen=True)
class DatasetSpec:
    """How one LongBench dataset is prompted and scored (one entry of longbench.yaml)."""

    name: str
    prompt: str  # str.format template over the record's fields ({context}, {input})
    max_new_tokens: int
    metric: str  # a key of metrics.METRICS
    chat: bool  # wrap in the chat template (the official code exempts few-shot and code datasets)
    first_line: bool  # score only the first line of the output (few-shot datasets)
    stop_at_newline: bool = False  # samsum: generation also stops at a newline, after at least one token
    builtin: bool = False  # ours (the offline suite), not the official release


def _read_yaml(name: str) -> dict[str, Any]:
    # package data (pyproject's package-data), so an installed wheel reads it as an editable checkout does
    return yaml.safe_load((resources.files(__package__) / name).read_text(encoding="utf-8"))


@functools.cache
def dataset_specs() -> dict[str, DatasetSpec]:
    """Every dataset the protocol knows: the 21 official ones, then the built-in suite's."""
    data = _read_yaml("longbench.yaml")
    specs = {name: DatasetSpec(name=name, **entry) for name, entry in data["datasets"].items()}
    specs.update({name: DatasetSpec(name=name, builtin=True, **entry) for name, entry in data["builtin"].items()})
    return specs


@functools.cache
def v2_protocol() -> dict[str, Any]:
    """LongBench v2's prompt, generation length, answer patterns, difficulties and length buckets."""
    return _read_yaml("longbench_v2.yaml")


def official_names() -> list[str]:
    return [name for name, spec in dataset_specs().items() if not spec.builtin]


def spec_for(dataset: str) -> DatasetSpec:
    """The protocol of a dataset name (a LongBench-E name uses its base dataset's); unknown names list the known."""
    specs = dataset_specs()
    spec = specs.get(dataset)
    if spec is None and dataset.endswith(LONGBENCH_E_SUFFIX):
        base = specs.get(dataset.removesuffix(LONGBENCH_E_SUFFIX))
        spec = base if base is not None and not base.builtin else None
    if spec is None:
        raise TaskError(f"unknown LongBench dataset {dataset!r}; known: {', '.join(specs)} (and <name>_e for LongBench-E)")
    return spec


def format_prompt(template: str, record: dict[str, Any]) -> str:
    """The template filled with the record's fields, as the official `prompt_format.format(**json_obj)`."""
    try:
        return template.format(**record)
    except KeyError as error:
        raise TaskError(f"the prompt template needs field {error} that the record lacks") from None


def context_offset(template: str, record: dict[str, Any]) -> int:
    """Character offset of {context} in the formatted prompt (where a needle's span inside the context starts)."""
    return format_prompt(template, {**record, "context": _SENTINEL}).index(_SENTINEL)


@dataclass(frozen=True)
class ChatFrame:
    """Token ids the prompt is wrapped in: the chat template's head and tail, or the tokenizer's own special tokens."""

    prefix: list[int]
    suffix: list[int]

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.suffix)


def chat_frame(tokenizer, chat: bool) -> ChatFrame:
    """The chat template rendered around one user message (generation prompt added), split at the message.

    Without chat (or for a tokenizer with no template) the prompt gets what `tokenizer(prompt)` adds, as the
    official code does (a BOS for Llama-style tokenizers, nothing for SmolLM2's).
    """
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        head, tail = rendered.split(_SENTINEL)
        encode = functools.partial(tokenizer, add_special_tokens=False)
        return ChatFrame(encode(head).input_ids, encode(tail).input_ids)
    with_special = tokenizer("x", add_special_tokens=True).input_ids
    plain = tokenizer("x", add_special_tokens=False).input_ids
    start = with_special.index(plain[0]) if plain and plain[0] in with_special else len(with_special)
    return ChatFrame(with_special[:start], with_special[start + len(plain) :])


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]  # what the model is fed: frame prefix + (truncated) prompt + frame suffix
    removed_tokens: int  # tokens cut from the middle (0: the prompt fitted)
    needle_token: int | None = None  # first token of the needle span, if it survived truncation
    needle_end: int | None = None  # one past its last token


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """Keep the first budget // 2 and the last budget - budget // 2 tokens (all of them if they fit)."""
    if len(ids) <= budget:
        return list(ids)
    head = budget // 2
    return list(ids[:head]) + list(ids[len(ids) - (budget - head) :])


def encode_prompt(
    tokenizer, prompt: str, frame: ChatFrame, budget: int | None, needle: tuple[int, int] | None = None
) -> EncodedPrompt:
    """Token ids of `prompt` in `frame`, cut in the middle so the whole is at most `budget` tokens (None: no limit).

    `needle` is a character span of `prompt`; its token span is returned when it is kept whole.
    """
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=needle is not None, verbose=False)
    ids = encoded["input_ids"]
    room = len(ids) if budget is None else budget - frame.size
    if room < 2:
        raise TaskError(
            f"task.max_length={budget} leaves no room for the prompt: the chat template alone takes {frame.size} tokens"
        )
    kept = truncate_middle(ids, room)
    removed = len(ids) - len(kept)
    span: tuple[int | None, int | None] = (None, None)
    if needle is not None:
        offsets = encoded["offset_mapping"]
        tokens = [i for i, (start, end) in enumerate(offsets) if end > needle[0] and start < needle[1]]
        first, last = tokens[0], tokens[-1] + 1
        head = room // 2
        if removed == 0 or last <= head:
            span = (first, last)
        elif first >= head + removed:
            span = (first - removed, last - removed)
        if span[0] is not None:
            span = (span[0] + len(frame.prefix), span[1] + len(frame.prefix))
    return EncodedPrompt(frame.prefix + kept + frame.suffix, removed, *span)


def generate(lm: LoadedModel, ids: list[int], max_new_tokens: int, stop_at_newline: bool = False) -> Generation:
    """Greedy decoding, as the passkey task and the official `pred.py` (num_beams=1, do_sample=False)."""
    options: dict[str, Any] = {}
    if stop_at_newline:  # pred.py's samsum case: stop at EOS or a newline, never before the first token
        newline = lm.tokenizer.encode("\n", add_special_tokens=False)[-1]
        options = {"eos_token_id": [lm.tokenizer.eos_token_id, newline], "min_new_tokens": 1}
    return greedy_generate(lm, torch.tensor([ids], device=lm.device), max_new_tokens, **options)
