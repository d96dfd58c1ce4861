"""One folder per run (config, provenance, predictions, metrics, tables, figures) mirrored to a wandb run.

A run folder says where its numbers came from: `provenance.json` holds the resolved device and dtype, the GPU, the
CPU model and torch's thread count, the package versions, the git commit (and whether the tree was dirty), the
command line, start and end time, how busy the machine was besides the run (`load`: the load average and the other
busy processes at start and end, and the cores other processes used on average while the run ran), and the status
(`running`, `finished`, or `failed` with the error). It is written when the run starts and rewritten when it
ends; `metrics.json` appears only at the end of a finished run (written whole, then renamed), so a killed run leaves
a folder whose status stays `running`, never a metrics file that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import psutil
import torch

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
# Keys of the run's config that do not change its numbers: where it is written and logged, and whether to re-run.
UNHASHED_KEYS = ("output_dir", "logger", "force")


def config_hash(config: dict[str, Any], device: str, dtype: str) -> str:
    """A short hash of what determines a run's numbers: its resolved config (without output folder and logger) and
    the device and dtype that `auto` resolved to on this machine (a CPU run does not stand in for a GPU run)."""
    kept = {key: value for key, value in config.items() if key not in UNHASHED_KEYS} | {"resolved": [device, dtype]}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_state(path: Path) -> dict[str, Any]:
    """Commit and dirtiness of the git work tree holding `path` (the installed longctx source), or nulls outside one."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # tracked files only: run folders and caches written inside the checkout must not make every run "dirty"
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# the packages whose version can move a figure (besides python and torch): shown first in provenance.json
RESULT_PACKAGES = ("transformers", "tokenizers", "accelerate", "triton", "numpy", "datasets", "longctx")


def installed_packages() -> dict[str, str]:
    """name -> version of every distribution installed in this environment, sorted by name."""
    found = {dist.metadata["Name"].lower(): dist.version for dist in metadata.distributions() if dist.metadata["Name"]}
    return dict(sorted(found.items()))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def result_versions(device: torch.device) -> dict[str, str | None]:
    """The versions that can move a figure: python, torch (and CUDA on a GPU) and RESULT_PACKAGES."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        **{package: _version(package) for package in RESULT_PACKAGES},
    }


# `busy_processes` looks at every process BUSY_LOOKS times over BUSY_WINDOW_S seconds: long enough for a busy
# process to be seen running and to accumulate clock ticks (10 ms each), short enough to add little to a run (it is
# taken at the start and at the end).
BUSY_WINDOW_S = 0.1
BUSY_LOOKS = 5
# ... and counts a process as busy when it was running or waiting for a core in at least half the looks, or used at
# least this share of one core over the window.
BUSY_SHARE = 0.5


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform reports), or None when it says nothing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _process_tree(pid: int) -> set[int]:
    """`pid` and its descendants: the run's own processes (RULER's data generator, a DataLoader worker...)."""
    try:
        return {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return {pid}


def _cpu_seconds_by_process() -> dict[int, float]:
    seconds = {}
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
        except psutil.Error:  # gone, or not ours to read
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def busy_processes(window: float = BUSY_WINDOW_S) -> list[int]:
    """Processes other than this one and its descendants that compete for the cores: running or runnable (waiting for
    a core) in at least half of BUSY_LOOKS looks over `window` seconds, or using at least BUSY_SHARE of a core. Both,
    because on an overloaded machine a spinning job gets a small share of a core but is always runnable, and a job
    whose worker threads compute while its main thread waits uses CPU without looking runnable."""
    own = _process_tree(os.getpid())
    before = _cpu_seconds_by_process()
    runnable: dict[int, int] = {}
    for _ in range(BUSY_LOOKS):
        for process in psutil.process_iter(["status"]):
            if process.info["status"] == psutil.STATUS_RUNNING:
                runnable[process.pid] = runnable.get(process.pid, 0) + 1
        time.sleep(window / BUSY_LOOKS)
    after = _cpu_seconds_by_process()
    busy = {pid for pid, looks in runnable.items() if 2 * looks >= BUSY_LOOKS}
    busy |= {pid for pid, seconds in after.items() if pid in before and seconds - before[pid] >= BUSY_SHARE * window}
    return sorted(busy - own)


def machine_load() -> dict[str, Any]:
    """How busy the machine is now besides this process: load average (1, 5, 15 minutes) and busy processes."""
    return {"loadavg": [round(value, 2) for value in psutil.getloadavg()], "busy_processes": len(busy_processes())}


def cpu_counters() -> dict[str, float]:
    """Seconds of CPU the whole machine and this process (its threads and waited-for children) have used so far, and
    the wall clock: two readings give the cores other processes used in between (`others_cpu_cores`)."""
    machine = psutil.cpu_times()._asdict()
    # not busy here: idle, waiting for I/O, taken by the hypervisor; guest time is already counted in user time
    busy = sum(seconds for field, seconds in machine.items()
               if field not in ("idle", "iowait", "steal", "guest", "guest_nice"))
    own = psutil.Process().cpu_times()
    return {"machine": busy, "own": own.user + own.system + own.children_user + own.children_system,
            "wall": time.monotonic()}


def others_cpu_cores(start: dict[str, float], end: dict[str, float]) -> float | None:
    """Cores that processes other than this one kept busy on average between two `cpu_counters` readings."""
    wall = end["wall"] - start["wall"]
    if wall <= 0:
        return None
    others = (end["machine"] - start["machine"]) - (end["own"] - start["own"])
    return round(max(others, 0.0) / wall, 2)


def load_since(start: dict[str, float]) -> dict[str, Any]:
    """The end of a load record: the machine's load now, and the cores other processes used since `start`
    (a `cpu_counters` reading)."""
    return {"end": machine_load(), "others_cpu_cores": others_cpu_cores(start, cpu_counters())}


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The machine and software a run measured on: what `aggregate` keys tables on, and how loaded the machine was
    when it started (`load.start`; the recorder adds `load.end` and `load.others_cpu_cores` when the run ends)."""
    return {
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "load": {"start": machine_load()},
        "host": platform.node(),
        "pid": os.getpid(),
        "source": "measured",
        "versions": result_versions(device),
        # every installed distribution: the whole stack, comparable with the lock (constraints.txt) line by line
        "packages": installed_packages(),
        "git": git_state(Path(__file__).resolve().parent),
        "command": shlex.join(sys.argv),
    }


