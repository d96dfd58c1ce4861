"""load model -> build method and task -> check length -> run under the method -> record. Knows no method by name."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from longctx.methods.base import Method
from longctx.models import LoadedModel, ModelLoadError, load_model
from longctx.registry import build_method, build_task
from longctx.tasks.base import Task
from longctx.tracking import RunRecorder

log = logging.getLogger(__name__)


def evaluate(
    lm: LoadedModel,
    method: Method,
    task: Task,
    out_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
    wandb_mode: str = "disabled",
    wandb_project: str = "longctx",
    wandb_dir: str | Path | None = None,
    max_heatmaps: int = 4,
) -> dict[str, float]:
    """Run `task` on `lm` with `method` applied, and (when `out_dir` is given) write the run folder.

    This is the whole runner; the CLI only builds its arguments from the Hydra config.
    """
    task.check(lm)  # bad input fails here, before a run folder or a wandb run exists; may settle task.max_length()
    method.check_length(lm, task.max_length())
    recorder = None
    if out_dir is not None:
        recorder = RunRecorder(
            out_dir, config or run_config(lm, method, task),
            wandb_mode=wandb_mode, project=wandb_project, wandb_dir=wandb_dir,
            run_name=f"{task.name}-{method.name}-{lm.name}",
        )
    heatmaps_drawn = 0

    def on_sample(record: dict[str, Any]) -> None:
        nonlocal heatmaps_drawn
        if recorder is None:
            return
        recorder.log_sample(record)
        trace = method.trace() if heatmaps_drawn < max_heatmaps else None
        if trace is not None and "chosen" in trace:
            from longctx.viz import chunk_selection_heatmap

            window = trace["window_size"]
            # tasks with a needle report its token span [needle_token, needle_end); its chunks get marked
            span = (record.get("needle_token"), record.get("needle_end"))
            highlight = list(range(span[0] // window, (span[1] - 1) // window + 1)) if None not in span else []
            details = ", ".join(f"{key} {record[key]:.2f}" if isinstance(record[key], float) else f"{key} {record[key]}"
                                for key in ("length", "depth", "correct", "book", "segment") if key in record)
            figure = chunk_selection_heatmap(
                trace["chosen"], trace["num_chunks"], highlight,
                title=f"{method.name} chunk selection, sample {record['sample']} ({details})",
            )
            recorder.log_figure(f"chunk_selection_{record['sample']}", figure)
            heatmaps_drawn += 1

    started = time.perf_counter()
    with method(lm):
        metrics = task.run(lm, on_sample)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    if recorder is not None:
        recorder.finish(metrics, task.tables(), task.figures())
    return metrics


def run_config(lm: LoadedModel, method: Method, task: Task) -> dict[str, Any]:
    """What an API run records as config.yaml: the same shape as the CLI's, so `longctx.aggregate` reads both."""
    return {
        "model": {"name": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)},
        "method": {"name": method.name, **dataclasses.asdict(method)},
        "task": {"name": task.name, **dataclasses.asdict(task)},
    }


def run_from_config(cfg) -> dict[str, float]:
    """Entry used by `run.py`: a composed Hydra config (model, method, task, logger, seed, output_dir)."""
    from omegaconf import OmegaConf

    torch.manual_seed(cfg.seed)
    # method and task first: a misspelt parameter fails before the model is loaded
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    method = build_method(method_cfg.pop("name"), **method_cfg)
    task = build_task(task_cfg.pop("name"), **task_cfg)
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ModelLoadError(f"model={cfg.model.name} needs model.path=<local folder or hub id>")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("name")
    lm = load_model(**model_cfg)
    metrics = evaluate(
        lm, method, task,
        out_dir=cfg.output_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
        wandb_mode=cfg.logger.mode,
        wandb_project=cfg.logger.project,
        wandb_dir=cfg.logger.dir,
    )
    print(summary_table(metrics, f"{task.name} | {method.name} | {lm.name} | {lm.device}"))
    print(f"results: {cfg.output_dir}")
    return metrics


def summary_table(metrics: dict[str, float], title: str) -> str:
    """Per-length metrics as a small table: one row per length, one column per metric."""
    rows: dict[str, dict[str, float]] = {}
    overall = {}
    for key, value in metrics.items():
        if "@" in key:
            metric, length = key.split("@", 1)
            rows.setdefault(length, {})[metric] = value
        else:
            overall[key] = value
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "length"
    lines = [title, table.to_string(float_format=lambda v: f"{v:.3f}") if len(table) else ""]
    lines.append("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in overall.items()))
    return "\n".join(lines)
