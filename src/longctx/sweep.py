"""Sweeps that survive a failing cell: every job records its outcome in its Hydra job folder (`cell.json`), and when
the sweep ends `SweepReport` lists the cells that failed or never finished in one line and exits non-zero.

Files rather than return values, because a launcher may run the jobs in other processes or on other machines
(submitit, joblib); the sweep folder is the one place they all write to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

CELL_FILE = "cell.json"


def record_cell(job_dir: str | Path, overrides: list[str], status: str, run_dir: str | None, error: str | None) -> None:
    """Write this job's outcome (`finished`, `skipped` or `failed`) where `SweepReport` will read it."""
    cell = {"overrides": overrides, "status": status, "run_dir": run_dir, "error": error}
    Path(job_dir, CELL_FILE).write_text(json.dumps(cell, indent=2))


def read_cells(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per job folder of a sweep; a job that started but never wrote its cell is `incomplete`."""
    cells = []
    for job_dir in sorted((path for path in Path(sweep_dir).iterdir() if (path / ".hydra").is_dir()),
                          key=lambda path: (len(path.name), path.name)):
        cell_file = job_dir / CELL_FILE
        if cell_file.is_file():
            cells.append(json.loads(cell_file.read_text()))
        else:
            cells.append({"overrides": [f"job {job_dir.name}"], "status": "incomplete", "run_dir": None, "error": None})
    return cells


class SweepReport(Callback):
    """Hydra callback (see conf/config.yaml): after `-m`, one line of failed cells and exit status 1 if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        cells = read_cells(config.hydra.sweep.dir)
        bad = [cell for cell in cells if cell["status"] not in ("finished", "skipped")]
        done = sum(cell["status"] == "finished" for cell in cells)
        skipped = sum(cell["status"] == "skipped" for cell in cells)
        print(f"sweep {config.hydra.sweep.dir}: {done} finished, {skipped} skipped, {len(bad)} failed or incomplete")
        if bad:
            # name each failed cell by what sets it apart: the overrides not shared by every cell of the sweep
            shared = set.intersection(*(set(cell["overrides"]) for cell in cells)) if len(cells) > 1 else set()
            listed = "; ".join(
                f"[{' '.join(o for o in cell['overrides'] if o not in shared)}] {cell['error'] or cell['status']}"
                for cell in bad
            )
            print(f"error: {len(bad)} of {len(cells)} cells failed: {listed}", file=sys.stderr)
            sys.exit(1)
