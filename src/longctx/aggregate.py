"""results/ -> one DataFrame -> tables (and PG19's loss-by-position figure). A run folder holds config.yaml,
provenance.json (machine, versions, status) and, once finished, metrics.json.

    python -m longctx.aggregate results/h100 --task passkey --metric accuracy
    python -m longctx.aggregate results/h100 results/cpu --task pg19 --metric ppl --plot pg19_loss_by_position.png
    python -m longctx.aggregate results/cpu --task ruler --metric average --threshold 85.6   # + effective length
    python -m longctx.aggregate results/cpu --task ruler --by-dataset                       # task x length per method
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from longctx.registry import METHODS, default_config
from longctx.tasks.base import split_metric_key
from longctx.tracking import PROVENANCE_FILE, read_provenance

# How a parameter reads in a table label, where the papers have a letter for it.
LABEL_SHORT = {"atten_length": "A", "chunk_size": "chunk", "query_block": "qblock", "exact_tail": "tail",
               "sink_tokens": "sinks", "recent_window": "recent", "cpu_offload": "offload", "group_size": "G"}
# What a run measured on. Tables keep runs on different machines apart; numbers from a bfloat16 GPU run and a float32
# CPU run of the same configuration are not the same measurement.
MACHINE = ["model", "device", "dtype"]


def _run_folders(roots: tuple[str | Path, ...]) -> list[Path]:
    return sorted({path.parent for root in (roots or ("results",)) for path in Path(root).rglob("config.yaml")
                   if (path.parent / "metrics.json").exists() or (path.parent / PROVENANCE_FILE).exists()})


def load_runs(*roots: str | Path) -> pd.DataFrame:
    """One row per (finished run folder, length) under `roots` (default results/): task, method, its parameters,
    model, device, dtype (resolved, from provenance.json), GPU, seed and every metric. Folders whose run failed or
    never finished are left out; `incomplete_runs` lists them."""
    rows = []
    for run_dir in _run_folders(roots):
        provenance = read_provenance(run_dir) or {}
        if provenance.get("status", "finished") != "finished" or not (run_dir / "metrics.json").exists():
            continue
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        base = {
            "run": str(run_dir),
            "task": config["task"]["name"],
            "method": config["method"]["name"],
            "model": config["model"]["name"],
            "device": provenance.get("device", "unknown"),
            "dtype": provenance.get("dtype", config["model"]["dtype"]),
            "gpu": provenance.get("gpu"),
            "provenance": provenance.get("source", "measured" if provenance else "none"),
            "seed": config.get("seed"),
            **{f"method.{k}": _composed(v) if isinstance(v, dict) else v
               for k, v in _with_defaults(config["method"]).items() if k != "name" and not isinstance(v, list)},
        }
        per_length: dict[int, dict[str, float]] = {}
        for key, value in metrics.items():
            metric, length = split_metric_key(key)
            if length is not None:
                per_length.setdefault(length, {})[metric] = value
        samples, per_dataset = _sample_counts(run_dir)
        for length, values in per_length.items():
            dataset_counts = {f"n.{dataset}": count for (at, dataset), count in per_dataset.items() if at == length}
            rows.append({**base, "length": length, "n": samples.get(length, values.get("segments")), **dataset_counts, **values})
    return pd.DataFrame(rows)


def incomplete_runs(*roots: str | Path) -> pd.DataFrame:
    """Run folders under `roots` that failed or never finished (killed, interrupted): run, status, error."""
    rows = []
    for run_dir in _run_folders(roots):
        provenance = read_provenance(run_dir) or {"status": "finished" if (run_dir / "metrics.json").exists() else "incomplete"}
        if provenance.get("status") != "finished" or not (run_dir / "metrics.json").exists():
            status = provenance.get("status")
            rows.append({"run": str(run_dir), "status": "incomplete" if status == "running" else status,
                         "error": provenance.get("error")})
    return pd.DataFrame(rows, columns=["run", "status", "error"])


def predictions(run_dir: str | Path) -> pd.DataFrame:
    """A run folder's predictions.jsonl, one row per sample (empty when the run wrote none)."""
    path = Path(run_dir) / "predictions.jsonl"
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                        if path.exists() else [])


def _sample_counts(run_dir: Path) -> tuple[dict[int, int], dict[tuple[int, str], int]]:
    """Predictions per length, and per (length, dataset) for tasks whose metrics are per dataset (LongBench)."""
    records = predictions(run_dir)
    if records.empty:
        return {}, {}
    per_length = records["length"].astype("int64").value_counts().to_dict()
    per_dataset = records.groupby(["length", "dataset"], sort=False).size().to_dict() if "dataset" in records else {}
    return per_length, per_dataset


