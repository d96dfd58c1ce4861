"""Reports: run folders -> results/reports/<name>.md, with every cell's sample count and 95% interval, figures beside
it and findings written around them.

    python -m longctx.report passkey_cpu           # conf/report/passkey_cpu.md -> results/reports/passkey_cpu.md
    python -m longctx.report passkey_methods_cpu   # no template of that name: the experiment's runs, default blocks
    python -m longctx.report --all                 # every template in conf/report/, and the index README.md
    python -m longctx.report --check               # regenerate every committed report into a temp dir, diff, fail

Which run folders a report holds. A template, `conf/report/<name>.md`, starts with a YAML front matter:
`title`; `roots` (folders searched for run folders, default results/); `experiments` (names in conf/experiment/:
a run belongs to one when it ran its task on its model with its seed and one of the methods it sweeps; lengths and
sample counts are not compared, since a command line narrows or extends them); `where` (column: value or list, on
`aggregate.load_runs`' frame: task, method, model, device, dtype, seed, length, method.<parameter>); `exclude` (run
folder: why it is left out). Within those runs each cell is the newest run (aggregate's rule) per method label,
machine (model, device, dtype) and length. The rest of the template is Markdown, copied as it is, with fenced
```report blocks (YAML) that become tables and figures:

    table: metric      task, metric (accuracy, ppl, average, a dataset), where     method x length
    table: datasets    task, where                                                 (method, dataset) x length
    table: seconds     task, metric (whose cells are timed), where                  median seconds, machine, load
    table: books       task (pg19), length, where                                  method x book perplexity
    table: samples     task, metric, where, columns                                 the cells' samples, one per row
    table: speed       bench (folders written by experiments/bench_speed.py)        prefill, decoding, memory
    figure: by_length  task, metric, where, pretrained_length, logy                 metric against length
    figure: datasets   task, where, pretrained_length                               one panel per dataset
    figure: loss_by_position  where, pretrained_length                             PG19 loss by token position
    figure: prefill    bench                                                        prefill time, log-log, with slopes

Intervals (95%): an accuracy, or a score whose every sample is 0 or 1, gets the Wilson score interval (scipy); a score
averaged over samples that are not all 0 or 1 (LongBench's F1, RULER's multi-value) a Student-t interval over its
samples, clipped to the score's range; an average over datasets pools the datasets' samples (conservative: it counts
the spread between datasets as noise) when every dataset has the same count, else gets none; perplexity shows the
lowest and highest book's. Seconds are medians over samples, named with the machine and its load from provenance.json.

Figures are PNGs beside the report (results/reports/<name>/), each with the CSV of the data it draws. `--check`
compares the Markdown and those CSVs byte for byte and only the PNGs' presence: a PNG's bytes depend on the matplotlib,
FreeType and font versions of the machine that drew it, while the data behind it does not.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from longctx.aggregate import MACHINE, label_methods, latest, load_curves, load_runs, predictions, scored_datasets
from longctx.tracking import read_provenance

CONF = Path("conf")
TEMPLATES = CONF / "report"
EXPERIMENTS = CONF / "experiment"
REPORTS = Path("results/reports")
INDEX = "README.md"
CONFIDENCE = 0.95
# A run's timing counts as shared when other processes kept at least this many cores busy on average (or more than
# torch's threads left free, on a machine with more cores than threads).
SHARED_CORES = 0.5
BLOCK = re.compile(r"^```report[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
# What a report holds for a task when no template says otherwise (`python -m longctx.report <experiment>`).
DEFAULT_BLOCKS = {
    "passkey": [{"table": "metric", "metric": "accuracy"}, {"figure": "by_length", "metric": "accuracy"},
                {"table": "seconds", "metric": "accuracy"}],
    "pg19": [{"table": "metric", "metric": "ppl"}, {"figure": "loss_by_position"}, {"table": "seconds", "metric": "ppl"}],
    "ruler": [{"table": "metric", "metric": "average"}, {"table": "datasets"}, {"figure": "datasets"},
              {"table": "seconds", "metric": "average"}],
    "longbench": [{"table": "metric", "metric": "average"}, {"table": "datasets"},
                  {"table": "seconds", "metric": "average"}],
}


class ReportError(Exception):
    """A template or selection that cannot make a report; the message names the fix."""


# --- which runs ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """The run folders a report holds: found under `roots`, kept by `experiments` and `where`, less `exclude`."""

    roots: tuple[str, ...] = ("results",)
    experiments: tuple[str, ...] = ()
    where: dict[str, Any] = field(default_factory=dict)
    exclude: dict[str, str] = field(default_factory=dict)

    def apply(self, runs: pd.DataFrame) -> pd.DataFrame:
        if runs.empty:
            return runs
        kept = pd.Series(not self.experiments, index=runs.index)
        for name in self.experiments:
            kept |= belongs_to_experiment(runs, name)
        excluded = runs["run"].map(lambda run: Path(run).as_posix() in self.exclude)
        return narrow(runs[kept & ~excluded], self.where)


def narrow(runs: pd.DataFrame, where: dict[str, Any]) -> pd.DataFrame:
    """Rows whose column equals the value (or is one of the list; null matches a missing value) for every `where`
    entry."""
    for column, wanted in where.items():
        if column not in runs:
            raise ReportError(f"where: no column {column!r} in these runs (columns: task, method, model, device, "
                              f"dtype, seed, length, method.<parameter>)")
        values = wanted if isinstance(wanted, list) else [wanted]
        kept = runs[column].isin([value for value in values if value is not None])
        if None in values:  # null: runs that do not have the column's parameter (another method's rows)
            kept |= runs[column].isna()
        runs = runs[kept]
    return runs


@cache
def experiment_scope(name: str) -> tuple[str, str, int, tuple[str, ...]]:
    """(task, model, seed, method names) of conf/experiment/<name>.yaml, as Hydra composes it; the method names are
    those its sweep lists (a preset such as infllm_2048 counts as its method, infllm)."""
    if not (EXPERIMENTS / f"{name}.yaml").is_file():
        raise ReportError(f"no experiment {name!r}: {EXPERIMENTS / name}.yaml does not exist")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import longctx.registry  # noqa: F401  registers the method and task config groups

    with initialize_config_dir(config_dir=str(CONF.resolve()), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
        swept = OmegaConf.select(cfg, "hydra.sweeper.params.method")
        options = str(swept).split(",") if swept else []
        methods = {compose("config", overrides=[f"+experiment={name}", f"method={option.strip()}"]).method.name
                   for option in options} or {cfg.method.name}
    return cfg.task.name, cfg.model.name, int(cfg.seed), tuple(sorted(methods))


def experiments_run(command: str) -> set[str] | None:
    """The experiments a recorded command line ran (`+experiment=NAME`), or None when no command was recorded."""
    if not command:
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return {word.split("=", 1)[1] for word in words if word.startswith(("+experiment=", "experiment="))}


def belongs_to_experiment(runs: pd.DataFrame, name: str) -> pd.Series:
    """Runs whose recorded command ran `+experiment=NAME`; a run that recorded no command (from before provenance.json
    did) belongs when it ran the experiment's task on its model with its seed and one of its methods."""
    task, model, seed, methods = experiment_scope(name)
    by_config = (runs["task"] == task) & (runs["model"] == model) & (runs["seed"] == seed) & runs["method"].isin(methods)
    ran = runs["run"].map(lambda run: experiments_run(_provenance(run).get("command")))
    return ran.map(lambda names: name in names if names is not None else None).fillna(by_config).astype(bool)


