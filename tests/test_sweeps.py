"""Experiments as configs, provenance, resumable and fault-tolerant sweeps, scaling out through submitit, and
aggregation that keeps machines apart. The model is a tiny random Llama saved as a Hugging Face folder with the
embedded tokenizer, so the CLI loads it like any model (`model=hf model.path=...`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from transformers import AutoTokenizer

from conftest import tiny_llama

from longctx import aggregate
from longctx.models import embedded_model_dir
from longctx.runner import evaluate, run_from_config
from longctx.sweep import read_cells
from longctx.tasks.base import Task, TaskError
from longctx.tracking import RunRecorder, read_provenance

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
# per task: the overrides that make a run tiny (256 tokens, one sample)
TINY = {"passkey": {"task.lengths": "[256]", "task.num_samples": "1"},
        "pg19": {"task.lengths": "[256]", "task.segments_per_length": "1", "task.source": "folder"},
        "longbench": {"task.lengths": "[512]", "task.num_questions": "1"},
        "ruler": {"task.lengths": "[1024]", "task.num_samples": "1", "task.tasks": "[niah_single_1]"}}
TINY_LONGHEADS = {"chunk_size": 16, "atten_length": 64, "query_block": 4, "exact_tail": 8}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the embedded tokenizer, saved as a model folder (about 13 MB)."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    lm = tiny_llama(512, tokenizer=tokenizer, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # one short "book" for tiny PG19 runs (the built-in corpus takes seconds to build and tokenize)
    (folder / "book.txt").write_text(" ".join(f"Sentence {i} of a short book about the sea." for i in range(200)))
    return folder


def compose_cell(overrides: list[str], results: Path):
    """The config one job of `run.py -m` gets, output under `results` (HydraConfig set so `${hydra:...}` resolves)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.output_dir = cfg.output_dir.replace(f"{os.getcwd()}/results", str(results))
    return cfg


@pytest.fixture(autouse=True)
def hydra_config_reset():
    yield
    HydraConfig.instance().cfg = None


