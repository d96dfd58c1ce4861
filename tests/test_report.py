"""Reports from run folders: intervals, machines and their load, which runs belong to an experiment, and `--check`.
Every run folder here is a few lines of JSON written by the test (no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from longctx import report
from longctx.aggregate import load_runs

REPO = Path(__file__).resolve().parents[1]


def write_run(root: Path, stamp: str, task: str, method: str, samples: list[dict], metrics: dict, seed: int = 1,
              provenance: dict | None = None, **params) -> Path:
    run_dir = root / task / method / stamp
    run_dir.mkdir(parents=True)
    config = {"model": {"name": "m", "dtype": "auto", "device": "auto"}, "method": {"name": method, **params},
              "task": {"name": task}, "seed": seed}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    (run_dir / "provenance.json").write_text(json.dumps(
        {"status": "finished", "device": "cpu", "dtype": "float32", "cpu_count": 2, **(provenance or {})}))
    return run_dir


def passkey(root: Path, stamp: str, method: str, correct: list[bool], length: int = 4096, seconds: float = 2.0,
            **kwargs) -> Path:
    samples = [{"length": length, "depth": i / len(correct), "correct": hit, "seconds": seconds + i, "output": f" {i}"}
               for i, hit in enumerate(correct)]
    metrics = {f"accuracy@{length}": sum(correct) / len(correct), f"seconds@{length}": seconds}
    return write_run(root, stamp, "passkey", method, samples, metrics, **kwargs)


def ruler(root: Path, stamp: str, method: str, scores: dict[str, list[float]], length: int = 4096, scale: float = 100.0,
          **kwargs) -> Path:
    """A RULER-like run (scores x100 per sample, as RULER records them), or LongBench-like with scale=1."""
    samples = [{"length": length, "dataset": dataset, "score": score * scale, "seconds": 1.0}
               for dataset, values in scores.items() for score in values]
    means = {f"{dataset}@{length}": round(100 * float(np.mean(values)), 2) for dataset, values in scores.items()}
    metrics = {**means, f"average@{length}": float(np.mean(list(means.values())))}
    return write_run(root, stamp, "ruler", method, samples, metrics, seed=0, **kwargs)


def only_cell(runs, task: str, metric: str) -> report.Cell:
    found = report.cells(runs, task, metric)
    assert len(found) == 1
    return found[0]


def test_an_accuracy_gets_its_wilson_interval_and_count(tmp_path):
    passkey(tmp_path, "2026-01-01", "full", [True, True, True, True, False])
    cell = only_cell(load_runs(tmp_path), "passkey", "accuracy")
    wilson = stats.binomtest(4, 5).proportion_ci(0.95, method="wilson")
    assert report.cell_text(cell) == f"4/5 [{wilson.low * 100:.0f}, {wilson.high * 100:.0f}]" == "4/5 [38, 96]"
    summary = report.summarise(cell)
    assert summary["low"] < summary["value"] < summary["high"] and summary["interval"] == "wilson"


def test_a_perfect_score_on_few_samples_is_not_a_certainty(tmp_path):
    passkey(tmp_path, "2026-01-01", "full", [True] * 3)
    summary = report.summarise(only_cell(load_runs(tmp_path), "passkey", "accuracy"))
    assert summary["high"] == pytest.approx(1.0) and summary["low"] < 0.6  # 3/3 fits a rate of one half


def test_scores_are_read_on_either_scale_and_must_reproduce_the_metric(tmp_path):
    ruler(tmp_path / "x100", "2026-01-01", "full", {"niah_single_1": [1, 1, 0]})
    ruler(tmp_path / "fraction", "2026-01-01", "full", {"niah_single_1": [1, 1, 0]}, scale=1.0)
    for root in ("x100", "fraction"):
        cell = only_cell(load_runs(tmp_path / root), "ruler", "niah_single_1")
        assert report.cell_text(cell).startswith("66.7 [20.8, 93.9]")  # Wilson of 2 / 3, x100
    broken = ruler(tmp_path / "broken", "2026-01-01", "full", {"niah_single_1": [1, 1, 0]})
    (broken / "metrics.json").write_text(json.dumps({"niah_single_1@4096": 100.0, "average@4096": 100.0}))
    with pytest.raises(report.ReportError, match="inconsistent"):
        report.cells(load_runs(tmp_path / "broken"), "ruler", "niah_single_1")


def test_a_score_that_is_not_all_zero_or_one_gets_a_t_interval_or_none(tmp_path):
    ruler(tmp_path / "varied", "2026-01-01", "full", {"niah_multivalue": [0.25, 0.5, 0.0]})
    cell = only_cell(load_runs(tmp_path / "varied"), "ruler", "niah_multivalue")
    values = np.array([0.25, 0.5, 0.0])
    low, high = stats.t.interval(0.95, 2, loc=values.mean(), scale=stats.sem(values))
    assert report.cell_text(cell) == f"25.0 [{max(low, 0) * 100:.1f}, {high * 100:.1f}] † (3)"
    ruler(tmp_path / "flat", "2026-01-01", "full", {"niah_multivalue": [0.5, 0.5, 0.5]})
    assert report.cell_text(only_cell(load_runs(tmp_path / "flat"), "ruler", "niah_multivalue")) == "50.0 (3) ‡"


def test_an_average_pools_its_datasets_samples_only_when_their_counts_agree(tmp_path):
    ruler(tmp_path / "equal", "2026-01-01", "full", {"a": [1, 1, 0], "b": [0, 0, 0]})
    cell = only_cell(load_runs(tmp_path / "equal"), "ruler", "average")
    wilson = stats.binomtest(2, 6).proportion_ci(0.95, method="wilson")
    assert report.cell_text(cell) == f"33.3 [{wilson.low * 100:.1f}, {wilson.high * 100:.1f}] (6)"
    # a newer run scores dataset a again on 5 samples: the average combines the newest of each, counts differ
    ruler(tmp_path / "equal", "2026-01-02", "full", {"a": [1, 1, 1, 1, 0]})
    cell = only_cell(load_runs(tmp_path / "equal"), "ruler", "average")
    assert report.cell_text(cell) == "40.0 (8) ‡" and len(cell.runs) == 2


def test_perplexity_shows_its_spread_over_books(tmp_path):
    books = [("emma", 3.0, 100), ("emma", 3.2, 100), ("persuasion", 2.0, 100)]
    samples = [{"length": 1024, "book": book, "nll": nll, "tokens": tokens, "seconds": 1.0} for book, nll, tokens in books]
    write_run(tmp_path, "2026-01-01", "pg19", "full", samples, {"ppl@1024": float(np.exp(8.2 / 3))})
    cell = only_cell(load_runs(tmp_path), "pg19", "ppl")
    books = report.book_perplexities(cell)
    assert books.to_dict() == pytest.approx({"emma": np.exp(3.1), "persuasion": np.exp(2.0)})
    assert report.cell_text(cell) == f"{np.exp(8.2 / 3):.2f} [{np.exp(2.0):.2f}–{np.exp(3.1):.2f}] (3)"


@pytest.mark.parametrize("provenance, expected", [
    ({}, "load not recorded"),
    ({"torch_threads": 2, "load": {"start": {}, "end": {}, "others_cpu_cores": 0.1}}, "idle (others 0.1 cores)"),
    ({"torch_threads": 2, "load": {"start": {}, "end": {}, "others_cpu_cores": 1.3}}, "shared: others busy 1.3 cores"),
    # 16 cores, torch on 4 threads: 3 busy cores of others still leave torch its own
    ({"cpu_count": 16, "torch_threads": 4, "load": {"others_cpu_cores": 3.0}}, "idle (others 3 cores)"),
])
def test_a_timing_names_its_machine_and_load(provenance, expected):
    assert report.load({"cpu_count": 2, **provenance}) == expected


def test_machine_descriptions():
    assert report.machine({"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}) == "NVIDIA H100 80GB HBM3"
    described = report.machine({"device": "cpu", "cpu_count": 2, "cpu_model": "Xeon", "torch_threads": 2})
    assert described == "2-core CPU (Xeon), torch on 2 threads"
    assert report.machine({}) == "not recorded"


def test_a_run_belongs_to_an_experiment_by_its_command_or_else_its_config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # conf/experiment/ is read from the repository root
    task, model, seed, methods = report.experiment_scope("passkey_methods_cpu_32k")
    assert (task, seed) == ("passkey", 1) and "longheads" in methods and "full" not in methods
    ran = passkey(tmp_path, "2026-01-01", "longheads", [True], provenance={"command": "run.py +experiment=passkey_methods_cpu_32k method=longheads"})
    passkey(tmp_path, "2026-01-02", "longheads", [True], provenance={"command": "run.py method=longheads"})
    before_commands = passkey(tmp_path, "2026-01-03", "dca", [True])  # no command recorded: judged by its config
    passkey(tmp_path, "2026-01-04", "full", [True])  # not a method of the experiment
    runs = load_runs(tmp_path).assign(model=model)
    kept = runs[report.belongs_to_experiment(runs, "passkey_methods_cpu_32k")]
    assert sorted(kept["run"]) == sorted([str(ran), str(before_commands)])
    assert report.experiments_run("run.py -m '+experiment=a' x=1") == {"a"} and report.experiments_run("") is None


def test_a_preset_counts_as_its_method(monkeypatch):
    monkeypatch.chdir(REPO)
    assert "infllm" in report.experiment_scope("infllm_vs_longheads")[3]  # swept as infllm_2048


TEMPLATE = """---
title: Demo
roots: [results]
where: {seed: 1}
exclude:
  results/passkey/full/2026-01-03: a canary check