def _with_defaults(method: dict) -> dict:
    """A run's method config in today's names, with today's defaults under it: a run recorded before a parameter was
    renamed carries its old name, and one recorded before a parameter existed ran what its default means (the
    behaviour it was added to keep), so both are labelled and grouped with today's runs that set it."""
    if method.get("name") not in METHODS:
        return method
    cls = METHODS[method["name"]]
    method = {cls.renamed.get(key, key): value for key, value in method.items()}
    defaults = {key: value for key, value in default_config(method["name"], cls).items()
                if value != "???" and not isinstance(value, (dict, list))}
    return {**defaults, **method}


def _composed(config: dict) -> str:
    """A method held as a parameter (a RoPE rescaling), as a label: {"name": "yarn", "factor": 2.0} -> 'yarn(factor=2)'."""
    params = ", ".join(f"{key}={_plain(value)}" for key, value in config.items() if key != "name" and value is not None)
    return f"{config.get('name', '?')}({params})" if params else str(config.get("name", "?"))


def label_methods(runs: pd.DataFrame) -> pd.Series:
    """'longheads A=2048' style labels: the method plus whichever of its parameters vary within that method; a RoPE
    rescaling underneath always shows ('dca+yarn(factor=2)'), since it makes another method of it."""
    labels = runs["method"].copy()
    for method, group in runs.groupby("method"):
        known = METHODS[method].label_params if method in METHODS else ()
        varying = [p for p in known if f"method.{p}" in group and group[f"method.{p}"].nunique(dropna=False) > 1]
        for index, row in group.iterrows():
            parts = [f"{LABEL_SHORT.get(p, p)}={_plain(row[f'method.{p}'])}" for p in varying]
            rescaling = row.get("method.rope_scaling")
            labels[index] = " ".join([method + (f"+{rescaling}" if isinstance(rescaling, str) else ""), *parts])
    return labels


def _plain(value) -> str:
    """2048.0 -> '2048' (a column with gaps turns ints into floats)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def latest(runs: pd.DataFrame, task: str, metric: str, seed: int | None = None, merge_machines: bool = False) -> pd.DataFrame:
    """The newest run (by folder name, a timestamp) per (method label, model, device, dtype, length) that has
    `metric`; with `merge_machines` per (label, length) wherever it ran. A task's `average` over per-dataset scores
    (RULER's tasks, LongBench's datasets) is the mean of each dataset's newest score, so runs that scored different
    subsets combine, instead of the newest run's own average standing for all of them."""
    selected = runs[runs.task == task]
    if seed is not None:
        selected = selected[selected.seed == seed]
    # Labels come from all of the task's runs (or the caller's `label` column, from a wider set of runs), so one
    # configuration has one label in every metric's table.
    labels = selected["label"] if "label" in selected else label_methods(selected)
    selected = selected.assign(label=labels, stamp=selected["run"].map(lambda run: Path(run).name))
    ordered = selected.sort_values("stamp")
    keys = ["label", "length"] if merge_machines else ["label", *MACHINE, "length"]
    datasets = scored_datasets(selected, task) if metric == "average" else []
    if datasets:
        return _average_of_newest(ordered, datasets, keys)
    return ordered[ordered[metric].notna()].groupby(keys).last()


def _average_of_newest(ordered: pd.DataFrame, datasets: list[str], keys: list[str]) -> pd.DataFrame:
    newest = {dataset: ordered[ordered[dataset].notna()].groupby(keys).last() for dataset in datasets}
    scores = pd.concat({dataset: frame[dataset] for dataset, frame in newest.items()}, axis=1)
    counts = pd.concat({dataset: frame[f"n.{dataset}"] for dataset, frame in newest.items()}, axis=1)
    rows = ordered[ordered["average"].notna()].groupby(keys).last().reindex(scores.index)
    return rows.assign(average=scores.mean(axis=1), **{"n.average": counts.sum(axis=1)})


def scored_datasets(runs: pd.DataFrame, task: str) -> list[str]:
    """The datasets (RULER's tasks, LongBench's datasets) that `task`'s runs score one by one."""
    counted = [column.removeprefix("n.") for column in runs.columns if column.startswith("n.")]
    return [name for name in counted if name in runs.columns and runs.loc[runs.task == task, name].notna().any()]


def table(runs: pd.DataFrame, task: str, metric: str, seed: int | None = None, merge_machines: bool = False) -> pd.DataFrame:
    """Methods (rows, with model / device / dtype columns) x lengths (columns) of `metric`, the sample count in
    brackets (for a per-dataset metric, that dataset's count); newest run wins a tie. A method measured on two
    machines gets two rows, unless `merge_machines`: then one row whose every cell names the machine that made it."""
    selected = latest(runs, task, metric, seed, merge_machines)

    def cell(row) -> str:
        count = row.get(f"n.{metric}", row["n"])
        text = f"{row[metric]:.3g} ({int(count)})" if pd.notna(count) else f"{row[metric]:.3g}"
        return f"{text} {row['device']} {row['dtype']}" if merge_machines else text

    cells = selected.apply(cell, axis=1).unstack("length").fillna("")
    cells.columns = list(cells.columns)  # plain lengths, not a named index, so `cells.loc[label, 4096]` reads a cell
    return cells if merge_machines else cells.reset_index(MACHINE)


