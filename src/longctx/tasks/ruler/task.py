"""`task=ruler`: RULER (Hsieh et al. 2024) offline, on RULER's own data and scoring.

Samples come from RULER's generator scripts (generate.py), greedy answers are generated for up to RULER's
tokens_to_generate of each task (NIAH 128, vt 30, cwe 120, fwe 50, qa 32) and stop at the model's end-of-sequence
token, as RULER's HuggingFace runner does (`model.generate` with its generation config; no stop words by default).
An instruction-tuned model in its chat template answers and ends its turn after a few tokens, so a sample costs
its prefill plus those tokens; with the base template a model tends to run on to the budget, which at 16k on a CPU
adds a decoding step per token over the whole cache.

Scores are RULER's: its post-processing, string_match_all (NIAH, vt, cwe, fwe) or string_match_part (qa) x100 per
sample and per task, their average per length, and RULER's effective length: the longest length up to which every
average stays above `threshold` (85.6 in the paper: Llama-2-7B's average at 4k). The average and effective length
are RULER's only over all 13 tasks; over a subset they describe that subset.

Records name the RULER task under `dataset` (as LongBench's do, so `longctx.aggregate` counts samples per task).
NIAH records also give each answer's needle: its depth (where the needle's first token sits in the prompt, 0 = the
first token, 1 = the last) and whether the answer names its value, for the score-by-depth tables and heatmaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch
from tqdm.auto import tqdm

from longctx.models import LoadedModel
from longctx.tasks.base import SampleCallback, Task, TaskError, cost_metrics, greedy_generate, sample_record
from longctx.tasks.ruler.generate import TEMPLATES, generate, resolve_template
from longctx.tasks.ruler.protocol import RulerTask, ruler_tasks, score, task_for, task_score

NEEDLE_START = "One of the special magic"  # RULER's needle sentence: "One of the special magic {type} for {key} is: {value}."
RULER_THRESHOLD = 85.6


@dataclass
class Prepared:
    """One RULER sample ready to run."""

    task: RulerTask
    length: int
    sample: dict[str, Any]  # RULER's record: index, input, outputs, length


def needle_spans(text: str, answers: list[str]) -> list[tuple[int, int] | None]:
    """Character span of the needle sentence holding each answer value in a NIAH prompt (None if not found)."""
    spans: list[tuple[int, int] | None] = []
    for answer in answers:
        value_at = text.find(f" is: {answer}.")
        start = text.rfind(NEEDLE_START, 0, value_at) if value_at >= 0 else -1
        spans.append((start, value_at + len(f" is: {answer}.")) if start >= 0 else None)
    return spans


def effective_length(averages: dict[int, float], threshold: float = RULER_THRESHOLD) -> int:
    """RULER's effective length: the longest length up to which every average (length -> score) stays above
    `threshold`; 0 when the shortest length already falls below it."""
    effective = 0
    for length in sorted(averages):
        if averages[length] <= threshold:
            break
        effective = length
    return effective


@dataclass
class Ruler(Task):
    """RULER's synthetic tasks: scores x100 per task and length, their average, and the effective length.

    Args:
        tasks: RULER tasks to run (None: all 13, synthetic.yaml's order): niah_single_1..3, niah_multikey_1..3,
            niah_multivalue, niah_multiquery, vt, cwe, fwe, qa_1, qa_2.
        lengths: RULER's max_seq_length in tokens of the model's tokenizer: prompt plus the task's tokens to generate.
        num_samples: samples per task and length.
        template: ``chat`` (the tokenizer's chat template around RULER's task text), ``base`` (RULER's base
            template: the task text as it is) or ``auto`` (chat when the tokenizer has one). Part of the samples: RULER
            counts the template in its haystack search. Each prediction record names the one used.
        threshold: the score the effective length is measured against (RULER: 85.6).
        seed: the generators' random seed. 42 by default, RULER's prepare.py's, so the samples are RULER's own (a
            published RULER table is comparable sample by sample); it does not follow the run's top-level `seed`.
    """

    name: ClassVar[str] = "ruler"
    follows_run_seed: ClassVar[bool] = False

    tasks: list[str] | None = None
    lengths: list[int] = field(default_factory=lambda: [4096])
    num_samples: int = 3
    template: str = "auto"
    threshold: float = RULER_THRESHOLD
    seed: int = 42

    def __post_init__(self) -> None:
        # everything that needs no model is checked here, before a model, a run folder or a wandb run exists
        self.lengths = [int(length) for length in self.lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise TaskError(f"task.lengths must be a non-empty list of positive token counts, got {self.lengths}")
        if self.num_samples < 1:
            raise TaskError(f"task.num_samples must be >= 1, got {self.num_samples}")
        if self.template not in TEMPLATES:
            raise TaskError(f"task.template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        self._chosen = [task_for(str(name)) for name in self.tasks] if self.tasks else list(ruler_tasks().values())
        self._prepared: tuple[Any, str, list[Prepared]] | None = None  # (tokenizer, template, samples)
        self._results: list[dict[str, Any]] = []

    def max_length(self) -> int:
        return max(self.lengths)

    def check(self, lm: LoadedModel) -> None:
        """Generate (or read from the cache) every sample now: an impossible length fails before the first answer."""
        self._samples(lm.tokenizer)

    def _samples(self, tokenizer) -> tuple[str, list[Prepared]]:
        if self._prepared is not None and self._prepared[0] is tokenizer:
            return self._prepared[1], self._prepared[2]
        template = resolve_template(tokenizer, self.template)
        cells = [(task, length) for length in self.lengths for task in self._chosen]
        samples = []
        for task, length in tqdm(cells, desc="ruler data", unit="set"):
            samples += [Prepared(task, length, sample)
                        for sample in generate(task, tokenizer, length, self.num_samples, self.seed, template)]
        self._prepared = (tokenizer, template, samples)
        return template, samples

    def run(self, lm: LoadedModel, on_sample: SampleCallback) -> dict[str, float]:
        template, samples = self._samples(lm.tokenizer)
        self._results = []
        for index, prepared in enumerate(tqdm(samples, desc="ruler", unit="sample")):
            task, sample = prepared.task, prepared.sample
            text, answers = sample["input"], list(sample["outputs"])
            # RULER's runner calls tokenizer(prompt), adding the tokenizer's BOS; a rendered chat template holds its own
            offsets = task.is_niah and lm.tokenizer.is_fast  # needle positions need a fast tokenizer's offsets
            encoded = lm.tokenizer(text, add_special_tokens=template == "base", return_offsets_mapping=offsets)
            ids = encoded["input_ids"]
            output = greedy_generate(lm, torch.tensor([ids], device=lm.device), task.tokens_to_generate)
            needles = self._needles(text, answers, encoded.get("offset_mapping"), len(ids), output.text, task) if task.is_niah else []
            first = next((needle for needle in needles if needle["token"] is not None), None)
            result = sample_record(
                index, prepared.length, output,
                dataset=task.name,
                ruler_index=sample["index"],
                template=template,
                prompt_tokens=len(ids),
                depth=first["depth"] if first else None,
                needle_token=first["token"] if first else None,
                needle_end=first["end"] if first else None,
                needle_depths=[needle["depth"] for needle in needles] or None,
                needles_found=[needle["found"] for needle in needles] or None,
                output=output.text,
                answers=answers,
                score=score(task, output.text, answers),
            )
            self._results.append(result)
            on_sample(result)
        return self.metrics()

    @staticmethod
    def _needles(text, answers, offsets, num_tokens, output, task) -> list[dict[str, Any]]:
        """Per answer: its needle's token span and depth, and whether the output names it (RULER's metric, one answer)."""
        needles = []
        for answer, span in zip(answers, needle_spans(text, answers)):
            tokens = [i for i, (start, end) in enumerate(offsets or []) if span and end > span[0] and start < span[1]]
            first, end = (tokens[0], tokens[-1] + 1) if tokens else (None, None)
            needles.append({"token": first, "end": end, "depth": round(first / num_tokens, 4) if tokens else None,
                            "found": score(task, output, [answer]) == 100.0})
        return needles

    # --- metrics, tables, figures ---------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """`<task>@<length>` (x100, 2 decimals, RULER's), `average@<length>`, `seconds@<length>` (median per sample),
        `effective_length` (against `threshold`)."""
        frame = pd.DataFrame(self._results)
        metrics: dict[str, float] = {}
        averages = {}
        for length, cell in frame.groupby("length"):
            per_task = {name: task_score(task_for(name), list(group.output), list(group.answers))
                        for name, group in cell.groupby("dataset", sort=False)}
            metrics.update({f"{name}@{length}": value for name, value in per_task.items()})
            averages[length] = metrics[f"average@{length}"] = round(sum(per_task.values()) / len(per_task), 2)
            metrics.update(cost_metrics(cell, length))
        metrics["effective_length"] = effective_length(averages, self.threshold)
        return metrics

    def tables(self) -> dict[str, Any]:
        if not self._results:
            return {}
        frame = pd.DataFrame(self._results)
        order = list(dict.fromkeys(frame.dataset))
        scores = frame.pivot_table(index="dataset", columns="length", values="score", aggfunc="mean").reindex(order)
        scores.loc["average"] = scores.mean()
        counts = frame.groupby("dataset").size().reindex(order)
        counts["average"] = counts.sum()
        scores = scores.round(2).rename(columns=lambda length: f"score@{length}")
        scores.insert(0, "samples", counts.reindex(scores.index))
        seconds = frame.pivot_table(index="dataset", columns="length", values="seconds", aggfunc="median").reindex(order)
        seconds = seconds.rename(columns=lambda length: f"seconds@{length}")
        tables = {"scores": scores.reset_index(), "seconds_per_sample": seconds.reset_index()}
        by_depth = self.score_by_depth()
        if not by_depth.empty:
            tables["score_by_depth"] = by_depth
        return tables

    def _needle_rows(self, bins: int = 10) -> pd.DataFrame:
        """One row per NIAH needle: dataset, length, depth, depth_bin (`bins` bins), found (0 or 1)."""
        rows = [
            {"dataset": result["dataset"], "length": result["length"], "depth": depth, "found": float(found)}
            for result in self._results
            for depth, found in zip(result["needle_depths"] or [], result["needles_found"] or [])
            if depth is not None
        ]
        needles = pd.DataFrame(rows, columns=["dataset", "length", "depth", "found"])
        return needles.assign(depth_bin=(needles.depth * bins).clip(upper=bins - 1e-9).astype(int) / bins)

    def score_by_depth(self, bins: int = 10) -> pd.DataFrame:
        """NIAH needles found (fraction) by depth bin, task and length, long form: depth_bin, dataset, length, score."""
        grouped = self._needle_rows(bins).groupby(["depth_bin", "dataset", "length"], sort=True).found.mean()
        return grouped.rename("score").reset_index()

    def figures(self) -> dict[str, Any]:
        needles = self._needle_rows()
        if needles.empty:
            return {}
        from longctx.viz import accuracy_heatmap

        def grid(rows: pd.DataFrame):
            found = rows.pivot_table(index="depth_bin", columns="length", values="found", aggfunc="mean")
            return accuracy_heatmap(found, label="needles found")

        # every NIAH needle pooled (weighted by needle, not by task), then each NIAH task alone
        figures = {"score_by_depth_niah": grid(needles)}
        for dataset, rows in needles.groupby("dataset", sort=False):
            figures[f"score_by_depth_{dataset}"] = grid(rows)
        return figures
