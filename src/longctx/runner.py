"""load model -> build method and task -> check length -> run under the method -> record. Knows no method by name."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from longctx.methods.method import Installation, Method, Plan
from longctx.models import LoadedModel, ModelLoadError, load_model, resolve_device, resolve_dtype
from longctx.registry import build_method, build_task
from longctx.tasks.base import Task, split_metric_key
from longctx.tracking import RunRecorder, config_hash, environment, find_finished, result_versions

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
    wandb_group: str | None = None,
    max_sample_figures: int = 4,
) -> dict[str, float]:
    """Run `task` on `lm` with `method` applied, and (when `out_dir` is given) write the run folder.

    This is the whole runner; the CLI only builds its arguments from the Hydra config. A run that raises (Ctrl-C
    included) leaves its folder marked failed in provenance.json, with no metrics.json.
    """
    task.check(lm)  # bad input fails here, before a run folder or a wandb run exists; may settle task.max_length()
    method.check_device(lm.device)
    plan = method.plan(lm, task.max_length())
    if out_dir is None:
        return _measure(lm, method, plan, task, on_sample=lambda installation, record: None)
    recorder = RunRecorder(
        out_dir, config or run_config(lm, method, task), environment(lm.device, lm.dtype),
        wandb_mode=wandb_mode, project=wandb_project, wandb_dir=wandb_dir, wandb_group=wandb_group,
        run_name=f"{task.name}-{method.name}-{lm.name}",
    )
    samples_drawn = 0

    def on_sample(installation: Installation, record: dict[str, Any]) -> None:
        nonlocal samples_drawn
        recorder.log_sample(record)
        if samples_drawn < max_sample_figures:
            figures = installation.sample_figures(record)
            for name, figure in figures.items():
                recorder.log_figure(name, figure)
            samples_drawn += bool(figures)

    with recorder:
        metrics = _measure(lm, method, plan, task, on_sample)
        recorder.finish(metrics, task.tables(), task.figures())
    return metrics


def _measure(lm: LoadedModel, method: Method, plan: Plan, task: Task, on_sample) -> dict[str, float]:
    started = time.perf_counter()
    installation = method.install(lm, plan)
    try:
        metrics = task.run(lm, lambda record: on_sample(installation, record))
    finally:
        installation.remove()
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def run_config(lm: LoadedModel, method: Method, task: Task) -> dict[str, Any]:
    """What an API run records as config.yaml: the same shape as the CLI's, so `longctx.aggregate` reads both."""
    return {
        "model": {"name": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)},
        "method": method.config(),
        "task": {"name": task.name, **dataclasses.asdict(task)},
    }


def run_from_config(cfg, wandb_group: str | None = None) -> tuple[dict[str, float], Path]:
    """Entry used by `run.py`: a composed Hydra config (model, method, task, logger, seed, output_dir, force).
    Returns the metrics and the run folder that holds them.

    Everything that can be checked without the model is checked first; a run whose identical resolved config
    already finished next to `output_dir` on the same package versions is skipped (that run's folder and metrics
    are returned) unless `force`.
    """
    from omegaconf import OmegaConf

    torch.manual_seed(cfg.seed)
    # method and task first: a misspelt parameter or an impossible task fails before the model is loaded
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    method = build_method(method_cfg.pop("name"), **method_cfg)
    task = build_task(task_cfg.pop("name"), **task_cfg)
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ModelLoadError(f"model={cfg.model.name} needs model.path=<local folder or hub id>")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("name")
    config = OmegaConf.to_container(cfg, resolve=True)
    device = resolve_device(model_cfg["device"])
    method.check_device(device)
    digest = config_hash(config, device.type, str(resolve_dtype(model_cfg["dtype"], device)).removeprefix("torch."))
    finished = None if cfg.force else find_finished(Path(cfg.output_dir).parent, digest, result_versions(device))
    if finished is not None:
        print(f"skipped: this configuration already finished in {finished} (force=true re-runs it)")
        return json.loads((finished / "metrics.json").read_text()), finished
    lm = load_model(**model_cfg)
    metrics = evaluate(
        lm, method, task,
        out_dir=cfg.output_dir,
        config=config,
        wandb_mode=cfg.logger.mode,
        wandb_project=cfg.logger.project,
        wandb_dir=cfg.logger.dir,
        wandb_group=wandb_group,
    )
    print(summary_table(metrics, f"{task.name} | {method.name} | {lm.name} | {lm.device}"))
    print(f"results: {cfg.output_dir}")
    return metrics, Path(cfg.output_dir)


def summary_table(metrics: dict[str, float], title: str) -> str:
    """Per-length metrics as a small table: one row per length, one column per metric."""
    rows: dict[str, dict[str, float]] = {}
    overall = {}
    for key, value in metrics.items():
        metric, length = split_metric_key(key)
        if length is not None:
            rows.setdefault(length, {})[metric] = value
        else:
            overall[key] = value
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "length"
    lines = [title, table.to_string(float_format=lambda v: f"{v:.3f}") if len(table) else ""]
    lines.append("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in overall.items()))
    return "\n".join(lines)