def effective_lengths(runs: pd.DataFrame, task: str = "ruler", metric: str = "average", threshold: float = 85.6,
                      seed: int | None = None, merge_machines: bool = False) -> pd.Series:
    """RULER's effective length per table row: the longest length up to which every `metric` (RULER: the average
    over its tasks) stays above `threshold`; 0 when the shortest length measured is already below it."""
    from longctx.tasks.ruler.task import effective_length

    selected = latest(runs, task, metric, seed, merge_machines)[metric]
    rows = ["label"] if merge_machines else ["label", *MACHINE]
    return selected.groupby(rows).apply(
        lambda scores: effective_length(dict(zip(scores.index.get_level_values("length"), scores)), threshold)
    ).rename("effective length")


def dataset_table(runs: pd.DataFrame, task: str, seed: int | None = None) -> pd.DataFrame:
    """Per-dataset scores (LongBench's datasets, RULER's tasks): rows (method label, model, device, dtype, dataset),
    columns lengths, each cell the newest run that scored that dataset at that length, its sample count in brackets."""
    datasets = scored_datasets(runs, task)
    if not datasets:
        raise SystemExit(f"error: no per-dataset scores for task {task} in these runs")
    frames = [table(runs, task, dataset, seed).reset_index().assign(dataset=dataset) for dataset in datasets]
    merged = pd.concat(frames, ignore_index=True)
    merged = merged.assign(order=merged.dataset.map(datasets.index)).sort_values(["label", "order"], kind="stable")
    return merged.drop(columns="order").set_index(["label", *MACHINE, "dataset"]).fillna("")


def load_curves(runs: pd.DataFrame, seed: int | None = None, merge_machines: bool = False) -> pd.DataFrame:
    """Loss by position of the runs in the PG19 table: columns label, length, bucket_start, mean_nll. When the runs
    span machines (and are not merged) the label names the machine."""
    selected = latest(runs, "pg19", "ppl", seed, merge_machines).reset_index()
    several = not merge_machines and len(selected[["device", "dtype"]].drop_duplicates()) > 1
    frames = []
    for _, row in selected.iterrows():
        curve = pd.read_csv(Path(row["run"]) / "loss_by_position.csv")
        label = f"{row['label']} ({row['device']} {row['dtype']})" if several else row["label"]
        frames.append(curve[curve["length"] == row["length"]].assign(label=label))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Tables from run folders.")
    parser.add_argument("roots", nargs="*", default=["results"], help="folders searched for run folders")
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--merge-machines", action="store_true",
                        help="one row per method even across devices / dtypes; each cell names its machine")
    parser.add_argument("--threshold", type=float, default=None,
                        help="add RULER's effective length against this score (RULER: 85.6, with --metric average)")
    parser.add_argument("--by-dataset", action="store_true",
                        help="one row per method and dataset (RULER's tasks, LongBench's datasets), lengths as columns")
    parser.add_argument("--plot", help="pg19 only: write the loss-by-position figure of the table's runs here")
    parser.add_argument("--pretrained-length", type=int, default=8192, help="marked on the --plot figure")
    args = parser.parse_args()
    runs = load_runs(*args.roots)
    incomplete = incomplete_runs(*args.roots)
    if len(incomplete):
        print(f"{len(incomplete)} run folders failed or did not finish (left out):", file=sys.stderr)
        print(incomplete.to_string(index=False), file=sys.stderr)
    if runs.empty:
        raise SystemExit(f"error: no finished run folders under {' '.join(args.roots)}")
    if args.by_dataset:
        print(dataset_table(runs, args.task, args.seed).reset_index().to_markdown(index=False))
        return
    cells = table(runs, args.task, args.metric, args.seed, args.merge_machines)
    if args.threshold is not None:
        lengths = effective_lengths(runs, args.task, args.metric, args.threshold, args.seed, args.merge_machines)
        cells = cells.join(lengths, on=list(lengths.index.names)) if not args.merge_machines else cells.join(lengths)
    print(cells.to_markdown())
    if args.plot:
        if args.task != "pg19":
            raise SystemExit("error: --plot draws PG19 loss curves; use it with --task pg19")
        from longctx.viz import loss_by_position_by_method

        curves = load_curves(runs, args.seed, args.merge_machines)
        figure = loss_by_position_by_method(curves, args.pretrained_length)
        figure.savefig(args.plot, dpi=120)
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
