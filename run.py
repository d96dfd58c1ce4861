"""CLI: python run.py [model=...] [method=...] [task=...] [key=value ...]; add -m to sweep. See README."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from longctx.methods.base import MethodError
from longctx.models import ModelLoadError
from longctx.registry import RegistryError
from longctx.tasks.base import TaskError

USER_ERRORS = (MethodError, ModelLoadError, RegistryError, TaskError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from longctx.runner import run_from_config

    logging.getLogger("longctx").setLevel(logging.INFO)
    try:
        run_from_config(cfg)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