---
Intro prose.

```report
table: metric
metric: accuracy
```

Finding: full attention found 4 of 5.

```report
figure: by_length
metric: accuracy
pretrained_length: 4096
```

```report
table: seconds
metric: accuracy
```

```report
table: speed
bench: [results/bench]
```

```report
figure: prefill
bench: [results/bench]
```
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A repository root with one template, three passkey runs (one excluded) and a speed benchmark."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "report").mkdir()
    (tmp_path / "conf" / "report" / "demo.md").write_text(TEMPLATE)
    results = tmp_path / "results"
    passkey(results, "2026-01-01", "full", [True, True, True, True, False],
            provenance={"command": "run.py method=full", "torch_threads": 2, "load": {"others_cpu_cores": 1.5}})
    passkey(results, "2026-01-02", "full", [False], length=8192)
    passkey(results, "2026-01-03", "full", [False] * 5)  # newer, but excluded
    (results / "bench").mkdir()
    lengths = np.array([1024, 2048, 4096])
    rows = [{"method": method, "length": length, "prefill_s": 0.001 * (length / 1024) ** power, "decode_tok_s": 10.0,
             "peak_device_gib": None, "peak_host_gib": 1.0, "repeats": 3, "machine": "CPU x2 threads",
             "dtype": "float32", "torch": "2.13.0", "prefill_vs_full": None, "prefill_x_per_doubling": 2.0 ** power}
            for method, power in (("full", 2), ("longheads:torch", 1)) for length in lengths]
    import pandas as pd

    pd.DataFrame(rows).to_csv(results / "bench" / "speed.csv", index=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_report_holds_its_command_tables_figures_and_run_folders(project):
    report.main(["demo"])
    text = (project / "results" / "reports" / "demo.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "# Demo" and "`python -m longctx.report demo`" in lines[2]  # the command that regenerates it
    assert "| full | 4/5 [38, 96] | 0/1 [0, 79] |" in text  # the excluded newer run does not stand for 4k
    assert "Intro prose." in text and "Finding: full attention found 4 of 5." in text
    assert "shared: others busy 1.5 cores" in text and "load not recorded" in text  # per cell, from provenance
    assert "`results/passkey/full/2026-01-03`: a canary check" in text
    assert "[results/passkey/full/2026-01-01](../passkey/full/2026-01-01)" in text  # links from the report's folder
    figures = project / "results" / "reports" / "demo"
    assert {path.name for path in figures.iterdir()} == {"accuracy_by_length.png", "accuracy_by_length.csv",
                                                         "prefill_by_length.png", "prefill_by_length.csv"}
    assert "](demo/accuracy_by_length.png)" in text
    # the log-log slopes: quadratic full attention, linear LongHeads
    assert "| full | 1k, 2k, 4k | 2.00 | 4.00 |" in text and "| longheads:torch | 1k, 2k, 4k | 1.00 | 2.00 |" in text


def test_check_passes_on_a_fresh_report_and_names_what_changed(project, capsys):
    report.main(["--all"])
    assert (project / "results" / "reports" / "README.md").read_text().count("python -m longctx.report demo") == 1
    report.main(["--check"])
    assert "identical" in capsys.readouterr().out
    # a run folder changes under a committed report: --check fails and shows the line
    run_dir = project / "results" / "passkey" / "full" / "2026-01-01"
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    lines[-1] = lines[-1].replace('"correct": false', '"correct": true')
    (run_dir / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps({"accuracy@4096": 1.0, "seconds@4096": 2.0}))
    with pytest.raises(SystemExit, match="differences"):
        report.main(["--check"])
    err = capsys.readouterr().err
    assert "+| full | 5/5 [57, 100] |" in err and "accuracy_by_length.csv" in err


def test_check_fails_on_a_template_without_its_report(project):
    with pytest.raises(SystemExit, match="differences"):
        report.main(["--check"])


def test_bad_templates_fail_with_one_line_naming_the_fix(project):
    (project / "conf" / "report" / "bad.md").write_text("---\ntitle: x\nroot: [results]\n---\n")
    with pytest.raises(SystemExit, match="unknown front-matter keys \\['root'\\]"):
        report.main(["bad"])
    (project / "conf" / "report" / "bad.md").write_text("---\ntitle: x\n---\n```report\ntable: nonsense\n```\n")
    with pytest.raises(SystemExit, match="unknown block 'nonsense'"):
        report.main(["bad"])
    with pytest.raises(SystemExit, match="no report template"):
        report.main(["missing"])


BLOCKS = """---
title: Blocks
exclude: {results/passkey/full/2026-01-03: a canary check}
---
```report
table: samples
metric: accuracy
where: {length: 4096}
drop: [{method: window}]
columns: [depth, {doubled: depth * 2}]
by_method: correct
```

```report
table: seconds
metric: accuracy
where: {method.recent_window: [64, null]}
every_run: true
```

```report
table: excerpt
file: results/notes.txt
lines: 2-3
```
"""


def test_blocks_pivot_drop_narrow_every_run_and_quote(project):
    results = project / "results"
    passkey(results, "2026-02-01", "window", [True, False], window_size=64)  # recorded under the parameter's old name
    passkey(results, "2026-02-02", "window", [False, False], recent_window=128)
    (results / "notes.txt").write_text("one\ntwo\nthree\nfour\n")
    (project / "conf" / "report" / "blocks.md").write_text(BLOCKS)
    report.main(["blocks"])
    text = (results / "reports" / "blocks.md").read_text()
    # one row per sample, one column per method (the window dropped), from the run the report keeps
    assert "| length | depth | doubled | full |\n|---|---|---|---|\n| 4k | 0 | 0 | True |" in text
    assert "| 4k | 0.800 | 1.60 | False |" in text and "window" not in text.split("| method |")[0]
    # every run of each configuration, the 64-token window (null keeps methods without the parameter), not 128
    seconds = text.split("| method |")[1].split("## Run folders")[0]
    assert "| full | 4k | 2026-01-01 |" in seconds and "| full | 8k | 2026-01-02 |" in seconds
    assert "2026-01-03" not in seconds and "window recent=64" in seconds and "recent=128" not in seconds
    assert "```\ntwo\nthree\n```" in text and "Files quoted: [results/notes.txt](../notes.txt)" in text
