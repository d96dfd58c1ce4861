"""results/ -> one DataFrame -> tables (and PG19's loss-by-position figure). Every run folder holds config.yaml and
metrics.json; nothing else is needed.

    python -m longctx.aggregate results/h100 --task passkey --metric accuracy
    python -m longctx.aggregate results/h100 results/cpu --task pg19 --metric ppl --plot pg19_loss_by_position.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

# Method parameters that tell two runs of one method apart in a table label, when they differ across runs.
LABEL_PARAMS = ("atten_length", "window_size", "block_size", "exact_tail", "factor", "sink_tokens", "cpu_offload")


def load_runs(*roots: str | Path) -> pd.DataFrame:
    """One row per (run folder, length) under `roots` (default results/): task, method, its parameters, model dtype,
    seed and every metric."""
    rows = []
    metrics_files = sorted({path for root in (roots or ("results",)) for path in Path(root).rglob("metrics.json")})
    for metrics_file in metrics_files:
        run_dir = metrics_file.parent
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        metrics = json.loads(metrics_file.read_text())
        base = {
            "run": str(run_dir),
            "task": config["task"]["name"],
            "method": config["method"]["name"],
            "model": config["model"]["name"],
            "dtype": config["model"]["dtype"],
            "seed": config.get("seed"),
            **{f"method.{k}": v for k, v in config["method"].items() if k != "name" and not isinstance(v, (dict, list))},
        }
        per_length: dict[int, dict[str, float]] = {}
        for key, value in metrics.items():
            if "@" in key:
                metric, length = key.split("@", 1)
                per_length.setdefault(int(length), {})[metric] = value
        samples = _samples_per_length(run_dir / "predictions.jsonl")
        for length, values in per_length.items():
            rows.append({**base, "length": length, "n": samples.get(length, values.get("segments")), **values})
    return pd.DataFrame(rows)


def _samples_per_length(predictions: Path) -> dict[int, int]:
    if not predictions.exists():
        return {}
    lengths = [json.loads(line)["length"] for line in predictions.read_text().splitlines() if line.strip()]
    return pd.Series(lengths, dtype="int64").value_counts().to_dict()


def label_methods(runs: pd.DataFrame) -> pd.Series:
    """'longheads A=2048' style labels: the method plus whichever of its parameters vary within that method."""
    labels = runs["method"].copy()
    short = {"atten_length": "A", "window_size": "w", "block_size": "block", "exact_tail": "tail", "sink_tokens": "sinks", "cpu_offload": "offload"}
    for method, group in runs.groupby("method"):
        varying = [p for p in LABEL_PARAMS if f"method.{p}" in group and group[f"method.{p}"].nunique(dropna=False) > 1]
        if group["dtype"].nunique() > 1:
            varying.append("dtype")
        for index, row in group.iterrows():
            parts = [f"{short.get(p, p)}={_plain(row[p if p == 'dtype' else f'method.{p}'])}" for p in varying]
            labels[index] = " ".join([method, *parts])
    return labels


def _plain(value) -> str:
    """2048.0 -> '2048' (a column with gaps turns ints into floats)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def latest(runs: pd.DataFrame, task: str, metric: str, seed: int | None = None) -> pd.DataFrame:
    """The newest run (by folder name, a timestamp) per (method label, length) that has `metric`."""
    selected = runs[(runs.task == task) & runs[metric].notna()]
    if seed is not None:
        selected = selected[selected.seed == seed]
    selected = selected.assign(label=label_methods(selected), stamp=selected["run"].map(lambda run: Path(run).name))
    return selected.sort_values("stamp").groupby(["label", "length"]).last()


def table(runs: pd.DataFrame, task: str, metric: str, seed: int | None = None) -> pd.DataFrame:
    """Methods (rows) x lengths (columns) of `metric`, with the sample count in brackets; newest run wins a tie."""
    selected = latest(runs, task, metric, seed)
    cells = selected.apply(lambda row: f"{row[metric]:.3g} ({int(row['n'])})" if pd.notna(row["n"]) else f"{row[metric]:.3g}", axis=1)
    return cells.unstack("length").fillna("")


def load_curves(runs: pd.DataFrame, seed: int | None = None) -> pd.DataFrame:
    """Loss by position of the runs in the PG19 table: columns label, length, bucket_start, mean_nll."""
    frames = []
    for (label, length), row in latest(runs, "pg19", "ppl", seed).iterrows():
        curve = pd.read_csv(Path(row["run"]) / "loss_by_position.csv")
        frames.append(curve[curve["length"] == length].assign(label=label))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Tables from run folders.")
    parser.add_argument("roots", nargs="*", default=["results"], help="folders searched for run folders")
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--plot", help="pg19 only: write the loss-by-position figure of the table's runs here")
    parser.add_argument("--pretrained-length", type=int, default=8192, help="marked on the --plot figure")
    args = parser.parse_args()
    runs = load_runs(*args.roots)
    if runs.empty:
        raise SystemExit(f"error: no run folders (with metrics.json) under {' '.join(args.roots)}")
    print(table(runs, args.task, args.metric, args.seed).to_markdown())
    if args.plot:
        if args.task != "pg19":
            raise SystemExit("error: --plot draws PG19 loss curves; use it with --task pg19")
        from longctx.viz import loss_by_position_by_method

        figure = loss_by_position_by_method(load_curves(runs, args.seed), args.pretrained_length)
        figure.savefig(args.plot, dpi=120)
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
