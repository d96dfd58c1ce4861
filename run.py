"""CLI: python run.py [model=...] [method=...] [task=...] [key=value ...]; add -m to sweep. See README."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import longctx.registry  # noqa: F401  registers the method and task config groups before Hydra composes
from longctx.data.books import DataError
from longctx.methods.base import MethodError
from longctx.models import ModelLoadError
from longctx.registry import RegistryError, label_problem
from longctx.tasks.base import TaskError

USER_ERRORS = (DataError, MethodError, ModelLoadError, RegistryError, TaskError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from longctx.runner import run_from_config
    from longctx.sweep import record_cell

    logging.getLogger("longctx").setLevel(logging.INFO)
    hydra_cfg = HydraConfig.get()
    problem = label_problem("+experiment", hydra_cfg.runtime.choices.get("experiment") or "none")
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            run_from_config(cfg)
        except USER_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        return
    # In a sweep one cell's failure must not stop the others: record it, log it, go on (the run folder, if one was
    # made, says failed too); SweepReport lists the failures when the sweep ends.
    overrides = list(hydra_cfg.overrides.task)
    try:
        _, run_dir = run_from_config(cfg, wandb_group=f"sweep-{hydra_cfg.sweep.dir.rstrip('/').split('/')[-1]}")
    except Exception as error:  # noqa: BLE001  any failure of one cell, reported at the end of the sweep
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        logging.getLogger("longctx").error("cell %s failed: %s", " ".join(overrides), message)
        record_cell(hydra_cfg.runtime.output_dir, overrides, "failed", cfg.output_dir, message)
        return
    status = "finished" if str(run_dir) == cfg.output_dir else "skipped"
    record_cell(hydra_cfg.runtime.output_dir, overrides, status, str(run_dir), None)


if __name__ == "__main__":
    main()
