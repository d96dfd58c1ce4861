"""`task=longbench_v2`: LongBench v2 (Bai et al. 2024), four-choice questions over 8k-2M-word contexts, with the
official zero-shot prompt, middle truncation, answer extraction and accuracy by difficulty and length bucket."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from tqdm.auto import tqdm

from longctx.models import LoadedModel
from longctx.tasks.base import SampleCallback, Task, TaskError, cost_metrics, sample_record
from longctx.tasks.longbench import data
from longctx.tasks.longbench.protocol import chat_frame, encode_prompt, generate, v2_protocol

SOURCES = ("folder", "hub")


def v2_prompt(template: str, record: dict[str, Any]) -> str:
    """The official filling: each placeholder replaced by its field, stripped (pred.py)."""
    fields = {"$DOC$": "context", "$Q$": "question", "$C_A$": "choice_A", "$C_B$": "choice_B", "$C_C$": "choice_C", "$C_D$": "choice_D"}
    for placeholder, name in fields.items():
        template = template.replace(placeholder, record[name].strip())
    return template


def extract_answer(response: str, patterns: list[str] | None = None) -> str | None:
    """The choice letter the response states ("The correct answer is (B)"), or None; markdown stars are ignored."""
    response = response.replace("*", "")
    for pattern in patterns or v2_protocol()["answer_patterns"]:
        match = re.search(pattern, response)
        if match:
            return match.group(1)
    return None


@dataclass
class LongBenchV2(Task):
    """LongBench v2 accuracy (percent, as the official result.py), overall, by difficulty and by length bucket.

    Args:
        source: ``folder`` (``path`` = the release's data.json, a JSONL file, or a folder holding data.json) or
            ``hub`` (``path`` = the dataset repo, default zai-org/LongBench-v2).
        path: see ``source``.
        num_questions: the first questions only (None: all 503).
        max_input_length: prompts longer than this many tokens are cut in the middle; None: the model's pretrained
            length. Every metric is keyed by it (``accuracy@<max_input_length>``).
    """

    name: ClassVar[str] = "longbench_v2"

    source: str = "hub"
    path: str | None = None
    num_questions: int | None = None
    max_input_length: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise TaskError(f"task.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.num_questions is not None and self.num_questions < 1:
            raise TaskError(f"task.num_questions must be >= 1 or null (all), got {self.num_questions}")
        if self.max_input_length is not None and self.max_input_length < 1:
            raise TaskError(f"task.max_input_length must be a positive number of tokens or null, got {self.max_input_length}")
        if self.source == "folder" and not self.path:
            raise TaskError("task.source=folder needs task.path=<LongBench v2 data.json, or a folder holding it>")
        # a local file is read and checked now, before any model loads; the hub's is fetched by check(lm)
        self._records: list[dict[str, Any]] | None = None
        if self.source == "folder":
            self._records = data.read_v2(Path(self.path).expanduser(), self.num_questions)
        self._budget: int | None = None
        self._results: list[dict[str, Any]] = []

    def check(self, lm: LoadedModel) -> None:
        if self._records is None:
            self._records = data.read_v2(data.hub_v2_file(self.path), self.num_questions)
        self._budget = self.max_input_length or lm.pretrained_length
        frame = chat_frame(lm.tokenizer, chat=True)
        if self._budget < frame.size + 2:
            raise TaskError(f"task.max_input_length={self._budget} leaves no room for the prompt: the chat template alone takes {frame.size} tokens")

    def max_length(self) -> int:
        budget = self.max_input_length or self._budget
        if budget is None:
            raise TaskError("longbench_v2: call check(lm) first, or set task.max_input_length (the default is the model's length)")
        return budget

    def run(self, lm: LoadedModel, on_sample: SampleCallback) -> dict[str, float]:
        self.check(lm)
        protocol = v2_protocol()
        frame = chat_frame(lm.tokenizer, chat=True)  # the official run sends the prompt as a chat message
        self._results = []
        for index, record in enumerate(tqdm(self._records, desc="longbench_v2", unit="question")):
            encoded = encode_prompt(lm.tokenizer, v2_prompt(protocol["prompt"], record), frame, self._budget)
            output = generate(lm, encoded.ids, protocol["max_new_tokens"])
            predicted = extract_answer(output.text.strip(), protocol["answer_patterns"])
            result = sample_record(
                index, self._budget, output,
                id=record.get("_id"),
                domain=record.get("domain"),
                difficulty=record.get("difficulty"),
                length_bucket=record.get("length"),
                prompt_tokens=len(encoded.ids),
                truncated_tokens=encoded.removed_tokens,
                output=output.text,
                pred=predicted,
                answer=record["answer"],
                correct=predicted == record["answer"],
            )
            self._results.append(result)
            on_sample(result)
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        frame = pd.DataFrame(self._results)
        length = self._budget
        metrics = {f"accuracy@{length}": round(100 * frame.correct.mean(), 1)}
        for name, value in self._group_accuracy(frame).items():
            metrics[f"accuracy_{name}@{length}"] = value
        metrics.update(cost_metrics(frame, length))
        return metrics

    @staticmethod
    def _group_accuracy(frame: pd.DataFrame) -> dict[str, float]:
        """Accuracy per difficulty and per length bucket that the data has (official names: easy/hard,
        short/medium/long; result.py counts every difficulty but easy as hard and every length but short/medium as long)."""
        protocol = v2_protocol()
        difficulty = frame.difficulty.map(lambda value: "easy" if value == "easy" else "hard")
        bucket = frame.length_bucket.map(lambda value: value if value in ("short", "medium") else "long")
        groups = {}
        for column, allowed, present in ((difficulty, protocol["difficulties"], frame.difficulty.notna()),
                                         (bucket, protocol["length_buckets"], frame.length_bucket.notna())):
            for name in allowed:
                selected = frame.correct[present & (column == name)]
                if len(selected):
                    groups[name] = round(100 * selected.mean(), 1)
        return groups

    def tables(self) -> dict[str, Any]:
        if not self._results:
            return {}
        frame = pd.DataFrame(self._results)
        rows = [{"group": "overall", "questions": len(frame), "accuracy": round(100 * frame.correct.mean(), 1)}]
        counts = {**frame.difficulty.value_counts().to_dict(), **frame.length_bucket.value_counts().to_dict()}
        rows += [{"group": name, "questions": counts.get(name, 0), "accuracy": value} for name, value in self._group_accuracy(frame).items()]
        return {"accuracy_by_group": pd.DataFrame(rows)}
