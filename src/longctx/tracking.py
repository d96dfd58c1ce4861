"""One folder per run (config, predictions, metrics, tables, figures) mirrored to a wandb run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

log = logging.getLogger(__name__)


class RunRecorder:
    """Writes `config.yaml`, `predictions.jsonl`, `metrics.json`, `<table>.csv` and `<figure>.png` to `out_dir`.

    With `wandb_mode` offline (the default) the wandb run lives under `<results>/wandb/` and needs no account;
    `wandb sync` uploads it later. `disabled` skips wandb.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: dict[str, Any],
        wandb_mode: str = "offline",
        project: str = "longctx",
        entity: str | None = None,
        run_name: str | None = None,
        wandb_dir: str | Path | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(_to_yaml(config))
        self._predictions = (self.out_dir / "predictions.jsonl").open("w")
        self._rows: list[dict[str, Any]] = []
        self.wandb_run = None
        if wandb_mode != "disabled":
            import wandb

            wandb_dir = Path(wandb_dir or self.out_dir)  # wandb writes its runs under <wandb_dir>/wandb/
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(
                mode=wandb_mode, project=project, entity=entity, name=run_name, config=config, dir=str(wandb_dir),
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log_sample(self, record: dict[str, Any]) -> None:
        self._predictions.write(json.dumps(record) + "\n")
        self._predictions.flush()
        self._rows.append(record)

    def log_figure(self, name: str, figure) -> None:
        figure.savefig(self.out_dir / f"{name}.png", dpi=120)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Image(figure)})
        plt.close(figure)

    def finish(self, metrics: dict[str, float], tables: dict[str, pd.DataFrame], figures: dict[str, Any]) -> None:
        (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        for name, table in tables.items():
            table.to_csv(self.out_dir / f"{name}.csv", index=False)
            (self.out_dir / f"{name}.md").write_text(table.to_markdown(index=False) + "\n")
        for name, figure in figures.items():
            self.log_figure(name, figure)
        self._predictions.close()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.summary.update(metrics)
            if self._rows:
                self.wandb_run.log({"predictions": wandb.Table(dataframe=pd.DataFrame(self._rows).astype(str))})
            for name, table in tables.items():
                # column names as strings: pivot tables have int columns (lengths) that wandb cannot serialise
                self.wandb_run.log({name: wandb.Table(dataframe=table.rename(columns=str).astype(str))})
            self.wandb_run.finish()


def _to_yaml(config: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config))