def read_provenance(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def find_finished(parent: Path, digest: str, versions: dict[str, str | None]) -> Path | None:
    """The newest finished run folder directly under `parent` whose config hashes to `digest` and that ran on
    `versions` (see `result_versions`; a package the older record does not name is not compared): a run on another
    stack is a different measurement, not a result to reuse."""
    if not parent.is_dir():
        return None
    for run_dir in sorted(parent.iterdir(), reverse=True):
        provenance = read_provenance(run_dir) if run_dir.is_dir() else None
        if not provenance or provenance.get("status") != "finished" or provenance.get("config_hash") != digest:
            continue
        ran_on = provenance.get("versions", {})
        if all(ran_on[package] == version for package, version in versions.items() if package in ran_on):
            return run_dir
    return None


def write_json(path: Path, data: Any) -> None:
    """Write whole or not at all: a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=str))
    os.replace(partial, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecorder:
    """Writes `config.yaml`, `provenance.json`, `predictions.jsonl`, then `metrics.json`, `<table>.csv` and
    `<figure>.png` to `out_dir`; use it as a context manager so a run that raises is recorded as failed.

    With `wandb_mode` offline (the default) the wandb run lives under `<results>/wandb/` and needs no account;
    `wandb sync` uploads it later. `disabled` skips wandb. Runs of one sweep share `wandb_group`; the config goes to
    wandb flattened (`method.name`, `task.lengths`...) so dashboards filter on any field.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: dict[str, Any],
        provenance: dict[str, Any],
        wandb_mode: str = "offline",
        project: str = "longctx",
        entity: str | None = None,
        run_name: str | None = None,
        wandb_dir: str | Path | None = None,
        wandb_group: str | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(_to_yaml(config))
        self.provenance = {"status": "running", "error": None, "started": _now(), "ended": None,
                           **provenance}
        self.provenance["config_hash"] = config_hash(config, provenance["device"], provenance["dtype"])
        self._cpu_at_start = cpu_counters()
        write_json(self.out_dir / PROVENANCE_FILE, self.provenance)
        self._predictions = (self.out_dir / "predictions.jsonl").open("w")
        self._rows: list[dict[str, Any]] = []
        self.wandb_run = None
        if wandb_mode != "disabled":
            import wandb

            wandb_dir = Path(wandb_dir or self.out_dir)  # wandb writes its runs under <wandb_dir>/wandb/
            wandb_dir.mkdir(parents=True, exist_ok=True)
            flat = pd.json_normalize(config, sep=".").iloc[0].to_dict()
            flat.update({key: self.provenance[key] for key in ("device", "dtype", "gpu", "config_hash")})
            self.wandb_run = wandb.init(
                mode=wandb_mode, project=project, entity=entity, name=run_name, group=wandb_group, config=flat,
                dir=str(wandb_dir), settings=wandb.Settings(silent=True, console="off"),
            )

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self.fail(error)

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
        for name, table in tables.items():
            table.to_csv(self.out_dir / f"{name}.csv", index=False)
            (self.out_dir / f"{name}.md").write_text(table.to_markdown(index=False) + "\n")
        for name, figure in figures.items():
            self.log_figure(name, figure)
        self._predictions.close()
        write_json(self.out_dir / "metrics.json", metrics)  # last of the outputs: its presence means "complete"
        self._end("finished", None)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.summary.update(metrics)
            if self._rows:
                self.wandb_run.log({"predictions": wandb.Table(dataframe=pd.DataFrame(self._rows).astype(str))})
            for name, table in tables.items():
                self.wandb_run.log({name: wandb.Table(dataframe=_with_string_columns(table).astype(str))})
            self.wandb_run.finish()

    def fail(self, error: BaseException) -> None:
        """Record the run as failed (Ctrl-C included), close its files and mark its wandb run failed."""
        self._predictions.close()
        message = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
        self._end("failed", message)
        if self.wandb_run is not None:
            self.wandb_run.summary["error"] = message
            self.wandb_run.finish(exit_code=1)

    def _end(self, status: str, error: str | None) -> None:
        self.provenance.update(status=status, error=error, ended=_now())
        if "load" in self.provenance:  # a provenance given by the caller without a load record stays without one
            self.provenance["load"] = {**self.provenance["load"], **load_since(self._cpu_at_start)}
        write_json(self.out_dir / PROVENANCE_FILE, self.provenance)


def _with_string_columns(table: pd.DataFrame) -> pd.DataFrame:
    """wandb.Table takes only str / int column names: pivot tables have int lengths and (dataset, length) tuples."""
    names = ["@".join(str(part) for part in column if part != "") if isinstance(column, tuple) else str(column)
             for column in table.columns]
    return table.set_axis(names, axis="columns")


def _to_yaml(config: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config))