# --- cells: a value, its samples, its interval --------------------------------------------------------------------

@dataclass
class Cell:
    """One table cell: a method label on a machine at a length, the run(s) it comes from and their samples."""

    label: str
    model: str
    device: str
    dtype: str
    length: int
    value: float
    parts: list[tuple[str, pd.DataFrame]]  # (run folder, its samples in this cell)
    kind: str  # accuracy | score | average | ppl | other
    values: np.ndarray | None = None  # per-sample values on [0, 1], where the cell has them

    def __post_init__(self) -> None:
        if self.values is None:
            self.values = _per_sample(self)

    @property
    def runs(self) -> list[str]:
        return [run for run, _ in self.parts]

    @property
    def samples(self) -> pd.DataFrame:
        frames = [samples for _, samples in self.parts if not samples.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def n(self) -> int:
        return sum(len(samples) for _, samples in self.parts)


@cache
def _predictions(run: str) -> pd.DataFrame:
    return predictions(run)


def _samples(run: str, length: int, dataset: str | None = None) -> pd.DataFrame:
    records = _predictions(run)
    if records.empty:
        return records
    records = records[records["length"] == length]
    return records[records["dataset"] == dataset] if dataset is not None and "dataset" in records else records


def cells(runs: pd.DataFrame, task: str, metric: str) -> list[Cell]:
    """The cells of `metric`'s method x length table for `task`: aggregate's choice of run per cell, with samples."""
    task_runs = runs[runs["task"] == task]
    if task_runs.empty or metric not in task_runs or task_runs[metric].isna().all():
        raise ReportError(f"no {task} runs with metric {metric!r} in this selection")
    datasets = scored_datasets(task_runs, task)
    if metric == "average" and datasets:
        return _averages(task_runs, task, datasets)
    kind = "accuracy" if metric == "accuracy" else "ppl" if metric == "ppl" else "score" if metric in datasets else "other"
    chosen = latest(task_runs, task, metric).reset_index()
    return [Cell(row["label"], row["model"], row["device"], row["dtype"], int(row["length"]), float(row[metric]),
                 [(row["run"], _samples(row["run"], int(row["length"]), metric if kind == "score" else None))], kind)
            for _, row in chosen.iterrows()]


def every_run_cells(runs: pd.DataFrame, task: str, metric: str) -> list[Cell]:
    """Like `cells`, but one cell per run that measured `metric` (not only the newest per method, machine and
    length): what a timing looked like in each run of the same configuration."""
    task_runs = runs[runs["task"] == task]
    if task_runs.empty or metric not in task_runs or task_runs[metric].isna().all():
        raise ReportError(f"no {task} runs with metric {metric!r} in this selection")
    datasets = scored_datasets(task_runs, task)
    kind = ("accuracy" if metric == "accuracy" else "ppl" if metric == "ppl" else "score" if metric in datasets
            else "average" if metric == "average" and datasets else "other")
    labelled = task_runs if "label" in task_runs else task_runs.assign(label=label_methods(task_runs))
    found = []
    for _, row in labelled[labelled[metric].notna()].sort_values(["label", *MACHINE, "length", "run"]).iterrows():
        samples = _samples(row["run"], int(row["length"]), metric if kind == "score" else None)
        found.append(Cell(row["label"], row["model"], row["device"], row["dtype"], int(row["length"]),
                          float(row[metric]), [(row["run"], samples)], kind,
                          None if kind != "average" else np.array([])))
    return found


def _averages(runs: pd.DataFrame, task: str, datasets: list[str]) -> list[Cell]:
    """Average over datasets of each dataset's newest cell (aggregate's rule), with every dataset's samples; the
    pooled samples stand for the average only when every dataset has the same count (then their mean is it)."""
    by_key: dict[tuple, list[Cell]] = {}
    for dataset in datasets:
        for cell in cells(runs, task, dataset):
            by_key.setdefault((cell.label, cell.model, cell.device, cell.dtype, cell.length), []).append(cell)
    averages = []
    for key, group in sorted(by_key.items()):
        values = [cell.values for cell in group]
        pooled = (np.concatenate(values) if all(v is not None for v in values) and len({len(v) for v in values}) == 1
                  else np.array([]))
        averages.append(Cell(*key, float(np.mean([cell.value for cell in group])),
                             [part for cell in group for part in cell.parts], "average", pooled))
    return averages


def interval(values: np.ndarray) -> tuple[float, float, str] | None:
    """95% interval of the mean of per-sample values in [0, 1]: Wilson when every value is 0 or 1, else Student-t
    (clipped to [0, 1]); None when the samples are not all 0 or 1 and do not vary (or there is one)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return None
    if np.isin(values, (0.0, 1.0)).all():
        bounds = stats.binomtest(int(values.sum()), len(values)).proportion_ci(CONFIDENCE, method="wilson")
        return bounds.low, bounds.high, "wilson"
    if len(values) < 2 or values.std() == 0:
        return None  # one sample, or every sample the same value between 0 and 1: the t-interval says nothing
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return max(low, 0.0), min(high, 1.0), "t"


def _per_sample(cell: Cell) -> np.ndarray | None:
    """A passkey or per-dataset cell's per-sample values on [0, 1] (passkey: correct; RULER and LongBench: score,
    which RULER records x100 and LongBench as a fraction: the scale is the one that reproduces the run's metric)."""
    samples = cell.samples
    column = {"accuracy": "correct", "score": "score"}.get(cell.kind)
    if column is None or column not in samples or samples.empty:
        return None
    values = samples[column].astype(float).to_numpy()
    target = cell.value / (100.0 if cell.kind == "score" else 1.0)  # the metric as a fraction
    for scale in (1.0, 100.0):
        if abs(values.mean() / scale - target) <= 1e-4:  # metrics.json rounds scores x100 to 2 decimals
            return values / scale
    raise ReportError(f"{cell.runs[0]}: predictions.jsonl averages {values.mean():.4g} at {cell.length}, "
                      f"metrics.json says {cell.value:.4g}; the run folder is inconsistent")


def book_perplexities(cell: Cell) -> pd.Series:
    """Perplexity of each book's segments in a PG19 cell (token-weighted mean NLL, exponentiated)."""
    samples = cell.samples
    if samples.empty or "book" not in samples:
        return pd.Series(dtype=float)
    weighted = samples.assign(total=samples["nll"] * samples["tokens"]).groupby("book", sort=False)
    return np.exp(weighted["total"].sum() / weighted["tokens"].sum())


def summarise(cell: Cell) -> dict[str, Any]:
    """value, n, low, high, interval (wilson | t | books | None) and successes (accuracy) of a cell, on the metric's
    own scale (RULER and LongBench scores x100, accuracy as a fraction)."""
    scale = 100.0 if cell.kind in ("score", "average") else 1.0
    summary = {"value": cell.value, "n": cell.n, "low": np.nan, "high": np.nan, "interval": None, "successes": None}
    if cell.values is not None and len(cell.values):
        if cell.kind == "accuracy":
            summary["successes"] = int(cell.values.sum())
        found = interval(cell.values)
        if found:
            summary.update(low=found[0] * scale, high=found[1] * scale, interval=found[2])
    elif cell.kind == "ppl":
        books = book_perplexities(cell)
        if len(books):
            summary.update(low=books.min(), high=books.max(), interval="books")
    return summary


# --- machines and their load ----------------------------------------------------------------------------------

@cache
def _provenance(run: str) -> dict[str, Any]:
    return read_provenance(run) or {}


def machine(provenance: dict[str, Any]) -> str:
    """The machine a run measured on, as far as its provenance says."""
    device = provenance.get("device")
    if device == "cuda":
        return provenance.get("gpu") or "GPU (model not recorded)"
    if device != "cpu":
        return "not recorded"
    cores, threads = provenance.get("cpu_count"), provenance.get("torch_threads")
    text = f"{cores}-core CPU" if cores else "CPU"
    if provenance.get("cpu_model"):
        text += f" ({provenance['cpu_model']})"
    return text + (f", torch on {threads} threads" if threads else "")


def load(provenance: dict[str, Any]) -> str:
    """'idle', 'shared' (with the cores others used) or 'load not recorded' (runs from before provenance recorded it)."""
    others = (provenance.get("load") or {}).get("others_cpu_cores")
    if others is None:
        return "load not recorded"
    free = max(SHARED_CORES, (provenance.get("cpu_count") or 0) - (provenance.get("torch_threads") or 0))
    return f"shared: others busy {others:g} cores" if others >= free else f"idle (others {others:g} cores)"


# --- formatting -------------------------------------------------------------------------------------------------

def length_name(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def _number(value: float, digits: int = 3) -> str:
    """Significant digits without scientific notation: 0.0512, 1.25, 24.3, 417."""
    if value is None or not np.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    rounded = float(f"{value:.{digits}g}")  # 99.96 -> 100: the decimals follow the rounded value
    decimals = max(digits - 1 - int(np.floor(np.log10(abs(rounded)))), 0)
    return f"{rounded:.{decimals}f}"


def cell_text(cell: Cell) -> str:
    summary = summarise(cell)
    if cell.kind == "accuracy" and summary["successes"] is not None:
        return f"{summary['successes']}/{summary['n']} [{summary['low'] * 100:.0f}, {summary['high'] * 100:.0f}]"
    if cell.kind == "ppl":
        spread = f" [{summary['low']:.2f}–{summary['high']:.2f}]" if summary["interval"] else ""
        return f"{summary['value']:.2f}{spread} ({summary['n']})"
    value = f"{summary['value']:.1f}" if cell.kind in ("score", "average") else _number(summary["value"])
    if summary["interval"] is None:
        return f"{value} ({summary['n']})" + (" ‡" if cell.kind in ("average", "score") and summary["n"] else "")
    mark = " †" if summary["interval"] == "t" else ""
    return f"{value} [{summary['low']:.1f}, {summary['high']:.1f}]{mark} ({summary['n']})"


LEGENDS = {
    "accuracy": "Cells: correct / samples [95% Wilson interval, %].",
    "ppl": "Cells: perplexity over all tokens [lowest–highest book] (segments).",
    "score": "Cells: mean score x100 [95% interval] (samples): Wilson where every sample scored 0 or 100, † Student-t "
             "over the samples otherwise; ‡ no interval: every sample scored the same value between 0 and 100.",
    "average": "Cells: mean over datasets of each dataset's newest score [95% interval over the pooled samples] "
               "(samples); † Student-t, otherwise Wilson; ‡ no interval: the datasets' sample counts differ, or "
               "every sample scored the same value between 0 and 100.",
    "other": "Cells: value (samples).",
}


def _escape(text: Any, width: int = 60) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|")


def markdown(frame: pd.DataFrame) -> str:
    columns = [str(column) for column in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_escape(value, 400) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _row_keys(found: list[Cell]) -> tuple[list[str], str]:
    """Row columns of a table (label, plus the machine columns that vary) and a sentence naming the rest."""
    varying = [column for column in MACHINE if len({getattr(cell, column) for cell in found}) > 1]
    fixed = [f"{column} {getattr(found[0], column)}" for column in MACHINE if column not in varying]
    return ["label", *varying], (f"All rows: {', '.join(fixed)}." if fixed else "")


def metric_table(found: list[Cell]) -> tuple[str, str]:
    """(Markdown of method x length, legend)."""
    keys, fixed = _row_keys(found)
    rows = pd.DataFrame([{**{key: getattr(cell, key) for key in keys}, "length": cell.length, "text": cell_text(cell)}
                         for cell in found])
    wide = rows.pivot_table(index=keys, columns="length", values="text", aggfunc="first").fillna("")
    wide.columns = [length_name(length) for length in wide.columns]
    wide = wide.reset_index().rename(columns={"label": "method"})
    return markdown(wide), " ".join(filter(None, [LEGENDS[found[0].kind], fixed]))


def points(found: list[Cell], percent: bool = True) -> pd.DataFrame:
    """A figure's data from table cells: line (the method label, with the machine when they differ), length, value,
    low, high, n; accuracies in percent unless `percent` is false."""
    several = len({(cell.model, cell.device, cell.dtype) for cell in found}) > 1
    rows = []
    for cell in found:
        summary = summarise(cell)
        scale = 100.0 if percent and cell.kind == "accuracy" else 1.0
        line = f"{cell.label} ({cell.model}, {cell.device} {cell.dtype})" if several else cell.label
        rows.append({"line": line, "length": cell.length, "value": summary["value"] * scale,
                     "low": summary["low"] * scale, "high": summary["high"] * scale, "n": summary["n"]})
    return pd.DataFrame(rows).sort_values(["line", "length"], ignore_index=True)


# --- the report -------------------------------------------------------------------------------------------------

@dataclass
class Template:
    name: str
    source: str  # where it came from: conf/report/<name>.md or conf/experiment/<name>.yaml
    title: str
    selection: Selection
    parts: list[str | dict[str, Any]]  # Markdown, or a block's options


def read_template(name: str) -> Template:
    """conf/report/<name>.md, or, without one, the default report of conf/experiment/<name>.yaml."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ReportError(f"report names are lowercase letters, digits and '_': {name!r}")
    path = TEMPLATES / f"{name}.md"
    if path.is_file():
        text = path.read_text()
        matched = FRONT_MATTER.match(text)
        if not matched:
            raise ReportError(f"{path} must start with a YAML front matter between '---' lines (title, roots, ...)")
        front = yaml.safe_load(matched.group(1)) or {}
        unknown = set(front) - {"title", "roots", "experiments", "where", "exclude"}
        if unknown:
            raise ReportError(f"{path}: unknown front-matter keys {sorted(unknown)} (title, roots, experiments, where, "
                              f"exclude)")
        body = text[matched.end():]
        parts: list[str | dict[str, Any]] = []
        position = 0
        for block in BLOCK.finditer(body):
            parts.append(body[position:block.start()])
            options = yaml.safe_load(block.group(1))
            if not isinstance(options, dict) or not ({"table", "figure"} & set(options)):
                raise ReportError(f"{path}: a report block needs `table:` or `figure:`, got {block.group(1)!r}")
            parts.append(options)
            position = block.end()
        parts.append(body[position:])
        selection = Selection(tuple(front.get("roots", ["results"])), tuple(front.get("experiments", [])),
                              front.get("where") or {}, front.get("exclude") or {})
        return Template(name, path.as_posix(), front.get("title", name), selection, parts)
    experiment = EXPERIMENTS / f"{name}.yaml"
    if not experiment.is_file():
        raise ReportError(f"no report template {path} and no experiment {experiment}: write one of them")
    task = experiment_scope(name)[0]
    comment = [line[2:] for line in experiment.read_text().splitlines() if line.startswith("# ") and "@package" not in line]
    intro = "What the experiment's config says:\n\n" + "\n".join(f"> {line}" for line in comment) + "\n\n"
    blocks: list[str | dict[str, Any]] = [intro]
    for block in DEFAULT_BLOCKS.get(task, [{"table": "metric", "metric": "accuracy"}]):
        blocks += [block, "\n"]
    return Template(name, experiment.as_posix(), f"Experiment {name}", Selection(experiments=(name,)), blocks)


@cache
def _all_runs(roots: tuple[str, ...]) -> pd.DataFrame:
    return load_runs(*roots)


class Renderer:
    """Turns a template's parts into Markdown, writing figures under `out / name`; links are relative to
    `link_base` (where the report will live)."""

    def __init__(self, template: Template, out: Path, link_base: Path) -> None:
        self.template, self.out, self.link_base = template, out, link_base
        runs = template.selection.apply(_all_runs(template.selection.roots))
        # one label per configuration in the whole report: the parameters that vary across its runs of a task
        self.runs = runs.assign(label=pd.concat([label_methods(group) for _, group in runs.groupby("task")])
                                if not runs.empty else pd.Series(dtype=str))
        self.used: dict[str, None] = {}  # run folders behind any cell, in order of first use
        self.benches: dict[str, None] = {}
        self.files: dict[str, None] = {}  # files quoted by excerpt blocks

    def link(self, path: str | Path) -> str:
        return Path(os.path.relpath(Path(path), self.link_base)).as_posix()

    def render(self) -> str:
        template = self.template
        command = f"python -m longctx.report {template.name}"
        lines = [f"# {template.title}", "",
                 f"> Regenerate: `{command}` (from `{template.source}` and the run folders listed at the end; "
                 "generated, edit the template).", "", ""]
        body = "".join(part if isinstance(part, str) else self.block(part) for part in template.parts)
        return "\n".join(lines) + body.strip("\n") + "\n\n" + self.appendix()

    def block(self, options: dict[str, Any]) -> str:
        options = dict(options)
        runs = narrow(self.runs, options.pop("where", {}) or {})
        for unwanted in options.pop("drop", []) or []:  # each a conjunction: rows matching all of it go
            runs = runs.drop(narrow(runs, unwanted).index)
        if "table" in options:
            kind = options.pop("table")
            handlers = {"metric": self.metric, "datasets": self.datasets, "seconds": self.seconds,
                        "books": self.books, "samples": self.samples, "speed": self.speed, "excerpt": self.excerpt}
        else:
            kind = options.pop("figure")
            handlers = {"by_length": self.by_length_figure, "datasets": self.datasets_figure,
                        "loss_by_position": self.loss_figure, "prefill": self.prefill_figure}
        if kind not in handlers:
            raise ReportError(f"{self.template.source}: unknown block {kind!r} (one of {sorted(handlers)})")
        try:
            return "\n" + handlers[kind](runs, **options).strip("\n") + "\n"
        except TypeError as error:
            raise ReportError(f"{self.template.source}: block {kind!r}: {error}") from None

    def _task(self, runs: pd.DataFrame, task: str | None) -> str:
        tasks = sorted(runs["task"].unique()) if not runs.empty else []
        if task is None:
            if len(tasks) != 1:
                raise ReportError(f"{self.template.source}: say `task:` in the block (these runs hold {tasks})")
            task = tasks[0]
        return task

    def _cells(self, runs: pd.DataFrame, task: str | None, metric: str) -> list[Cell]:
        found = cells(runs, self._task(runs, task), metric)
        for cell in found:
            self.used.update(dict.fromkeys(cell.runs))
        return found

    # tables

    def metric(self, runs, metric: str, task: str | None = None) -> str:
        table, legend = metric_table(self._cells(runs, task, metric))
        return f"{table}\n\n{legend}\n"

    def datasets(self, runs, task: str | None = None) -> str:
        task = self._task(runs, task)
        datasets = sorted(scored_datasets(runs[runs["task"] == task], task))
        if not datasets:
            raise ReportError(f"no per-dataset scores for {task} in this selection")
        found = {dataset: self._cells(runs, task, dataset) for dataset in datasets}
        keys, fixed = _row_keys([cell for group in found.values() for cell in group])
        rows = [{**{key: getattr(cell, key) for key in keys}, "dataset": dataset, "length": cell.length,
                 "text": cell_text(cell)} for dataset, group in found.items() for cell in group]
        frame = pd.DataFrame(rows)
        frame["order"] = frame["dataset"].map(datasets.index)
        wide = frame.pivot_table(index=[*keys, "order", "dataset"], columns="length", values="text",
                                 aggfunc="first").fillna("")
        wide.columns = [length_name(length) for length in wide.columns]
        wide = wide.reset_index().drop(columns="order").rename(columns={"label": "method"})
        return f"{markdown(wide)}\n\n{' '.join(filter(None, [LEGENDS['score'], fixed]))}\n"

    def seconds(self, runs, metric: str, task: str | None = None, every_run: bool = False) -> str:
        """Median seconds per sample of each cell of `metric`'s table, with its machine and load; `every_run`: one
        row per run of each configuration, the older runs the table does not show included."""
        rows = []
        if every_run:
            found = every_run_cells(runs, self._task(runs, task), metric)
            self.used.update(dict.fromkeys(run for cell in found for run in cell.runs))
        else:
            found = self._cells(runs, task, metric)
        keys, fixed = _row_keys(found)
        for cell in found:
            samples = cell.samples
            timed = samples["seconds"].dropna() if "seconds" in samples else pd.Series(dtype=float)
            memory = next((column for column in ("peak_gpu_gib", "peak_rss_gib")
                           if column in samples and samples[column].notna().any()), None)
            provenances = [_provenance(run) for run in cell.runs]
            loads = sorted({load(provenance) for provenance in provenances})
            rows.append({
                "method": cell.label, **{key: getattr(cell, key) for key in keys[1:]}, "length": length_name(cell.length),
                **({"run": Path(cell.runs[0]).name} if every_run else {}),
                "s / sample (median)": _number(timed.median()) if len(timed) else "-",
                "samples": len(timed),
                "peak GiB": f"{samples[memory].max():.2f} ({'GPU' if memory == 'peak_gpu_gib' else 'RSS'})" if memory else "-",
                "machine": "; ".join(sorted({machine(p) for p in provenances})),
                "load": "; ".join(loads),
            })
        legend = ("Seconds per sample, the median over the cell's samples (passkey and RULER: prefill and generation; "
                  "PG19: one segment's forward). load: `shared` when other processes kept at least "
                  f"{SHARED_CORES:g} core busy on average during the run (provenance.json), so its seconds are slower "
                  "than the machine's; `load not recorded` for runs from before provenance recorded it.")
        return f"{markdown(pd.DataFrame(rows))}\n\n{' '.join(filter(None, [legend, fixed]))}\n"

    def books(self, runs, length: int, task: str = "pg19") -> str:
        found = [cell for cell in self._cells(runs, task, "ppl") if cell.length == length]
        if not found:
            raise ReportError(f"no {task} cells at length {length}")
        keys, _ = _row_keys(found)
        rows = [{"method": cell.label, **{key: getattr(cell, key) for key in keys[1:]},
                 **book_perplexities(cell).map(lambda value: f"{value:.2f}").to_dict()} for cell in found]
        return f"{markdown(pd.DataFrame(rows).fillna(''))}\n\nPerplexity per book at {length_name(length)} tokens.\n"

    def samples(self, runs, metric: str, columns: list[str | dict[str, str]], task: str | None = None,
                query: str | None = None, by_method: str | None = None) -> str:
        """The cells' samples, one row each: `columns` names prediction fields, or {name: expression} computed from
        them (pandas eval, e.g. {from_end: prompt_tokens - needle_token}); `query` keeps some (pandas query);
        `by_method: <field>` puts the methods side by side, one column each holding that field, one row per sample
        (the samples that `columns` identify, which must be the same for every method)."""
        frames = []
        for cell in self._cells(runs, task, metric):
            samples = cell.samples
            if samples.empty:
                continue
            names = []
            for column in columns:
                if isinstance(column, dict):
                    (name, expression), = column.items()
                    samples = samples.assign(**{name: samples.eval(expression)})
                    column = name
                if column not in samples:
                    raise ReportError(f"samples: no column {column!r} in {cell.runs} (has {sorted(samples.columns)})")
                names.append(column)
            if query:
                samples = samples.query(query)
            kept = [*names, *([by_method] if by_method and by_method not in names else [])]
            frames.append(samples[kept].assign(method=cell.label, length=length_name(cell.length)))
        if not frames or all(frame.empty for frame in frames):
            return "(no samples match)\n"
        frame = pd.concat([frame for frame in frames if not frame.empty], ignore_index=True)
        if by_method:
            index = [*(["length"] if "length" not in names else []), *names]
            frame = frame.pivot_table(index=index, columns="method", values=by_method, aggfunc="first", sort=True)
            frame = frame.reset_index()
            frame.columns.name = None
            return markdown(frame.map(lambda value: _number(value) if isinstance(value, float) else value)) + "\n"
        for column in frame.columns:
            if pd.api.types.is_float_dtype(frame[column]):
                frame[column] = frame[column].map(_number)
            elif frame[column].dtype == object:
                frame[column] = frame[column].map(lambda value: _escape(value, 60))
        ordered = ["method", *(["length"] if "length" not in names else []), *names]
        return markdown(frame[ordered]) + "\n"

    def excerpt(self, runs, file: str, lines: str | None = None) -> str:
        """Lines `lines` ("first-last", 1-based) of a file kept beside the runs (a profile, an older benchmark's
        CSV), verbatim in a code block."""
        path = Path(file)
        if not path.is_file():
            raise ReportError(f"excerpt: no file {file}")
        text = path.read_text().splitlines()
        if lines:
            first, last = (int(part) for part in str(lines).split("-"))
            text = text[first - 1:last]
        self.files.update({path.as_posix(): None})
        return f"`{path.as_posix()}`{f' (lines {lines})' if lines else ''}:\n\n```\n" + "\n".join(text) + "\n```\n"

    def speed(self, runs, bench: list[str], columns: list[str] | None = None) -> str:
        frame = self._speed(bench)
        shown = columns or ["prefill_s", "prefill_vs_full", "prefill_x_per_doubling", "decode_tok_s", "peak_device_gib",
                            "peak_host_gib"]
        rows = frame[["method", "length", *shown]].copy()
        rows["length"] = rows["length"].map(length_name)
        for column in shown:
            rows[column] = rows[column].map(lambda value: _number(value) if pd.notna(value) else "-")
        machines = "; ".join(f"`{folder}`: {text}" for folder, text in self._bench_machines(frame).items())
        return (f"{markdown(rows)}\n\nEach figure is the median of the benchmark's repeats ({', '.join(sorted(set(frame['repeats'].astype(int).astype(str))))}); "
                f"prefill_vs_full is the method's prefill time over full attention's at the same length, "
                f"prefill_x_per_doubling its time at this length over its time at half of it. {machines}\n")

    # figures

    def _figure(self, name: str, figure, data: pd.DataFrame, caption: str) -> str:
        folder = self.out / self.template.name
        folder.mkdir(parents=True, exist_ok=True)
        figure.savefig(folder / f"{name}.png", dpi=110, metadata={"Software": None})
        data.to_csv(folder / f"{name}.csv", index=False, float_format="%.6g")
        import matplotlib.pyplot as plt

        plt.close(figure)
        target = self.link(self.link_base / self.template.name / f"{name}.png")
        table = self.link(self.link_base / self.template.name / f"{name}.csv")
        return f"![{caption}]({target})\n\n{caption} (data: [{name}.csv]({table}))\n"

    def by_length_figure(self, runs, metric: str, task: str | None = None, pretrained_length: int | None = None,
                         logy: bool = False, name: str | None = None, caption: str | None = None) -> str:
        from longctx.viz import score_by_length

        found = self._cells(runs, task, metric)
        data = points(found)
        ylabel = {"accuracy": "accuracy (%)", "ppl": "perplexity"}.get(metric, metric)
        figure = score_by_length(data, ylabel, pretrained_length, logy)
        caption = caption or f"{ylabel} against length, one line per method, 95% intervals as bars"
        return self._figure(name or f"{metric}_by_length", figure, data, caption)

    def datasets_figure(self, runs, task: str | None = None, pretrained_length: int | None = None,
                        name: str = "datasets_by_length", caption: str | None = None) -> str:
        from longctx.viz import score_by_length_per_panel

        task = self._task(runs, task)
        frames = [points(self._cells(runs, task, dataset)).assign(panel=dataset)
                  for dataset in sorted(scored_datasets(runs[runs["task"] == task], task))]
        data = pd.concat(frames, ignore_index=True)
        figure = score_by_length_per_panel(data, "score", pretrained_length)
        caption = caption or "score against length per dataset, one line per method, 95% intervals as bars"
        return self._figure(name, figure, data, caption)

    def loss_figure(self, runs, pretrained_length: int | None = None, name: str = "loss_by_position",
                    caption: str | None = None) -> str:
        from longctx.viz import loss_by_position_by_method

        self._cells(runs, "pg19", "ppl")  # the same runs as the perplexity table, recorded as used
        curves = load_curves(runs[runs["task"] == "pg19"])
        figure = loss_by_position_by_method(curves, pretrained_length)
        caption = caption or "mean NLL by token position, one panel per segment length, one curve per method"
        return self._figure(name, figure, curves[["label", "length", "bucket_start", "mean_nll"]], caption)

    def prefill_figure(self, runs, bench: list[str], name: str = "prefill_by_length", caption: str | None = None) -> str:
        from longctx.viz import prefill_by_length

        frame = self._speed(bench)
        several = frame["folder"].nunique() > 1
        data = frame.assign(line=frame["method"] + (" (" + frame["folder"].map(lambda f: Path(f).name) + ")"
                                                       if several else ""))[["line", "length", "prefill_s"]]
        slopes = prefill_slopes(data)
        figure = prefill_by_length(data, slopes)
        caption = caption or "prefill seconds against length (log-log); the slope is the fitted exponent: 1 linear, 2 quadratic"
        text = self._figure(name, figure, data, caption)
        table = slopes.assign(**{"x per doubling": (2 ** slopes["slope"]).map(_number),
                                 "slope": slopes["slope"].map(lambda s: f"{s:.2f}")})
        return f"{text}\n{markdown(table.rename(columns={'line': 'method'}))}\n\nslope: least-squares fit of log(prefill seconds) on log(length) over the lengths listed.\n"

    def _speed(self, bench: list[str]) -> pd.DataFrame:
        frames = []
        for folder in bench:
            path = Path(folder) / "speed.csv"
            if not path.is_file():
                raise ReportError(f"no {path}: `bench:` lists folders written by experiments/bench_speed.py")
            frames.append(pd.read_csv(path).assign(folder=Path(folder).as_posix()))
            self.benches.update({Path(folder).as_posix(): None})
        return pd.concat(frames, ignore_index=True)

    def _bench_machines(self, frame: pd.DataFrame) -> dict[str, str]:
        found = {}
        for folder, group in frame.groupby("folder", sort=True):
            provenance = read_provenance(folder) or {}
            found[folder] = (f"{', '.join(sorted(set(group['machine'].astype(str))))}, "
                             f"{', '.join(sorted(set(group['dtype'].astype(str))))}, torch "
                             f"{', '.join(sorted(set(group['torch'].astype(str))))}, {load(provenance)}")
        return found

    def appendix(self) -> str:
        lines = ["## Run folders", ""]
        if self.used:
            rows = []
            for run in self.used:
                provenance = _provenance(run)
                rows.append({
                    "run folder": f"[{Path(run).as_posix()}]({self.link(run)})",
                    "machine": machine(provenance),
                    "load": load(provenance),
                    "provenance": _recorded(provenance),
                    "command": f"`{provenance['command']}`" if provenance.get("command") else "not recorded",
                })
            lines += [markdown(pd.DataFrame(rows)), ""]
        if self.benches:
            lines += ["Benchmark folders (`experiments/bench_speed.py`): "
                      + ", ".join(f"[{folder}]({self.link(folder)})" for folder in self.benches), ""]
        if self.files:
            lines += ["Files quoted: " + ", ".join(f"[{path}]({self.link(path)})" for path in self.files), ""]
        if self.template.selection.exclude:
            lines += ["Left out:", ""] + [f"* `{run}`: {why}" for run, why in self.template.selection.exclude.items()]
        return "\n".join(lines).rstrip("\n") + "\n"


def _recorded(provenance: dict[str, Any]) -> str:
    """How the run's provenance.json came about: written by the run, written afterwards, or missing."""
    if not provenance:
        return "none"
    source = provenance.get("source", "measured")
    return "recorded by the run" if source == "measured" else "written afterwards (see its source)"


def prefill_slopes(points: pd.DataFrame) -> pd.DataFrame:
    """Per line, the exponent b of prefill ~ length^b fitted over its lengths (least squares on the logs)."""
    rows = []
    for line, group in points.groupby("line", sort=True):
        if group["length"].nunique() >= 2:
            fit = stats.linregress(np.log(group["length"]), np.log(group["prefill_s"]))
            lengths = ", ".join(length_name(length) for length in sorted(group["length"]))
            rows.append({"line": line, "lengths": lengths, "slope": fit.slope})
    return pd.DataFrame(rows, columns=["line", "lengths", "slope"])


def write_report(name: str, out: Path = REPORTS, link_base: Path | None = None) -> list[Path]:
    """Render report `name` into `out/<name>.md` (+ `out/<name>/` figures); returns the files written."""
    template = read_template(name)
    figures = out / name
    if figures.is_dir():
        for stale in figures.iterdir():
            stale.unlink()
    renderer = Renderer(template, out, link_base or out)
    text = renderer.render()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    return [out / f"{name}.md", *sorted(figures.glob("*"))] if figures.is_dir() else [out / f"{name}.md"]


def write_index(names: list[str], out: Path = REPORTS) -> Path:
    """results/reports/README.md: one line per report, its title and the command that regenerates it."""
    lines = ["# Reports", "", "> Regenerate: `python -m longctx.report --all` (this index and every report; "
             "`--check` verifies them). Each report names its run folders and the command that made each.", ""]
    for name in names:
        lines.append(f"* [{read_template(name).title}]({name}.md): `python -m longctx.report {name}`")
    path = out / INDEX
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def template_names() -> list[str]:
    return sorted(path.stem for path in TEMPLATES.glob("*.md"))


def committed_names(out: Path = REPORTS) -> list[str]:
    return sorted(path.stem for path in out.glob("*.md") if path.name != INDEX)


def check(out: Path = REPORTS) -> list[str]:
    """Regenerate every committed report (and the index) into a temporary folder; the differences, as messages."""
    problems = [f"{TEMPLATES / name}.md has no committed report: run python -m longctx.report {name}"
                for name in template_names() if not (out / f"{name}.md").is_file()]
    names = committed_names(out)
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        for name in names:
            write_report(name, fresh, link_base=out)
        if (out / INDEX).is_file():
            write_index(names, fresh)
        for path in sorted(fresh.rglob("*")):
            if path.is_dir():
                continue
            relative = path.relative_to(fresh)
            committed = out / relative
            if not committed.is_file():
                problems.append(f"{committed}: missing (regenerate: python -m longctx.report {relative.parts[0].removesuffix('.md')})")
            elif path.suffix != ".png" and committed.read_bytes() != path.read_bytes():
                diff = difflib.unified_diff(committed.read_text().splitlines(), path.read_text().splitlines(),
                                            str(committed), "regenerated", n=0, lineterm="")
                problems.append("\n".join(list(diff)[:12]))
        for name in names:
            for path in sorted((out / name).glob("*")) if (out / name).is_dir() else []:
                if not (fresh / name / path.name).exists():
                    problems.append(f"{path}: no longer generated (delete it or regenerate the report)")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Reports from run folders: results/reports/<name>.md and figures.")
    parser.add_argument("names", nargs="*", help="report templates (conf/report/NAME.md) or experiments (conf/experiment/NAME.yaml)")
    parser.add_argument("--all", action="store_true", help="every template in conf/report/, and the index")
    parser.add_argument("--check", action="store_true", help="regenerate every committed report in a temp dir; fail on a difference")
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    for cached in (_all_runs, _predictions, _provenance, experiment_scope):  # paths are relative to this directory
        cached.cache_clear()
    if not EXPERIMENTS.is_dir():
        raise SystemExit(f"error: run from the repository root (no {EXPERIMENTS}/ here)")
    try:
        if args.check:
            started = time.perf_counter()
            problems = check(args.out)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                raise SystemExit(f"error: {len(problems)} differences between the committed reports and their run "
                                 f"folders; regenerate: python -m longctx.report --all")
            print(f"reports: {len(committed_names(args.out))} regenerated, identical ({time.perf_counter() - started:.0f} s)")
            return
        names = template_names() if args.all else args.names
        if not names:
            parser.error("name a report (conf/report/NAME.md or an experiment), or use --all / --check")
        for name in names:
            for path in write_report(name, args.out):
                print(path)
        if args.all:
            print(write_index(committed_names(args.out), args.out))
    except ReportError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