def sweep_cells(experiment: str) -> tuple[str, list[dict[str, str]]]:
    """The task of `-m +experiment=NAME` and jobs it launches (the product of its `hydra.sweeper.params`) that
    between them hold every swept value."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.params else {}
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    axes = [[(override.get_key_element(), value) for value in override.sweep_string_iterator()] for override in parsed]
    # every value of every axis, in as few cells as the longest axis (the full product composes the same way)
    cover = [[axis[index % len(axis)] for axis in axes] for index in range(max(map(len, axes), default=1))]
    return cfg.task.name, [dict(cell) for cell in cover]


def method_name(option: str) -> str:
    """The registered method a `method=` option builds: itself, or the one a preset in conf/method/ extends."""
    preset = CONF / "method" / f"{option}.yaml"
    return OmegaConf.load(preset).defaults[0] if preset.exists() else option


def tiny_overrides(cell: dict[str, str], tiny_dir: Path, task: str = "passkey") -> list[str]:
    """A cell at tiny size: swept lengths and sample counts replaced, the tiny model on the CPU, no wandb."""
    cfg_keys = {**cell, **TINY[task], "model.path": str(tiny_dir), "model.device": "cpu", "logger": "none"}
    if task == "pg19":
        cfg_keys["task.path"] = str(tiny_dir)  # a folder of .txt books: the tiny model's own folder holds one
    return [f"{key}={value}" for key, value in cfg_keys.items()]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs_at_tiny_size(experiment, tiny_dir, tmp_path):
    header = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_"
    assert any(f"+experiment={experiment}" in line for line in header)  # says how to run it
    assert any("H100" in line for line in header) and any("CPU" in line for line in header)  # and how long it takes
    task, cells = sweep_cells(experiment)
    methods_run = set()
    for cell in cells:
        cfg = compose_cell(["model=hf", f"+experiment={experiment}", *tiny_overrides(cell, tiny_dir, task)], tmp_path)
        for key, value in cell.items():  # the swept value reaches the job's config, at tiny size where it is a size
            reached, expected = (cfg.method.name, method_name(value)) if key == "method" else (OmegaConf.select(cfg, key), value)
            assert key in TINY[task] or str(reached).replace(" ", "") == expected.replace(" ", ""), (key, reached, value)
        if cfg.method.name in methods_run:
            continue  # every cell composes; one cell per method runs, to keep the test fast
        methods_run.add(cfg.method.name)
        if cfg.method.name == "longheads":
            if "method.atten_length" in cell:  # a swept geometry stays; the context must exceed A (and a chunk)
                cfg.task.lengths = [cfg.method.atten_length + 2 * cfg.method.chunk_size]
            else:
                cfg.method.update(TINY_LONGHEADS)
        metrics, run_dir = run_from_config(cfg)
        assert read_provenance(run_dir)["status"] == "finished"
        assert json.loads((run_dir / "metrics.json").read_text()) == metrics


def test_provenance_is_present_and_true(tiny_dir, tmp_path):
    cfg = compose_cell(["model=hf", *tiny_overrides({}, tiny_dir), "seed=3"], tmp_path)
    _, run_dir = run_from_config(cfg)
    provenance = read_provenance(run_dir)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True)
    assert provenance["git"] == {"commit": head, "dirty": bool(status.stdout.strip())}
    assert (provenance["status"], provenance["error"], provenance["source"]) == ("finished", None, "measured")
    assert (provenance["device"], provenance["dtype"], provenance["gpu"]) == ("cpu", "float32", None)
    assert provenance["versions"]["torch"] == torch.__version__
    assert provenance["versions"]["transformers"] == transformers.__version__
    assert provenance["versions"]["longctx"]
    # the whole stack, as `pip freeze` would list it, so a run can be compared with the lock (constraints.txt)
    from importlib import metadata

    assert provenance["packages"]["transformers"] == metadata.version("transformers")
    assert provenance["packages"]["torch"] == metadata.version("torch")
    assert len(provenance["packages"]) == len({dist.metadata["Name"].lower() for dist in metadata.distributions()})
    assert provenance["started"] <= provenance["ended"]
    assert provenance["command"] and len(provenance["config_hash"]) == 16
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 3


def test_finished_run_is_skipped_and_force_reruns_it(tiny_dir, tmp_path):
    overrides = ["model=hf", *tiny_overrides({}, tiny_dir)]
    metrics, first = run_from_config(compose_cell(overrides, tmp_path))
    again, skipped = run_from_config(compose_cell(overrides, tmp_path))
    assert skipped == first and again == metrics  # nothing ran: the finished folder answered
    _, other = run_from_config(compose_cell([*overrides, "seed=9"], tmp_path))
    assert other != first  # a different configuration is not "the same run"
    _, forced = run_from_config(compose_cell([*overrides, "force=true"], tmp_path))
    assert forced not in (first, other) and read_provenance(forced)["status"] == "finished"


def test_finished_run_on_other_versions_is_not_reused(tiny_dir, tmp_path):
    overrides = ["model=hf", *tiny_overrides({}, tiny_dir)]
    _, first = run_from_config(compose_cell(overrides, tmp_path))
    provenance = read_provenance(first)
    provenance["versions"]["transformers"] = "4.0.0"  # as if measured on an older stack
    (first / "provenance.json").write_text(json.dumps(provenance))
    _, again = run_from_config(compose_cell(overrides, tmp_path))
    assert again != first and read_provenance(again)["versions"]["transformers"] == transformers.__version__
    _, reused = run_from_config(compose_cell(overrides, tmp_path))
    assert reused == again  # this stack's run now answers


class Breaks(Task):
    """A task that fails after its first sample."""

    name = "breaks"

    def max_length(self) -> int:
        return 8

    def run(self, lm, on_sample):
        on_sample({"sample": 0, "length": 8})
        raise RuntimeError("disk full\nsecond line")


def test_failed_run_is_recorded_and_left_out_of_tables(tmp_path):
    run_dir = tmp_path / "runs" / "broken"
    with pytest.raises(RuntimeError):
        evaluate(tiny_llama(), tiny_method(), Breaks(), out_dir=run_dir)
    provenance = read_provenance(run_dir)
    assert provenance["status"] == "failed" and provenance["error"] == "RuntimeError: disk full"
    assert not (run_dir / "metrics.json").exists()  # nothing that looks finished
    assert (run_dir / "predictions.jsonl").read_text().count("\n") == 1  # closed, with the sample before the error
    assert aggregate.load_runs(tmp_path / "runs").empty
    incomplete = aggregate.incomplete_runs(tmp_path / "runs")
    assert incomplete.to_dict("records") == [{"run": str(run_dir), "status": "failed", "error": "RuntimeError: disk full"}]


def tiny_method():
    from longctx.registry import build_method

    return build_method("full")


@pytest.mark.parametrize("override, message", [("task.source=nope", "nope"), ("task.depths=[1.5]", "depths")])
def test_task_config_is_checked_before_anything_exists(override, message, tmp_path):
    task = "pg19" if "source" in override else "passkey"
    cfg = compose_cell([f"task={task}", override], tmp_path)
    with pytest.raises(TaskError, match=message):
        run_from_config(cfg)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run folder


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_overrides(tiny_dir: Path, sweep_dir: Path) -> list[str]:
    return ["model=hf", f"model.path={tiny_dir}", "model.device=cpu", "logger=none", "task.num_samples=1",
            f"hydra.sweep.dir={sweep_dir}"]


def test_sweep_with_a_failing_cell_finishes_the_others_and_reports_it(tiny_dir, tmp_path):
    result = run_cli("-m", *cli_overrides(tiny_dir, tmp_path / "sweep"), "task.lengths=[5],[256]", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 cells failed: [task.lengths=[5]] TaskError:"), result.stderr
    cells = read_cells(tmp_path / "sweep")
    assert [cell["status"] for cell in cells] == ["failed", "finished"]
    assert read_provenance(cells[1]["run_dir"])["status"] == "finished"
    assert len(aggregate.load_runs(tmp_path / "results")) == 1


@pytest.mark.slow  # two fresh Python processes import torch and transformers: about a minute on 2 cores
def test_submitit_local_multirun_runs_every_cell_in_its_own_process(tiny_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                     *cli_overrides(tiny_dir, tmp_path / "sweep"), "method=full,window", "task.lengths=[256]",
                     cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr
    cells = read_cells(tmp_path / "sweep")
    swept = sorted(override for cell in cells for override in cell["overrides"] if override.startswith("method="))
    assert swept == ["method=full", "method=window"]
    assert all(cell["status"] == "finished" for cell in cells)
    processes = set()
    for cell in cells:
        provenance = read_provenance(cell["run_dir"])
        assert provenance["status"] == "finished" and provenance["device"] == "cpu"
        processes.add(provenance["pid"])
    assert len(processes) == 2 and os.getpid() not in processes  # separate worker processes, not this one
    assert list((tmp_path / "sweep").rglob("*_submitted.pkl"))  # submitit pickled the jobs
    runs = aggregate.load_runs(tmp_path / "results")
    assert sorted(runs["method"]) == ["full", "window"]


def write_run(root: Path, stamp: str, method: str, device: str, dtype: str, accuracy: float, **params) -> None:
    run_dir = root / stamp
    run_dir.mkdir(parents=True)
    config = {"model": {"name": "m", "dtype": "auto", "device": "auto"}, "method": {"name": method, **params},
              "task": {"name": "passkey", "lengths": [4096]}, "seed": 1}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.json").write_text(json.dumps({"accuracy@4096": accuracy}))
    (run_dir / "provenance.json").write_text(json.dumps({"status": "finished", "device": device, "dtype": dtype}))


def test_aggregation_keeps_machines_apart(tmp_path):
    write_run(tmp_path, "2026-01-01", "full", "cuda", "bfloat16", 1.0)
    write_run(tmp_path, "2026-01-02", "full", "cpu", "float32", 0.5)
    write_run(tmp_path, "2026-01-03", "window", "cpu", "float32", 0.25)
    runs = aggregate.load_runs(tmp_path)
    assert {"device", "dtype", "model"} <= set(runs.columns)
    cells = aggregate.table(runs, "passkey", "accuracy")
    rows = cells.reset_index()[["label", "device", "dtype", 4096]].values.tolist()
    assert sorted(rows) == [["full", "cpu", "float32", "0.5"], ["full", "cuda", "bfloat16", "1"],
                            ["window", "cpu", "float32", "0.25"]]
    merged = aggregate.table(runs, "passkey", "accuracy", merge_machines=True)  # asked for: newest wins, named
    assert merged.loc["full", 4096] == "0.5 cpu float32"


def test_composed_methods_are_labelled_apart(tmp_path):
    write_run(tmp_path, "2026-01-01", "dca", "cpu", "float32", 1.0, rope_scaling=None)
    write_run(tmp_path, "2026-01-02", "dca", "cpu", "float32", 0.5, rope_scaling={"name": "yarn", "factor": 2.0})
    write_run(tmp_path, "2026-01-03", "dca", "cpu", "float32", 0.25, rope_scaling={"name": "pi", "factor": 4.0})
    cells = aggregate.table(aggregate.load_runs(tmp_path), "passkey", "accuracy")
    assert dict(zip(cells.index.get_level_values("label"), cells[4096])) == {
        "dca": "1", "dca+yarn(factor=2)": "0.5", "dca+pi(factor=4)": "0.25"}


def test_a_run_recorded_before_a_parameter_existed_is_labelled_with_its_default(tmp_path):
    write_run(tmp_path, "2026-01-01", "longheads", "cpu", "float32", 0.25)  # before `summary` existed
    write_run(tmp_path, "2026-01-02", "longheads", "cpu", "float32", 0.5, summary="representative_tokens")
    write_run(tmp_path, "2026-01-03", "longheads", "cpu", "float32", 1.0, summary="in_chunk_attention")
    # a metric only the first run has: its label must not lose the parameter that varies across the task's runs
    first = tmp_path / "2026-01-01" / "metrics.json"
    first.write_text(json.dumps({**json.loads(first.read_text()), "seconds@4096": 3.0}))
    runs = aggregate.load_runs(tmp_path)
    cells = aggregate.table(runs, "passkey", "accuracy")
    assert dict(zip(cells.index.get_level_values("label"), cells[4096])) == {
        "longheads summary=in_chunk_attention": "1", "longheads summary=representative_tokens": "0.5"}
    seconds = aggregate.table(runs, "passkey", "seconds")
    assert seconds.index.get_level_values("label").tolist() == ["longheads summary=in_chunk_attention"]


def test_cli_composes_a_rescaling_under_an_attention_method(tiny_dir, tmp_path):
    overrides = ["model=hf", "method=dca", "method.rope_scaling={name:yarn,factor:2}", *tiny_overrides({}, tiny_dir)]
    _, run_dir = run_from_config(compose_cell(overrides, tmp_path))
    recorded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").method.rope_scaling)
    assert recorded == {"name": "yarn", "factor": 2}
    assert aggregate.label_methods(aggregate.load_runs(tmp_path)).tolist() == ["dca+yarn(factor=2)"]


@pytest.mark.slow  # a Jupyter kernel starts and imports the stack: about 30 s on 2 cores
def test_notebook_executes_on_run_folders(tmp_path, tiny_dir, monkeypatch):
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    results = tmp_path / "results"
    longheads = [f"method.{key}={value}" for key, value in TINY_LONGHEADS.items()]
    for method, params in (("full", []), ("window", ["method.recent_window=64"]), ("longheads", longheads)):
        for task in ("passkey", "pg19"):
            cfg = compose_cell(["model=hf", f"task={task}", f"method={method}", "seed=1", *params, *tiny_overrides({}, tiny_dir, task)], results)
            run_from_config(cfg)
    notebook = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    monkeypatch.setenv("LONGCTX_RESULTS", str(results))  # the kernel inherits it: the notebook reads these runs
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = sum("image/png" in output.get("data", {}) for output in outputs)
    assert images >= 3, images  # passkey curves, PG19 curves, a chunk-selection heatmap
    text = "".join(str(output.get("data", {}).get("text/plain", "")) + output.get("text", "") for output in outputs)
    assert "longheads" in text and "cpu" in text and "float32" in text  # tables name the machine of each row


def test_wandb_run_is_grouped_flat_and_marked_failed(tmp_path, wandb_sandbox):
    config = {"model": {"name": "tiny"}, "method": {"name": "full"}, "task": {"name": "passkey", "lengths": [256]}}
    environment = {"device": "cpu", "dtype": "float32", "gpu": None}
    recorder = RunRecorder(tmp_path / "run", config, environment, wandb_mode="offline", wandb_dir=tmp_path,
                           wandb_group="sweep-1")
    run = recorder.wandb_run
    assert run.group == "sweep-1"
    assert run.config["method.name"] == "full" and run.config["task.lengths"] == [256] and run.config["device"] == "cpu"
    recorder.fail(KeyboardInterrupt())
    assert run._exit_code == 1  # the dashboard shows the run as failed, not finished
    assert read_provenance(tmp_path / "run")["status"] == "failed"


@pytest.mark.parametrize("launcher, plugin, settings", [
    ("slurm_gpu", "hydra_plugins.hydra_submitit_launcher", {"gpus_per_node": 1, "timeout_min": 120}),
    ("local_parallel", "hydra_plugins.hydra_joblib_launcher", {"n_jobs": 2}),
])
def test_launcher_configs_compose_on_their_plugins(launcher, plugin, settings):
    pytest.importorskip(plugin)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith(plugin)
    assert {key: cfg.hydra.launcher[key] for key in settings} == settings


def test_per_dataset_cells_count_that_datasets_answers(tmp_path):
    run_dir = tmp_path / "2026-01-01"
    run_dir.mkdir()
    config = {"model": {"name": "m", "dtype": "auto", "device": "auto"}, "method": {"name": "full"},
              "task": {"name": "longbench", "lengths": [8192]}, "seed": 0}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.json").write_text(json.dumps({"qa@8192": 50.0, "count@8192": 0.0, "average@8192": 25.0}))
    answers = [("qa", 1.0), ("qa", 0.0), ("count", 0.0)]
    (run_dir / "predictions.jsonl").write_text("".join(
        json.dumps({"length": 8192, "dataset": dataset, "score": score}) + "\n" for dataset, score in answers))
    runs = aggregate.load_runs(tmp_path)
    assert aggregate.table(runs, "longbench", "qa").loc["full", 8192] == "50 (2)"
    assert aggregate.table(runs, "longbench", "count").loc["full", 8192] == "0 (1)"
    assert aggregate.table(runs, "longbench", "average").loc["full", 8192] == "25 (3)"


def test_average_is_over_the_newest_score_of_each_dataset_across_runs(tmp_path):
    """A later run that scored one RULER task must not stand, with its own one-task average, for the earlier run's."""
    config = {"model": {"name": "m", "dtype": "auto", "device": "auto"}, "method": {"name": "full"},
              "task": {"name": "ruler", "lengths": [4096]}, "seed": 0}
    runs_scored = {"2026-01-01": [("niah_single_1", 100.0), ("niah_single_1", 100.0), ("vt", 0.0)],
                   "2026-01-02": [("niah_single_1", 50.0), ("niah_single_1", 50.0)]}
    for stamp, answers in runs_scored.items():
        run_dir = tmp_path / stamp
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        per_task = {task: [score for name, score in answers if name == task] for task, _ in answers}
        means = {f"{task}@4096": sum(scores) / len(scores) for task, scores in per_task.items()}
        average = sum(means.values()) / len(means)
        (run_dir / "metrics.json").write_text(json.dumps({**means, "average@4096": average}))
        (run_dir / "predictions.jsonl").write_text("".join(
            json.dumps({"length": 4096, "dataset": task, "score": score}) + "\n" for task, score in answers))
    runs = aggregate.load_runs(tmp_path)
    # niah_single_1 from the newer run (50, 2 samples), vt from the older (0, 1 sample): the newer run alone says 50
    assert aggregate.table(runs, "ruler", "average").loc["full", 4096] == "25 (3)"
    assert aggregate.table(runs, "ruler", "niah_single_1").loc["full", 4096] == "50 (2)"
    assert aggregate.effective_lengths(runs, threshold=30.0).loc[("full", "m", "unknown", "auto")] == 0  # 25 < 30


@pytest.mark.parametrize("label", ["model.name=../../escape", "method.name=a/b", "task.name=..hidden"])
def test_a_label_that_is_a_path_is_refused_before_any_folder_exists(label, tmp_path):
    """A label names the run folder: model.name=../../escape would write outside results/. One line, exit 2, no folder."""
    done = run_cli(label, "logger=none", cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip()
    assert error.startswith("error: ") and "\n" not in error and "not a simple name" in error
    assert not any(tmp_path.parent.glob("escape")) and not any(tmp_path.iterdir())
