"""RULER: our samples equal those of RULER's own prepare.py, our scores equal those of RULER's own evaluate.py, the
task end to end on a tiny random Llama (run folder, tables, depth figures), templates, caching and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from conftest import tiny_llama

from longctx.models import embedded_model_dir
from longctx.registry import build_method, build_task
from longctx.runner import evaluate
from longctx.tasks.base import TaskError
from longctx.tasks.ruler import Ruler, generate as ruler_generate
from longctx.tasks.ruler.generate import chat_frame, generate, generator_environment, prompt_template, resolve_template
from longctx.tasks.ruler.protocol import package_dir, postprocess, ruler_tasks, score, task_for, task_score
from longctx.tasks.ruler.task import effective_length, needle_spans
from longctx.tracking import read_provenance

ALL_13 = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
          "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (it has a chat template); only the tokenizer is loaded."""
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module", autouse=True)
def ruler_cache(tmp_path_factory):
    """Generated samples go to one cache for this module (not ~/.cache), shared by its tests."""
    root = tmp_path_factory.mktemp("ruler_cache")
    patch = pytest.MonkeyPatch()
    patch.setattr(ruler_generate, "DEFAULT_CACHE_DIR", root)
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    return tiny_llama(1024, tokenizer=tokenizer, vocab_size=len(tokenizer),
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def ruler_environment() -> dict[str, str]:
    """RULER's scripts call `python`: this interpreter's, with nltk's punkt data where generate.py puts it."""
    environment = generator_environment()
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    return environment


# --- protocol ----------------------------------------------------------------------------------------------------


def test_the_thirteen_tasks_come_from_rulers_package():
    tasks = ruler_tasks()
    assert list(tasks) == ALL_13
    assert {name: task.tokens_to_generate for name, task in tasks.items()} == {
        **{name: 128 for name in ALL_13[:8]}, "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
    assert {task.metric_name for name, task in tasks.items() if not name.startswith("qa")} == {"string_match_all"}
    assert {tasks["qa_1"].metric_name, tasks["qa_2"].metric_name} == {"string_match_part"}
    assert tasks["niah_multikey_3"].args == {"type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids",
                                             "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1}


def test_metrics_by_hand():
    niah, qa = task_for("niah_multivalue"), task_for("qa_1")
    assert score(niah, " 123, 456 and 789.", ["123", "456", "789", "000"]) == 75.0
    assert score(qa, "It was Paris", ["London", "paris"]) == 100.0
    assert score(qa, "", ["Paris"]) == 0.0
    assert postprocess("  a\x00b\tc \n") == "a\nb\nc"
    assert task_score(niah, ["123 456", "nothing"], [["123", "456"], ["1"]]) == 50.0


def test_scores_equal_rulers_evaluate_script(tmp_path):
    """RULER's eval/evaluate.py, run on our predictions, gives our per-task and per-sample scores."""
    predictions = {
        "niah_multikey_1": [(" 1234567.", ["1234567"]), ("nothing", ["7654321"]), (None, ["1"])],
        "niah_multivalue": [("\x00 1, 22\t333", ["1", "22", "333", "4444"]), ("22", ["1", "22", "333"])],
        "vt": [("VAR ABCDE, vAr FGHIJ", ["ABCDE", "FGHIJ", "KLMNO"])],
        "qa_2": [("The Eiffel Tower.", ["eiffel tower", "Louvre"]), ("no idea", ["Paris"]), ("  ", ["x"])],
    }
    folder = tmp_path / "predictions"
    folder.mkdir()
    for name, rows in predictions.items():
        (folder / f"{name}.jsonl").write_text("".join(
            json.dumps({"index": i, "input": "prompt", "pred": pred, "outputs": refs, "others": {}}) + "\n"
            for i, (pred, refs) in enumerate(rows)))
    environment = ruler_environment()
    nltk_data = tmp_path / "nltk_data"
    (nltk_data / "tokenizers" / "punkt").mkdir(parents=True)  # evaluate.py only checks punkt is there (else downloads)
    environment["NLTK_DATA"] = f"{nltk_data}{os.pathsep}{environment['NLTK_DATA']}"
    script = package_dir() / "eval" / "evaluate.py"
    done = subprocess.run([sys.executable, str(script), "--data_dir", str(folder), "--benchmark", "synthetic"],
                          env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = pd.read_csv(folder / "summary.csv")  # rows Tasks / Score / Nulls, one column per task
    theirs = dict(zip(summary.iloc[0, 1:], summary.iloc[1, 1:].astype(float)))
    theirs_per_sample = json.loads((folder / "per_sample_scores.json").read_text())
    for name, rows in predictions.items():
        task = task_for(name)
        ours = task_score(task, [pred for pred, _ in rows], [refs for _, refs in rows])
        assert theirs[name] == ours
        assert theirs_per_sample[name] == [score(task, pred, refs) for pred, refs in rows]


def test_effective_length_is_the_longest_length_up_to_which_every_average_passes():
    assert effective_length({4096: 90.0, 8192: 86.0, 16384: 70.0, 32768: 90.0}) == 8192
    assert effective_length({4096: 85.6, 8192: 90.0}) == 0  # RULER's "above": equal does not pass
    assert effective_length({4096: 60.0, 8192: 50.0}, threshold=50.0) == 4096
    assert effective_length({4096: 99.0}) == 4096


def test_needle_spans_find_each_answers_needle_sentence():
    text = ("Some text. One of the special magic numbers for able-fox is: 123. More. "
            "One of the special magic numbers for big-cat is: 4567. End")
    spans = needle_spans(text, ["4567", "123", "999"])
    assert text[spans[0][0]:spans[0][1]] == "One of the special magic numbers for big-cat is: 4567."
    assert text[spans[1][0]:spans[1][1]] == "One of the special magic numbers for able-fox is: 123."
    assert spans[2] is None


# --- data: RULER's own scripts -----------------------------------------------------------------------------------


def rulers_prepare(tokenizer, tmp_path: Path, task: str, length: int, num_samples: int) -> list[dict]:
    """RULER's data/prepare.py, as RULER's run.sh calls it (base template, seed 42), on the saved tokenizer."""
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    script = package_dir() / "data" / "prepare.py"
    done = subprocess.run(
        [sys.executable, str(script), "--save_dir", str(tmp_path / "ruler"), "--benchmark", "synthetic", "--task", task,
         "--tokenizer_path", str(tokenizer_dir), "--tokenizer_type", "hf", "--max_seq_length", str(length),
         "--model_template_type", "base", "--num_samples", str(num_samples)],
        env=ruler_environment(), capture_output=True, text=True, timeout=900,
    )
    output = tmp_path / "ruler" / task / "validation.jsonl"
    assert output.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.mark.parametrize("task, length", [("niah_single_1", 1024)])
def test_samples_equal_rulers_prepare_script(tokenizer, tmp_path, task, length):
    theirs = rulers_prepare(tokenizer, tmp_path, task, length, num_samples=2)
    ours = generate(task_for(task), tokenizer, length, 2, seed=42, template="base")
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("task, length", [
    ("niah_single_2", 2048), ("niah_single_3", 2048), ("niah_multikey_2", 2048), ("niah_multikey_3", 2048),
    ("niah_multiquery", 2048), ("vt", 2048), ("cwe", 4096), ("fwe", 2048), ("qa_1", 4096), ("qa_2", 4096),
])
def test_samples_equal_rulers_prepare_script_on_every_generator(tokenizer, tmp_path, task, length):
    theirs = rulers_prepare(tokenizer, tmp_path, task, length, num_samples=2)
    assert generate(task_for(task), tokenizer, length, 2, seed=42, template="base") == theirs


def test_chat_samples_sit_in_the_chat_template_within_the_length(tokenizer, monkeypatch):
    task = task_for("niah_single_1")
    samples = generate(task, tokenizer, 1024, 2, seed=0, template="chat")
    head, tail = chat_frame(tokenizer)
    assert head.startswith("<|im_start|>system") and tail == "<|im_end|>\n<|im_start|>assistant\n"
    for sample in samples:
        # RULER's singular rewrite ("are" -> "is") reaches the whole template string, SmolLM2's system prompt included
        assert sample["input"].startswith(head.replace("are", "is"))
        assert tail + " The special magic number for" in sample["input"]
        assert sample["input"].endswith("mentioned in the provided text is")
        assert sample["outputs"][0] in sample["input"]
        prompt_tokens = len(tokenizer(sample["input"], add_special_tokens=False).input_ids)
        assert prompt_tokens + task.tokens_to_generate <= 1024
    # served from the cache from now on, also for fewer samples: RULER's script does not run again
    monkeypatch.setattr(ruler_generate.subprocess, "run", lambda *a, **k: pytest.fail("generator ran again"))
    assert generate(task, tokenizer, 1024, 1, seed=0, template="chat") == samples[:1]
    assert generate(task, tokenizer, 1024, 2, seed=0, template="chat") == samples


def test_prompt_template_is_prepares_for_base_and_wraps_the_chat_template(tokenizer):
    task = task_for("vt")
    assert prompt_template(task, tokenizer, "base") == task.template + task.answer_prefix
    head, tail = chat_frame(tokenizer)
    assert prompt_template(task, tokenizer, "chat") == head + task.template + tail + task.answer_prefix


def test_templates_resolve_per_tokenizer(tokenizer):
    class Plain:
        chat_template = None

    assert resolve_template(tokenizer, "auto") == "chat"
    assert resolve_template(Plain(), "auto") == "base"
    assert resolve_template(tokenizer, "base") == "base"
    with pytest.raises(TaskError, match="has no chat template; use task.template=base"):
        resolve_template(Plain(), "chat")


@pytest.mark.slow
def test_a_smaller_set_is_the_head_of_a_larger_one(tokenizer, tmp_path, monkeypatch):
    """The cache serves n samples from a larger set: RULER's generators draw samples one after another."""
    two = generate(task_for("niah_multikey_2"), tokenizer, 1024, 2, seed=3, template="base")
    monkeypatch.setattr(ruler_generate, "DEFAULT_CACHE_DIR", tmp_path)
    assert generate(task_for("niah_multikey_2"), tokenizer, 1024, 1, seed=3, template="base") == two[:1]


# --- the task ----------------------------------------------------------------------------------------------------


def test_bad_input_fails_in_one_line_before_any_model():
    with pytest.raises(TaskError, match="unknown RULER task 'niah_single_4'; the 13 tasks: niah_single_1, "):
        build_task("ruler", tasks=["niah_single_4"])
    with pytest.raises(TaskError, match="task.template must be one of auto, chat, base, got 'llama'"):
        build_task("ruler", template="llama")
    with pytest.raises(TaskError, match="task.lengths must be a non-empty list"):
        build_task("ruler", lengths=[])
    with pytest.raises(TaskError, match="task.num_samples must be >= 1"):
        build_task("ruler", num_samples=0)


def test_a_length_with_no_room_for_a_haystack_fails_before_running(tiny_lm):
    task = Ruler(tasks=["niah_single_1"], lengths=[150])
    with pytest.raises(TaskError, match="length 150 leaves no room for a haystack"):
        task.check(tiny_lm)


def test_ruler_runs_end_to_end_with_depth_tables_and_figures(tiny_lm, tmp_path, wandb_sandbox):
    task = Ruler(tasks=["niah_single_1", "niah_multivalue", "vt"], lengths=[1024], num_samples=2)
    run_dir = tmp_path / "run"
    method = build_method("longheads", chunk_size=16, atten_length=256, query_block=16)
    result = evaluate(tiny_lm, method, task, out_dir=run_dir, wandb_mode="offline", wandb_dir=tmp_path)
    assert read_provenance(run_dir)["status"] == "finished"
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in records] == ["niah_single_1"] * 2 + ["niah_multivalue"] * 2 + ["vt"] * 2
    for record in records:
        assert record["template"] == "chat" and record["prompt_tokens"] <= 1024
        assert record["score"] == score(task_for(record["dataset"]), record["output"], record["answers"])
        if record["dataset"] == "vt":
            assert record["depth"] is None and record["needle_depths"] is None
        else:
            assert len(record["needle_depths"]) == len(record["answers"]) == len(record["needles_found"])
            assert 0 <= record["depth"] < 1 and record["needle_token"] < record["needle_end"] <= record["prompt_tokens"]
    frame = pd.DataFrame(records)
    for name, group in frame.groupby("dataset"):
        assert result[f"{name}@1024"] == task_score(task_for(name), list(group.output), list(group.answers))
    assert result["average@1024"] == round((result["niah_single_1@1024"] + result["niah_multivalue@1024"] + result["vt@1024"]) / 3, 2)
    assert result["effective_length"] == (1024 if result["average@1024"] > 85.6 else 0)
    assert result["seconds@1024"] == frame.seconds.median()
    scores = pd.read_csv(run_dir / "scores.csv")
    assert list(scores.dataset) == ["niah_single_1", "niah_multivalue", "vt", "average"]
    assert list(scores.samples) == [2, 2, 2, 6]
    assert list(pd.read_csv(run_dir / "seconds_per_sample.csv").columns) == ["dataset", "seconds@1024"]
    by_depth = pd.read_csv(run_dir / "score_by_depth.csv")
    assert list(by_depth.columns) == ["depth_bin", "dataset", "length", "score"]
    assert set(by_depth.dataset) == {"niah_single_1", "niah_multivalue"}
    for name in ("score_by_depth_niah", "score_by_depth_niah_single_1", "score_by_depth_niah_multivalue"):
        assert (run_dir / f"{name}.png").is_file()


def test_cli_reports_an_unknown_task_in_one_line_before_loading_a_model(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "run.py", "task=ruler", "task.tasks=[niah]", "logger=none", f"output_dir={tmp_path / 'run'}"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: unknown RULER task 'niah'; the 13 tasks: niah_single_1")


@pytest.mark.slow
def test_the_embedded_model_finds_a_single_needle_at_1k(smollm2, tmp_path):
    """A chat-template mistake would zero every score silently: the real model must find an easy needle."""
    task = Ruler(tasks=["niah_single_1"], lengths=[1024], num_samples=1)
    metrics = evaluate(smollm2, build_method("full"), task, out_dir=tmp_path / "run", wandb_mode="disabled")
    record = json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])
    assert metrics["niah_single_1@1024"] == 100.0, record["output"]


# --- aggregate -----------------------------------------------------------------------------------------------------


def write_ruler_run(root: Path, stamp: str, method: str, scores: dict[int, dict[str, float]]) -> None:
    """A finished run folder as the runner writes it: RULER's metrics and one prediction per sample."""
    import yaml

    run_dir = root / stamp
    run_dir.mkdir(parents=True)
    config = {"model": {"name": "m", "dtype": "auto", "device": "auto"}, "method": {"name": method},
              "task": {"name": "ruler", "lengths": sorted(scores)}, "seed": 0}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    metrics, records = {}, []
    for length, per_task in scores.items():
        metrics.update({f"{name}@{length}": value for name, value in per_task.items()})
        metrics[f"average@{length}"] = round(sum(per_task.values()) / len(per_task), 2)
        records += [{"length": length, "dataset": name, "score": value} for name, value in per_task.items()]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (run_dir / "provenance.json").write_text(json.dumps({"status": "finished", "device": "cpu", "dtype": "float32"}))


def test_aggregate_tables_methods_lengths_tasks_and_effective_length(tmp_path):
    from longctx import aggregate

    write_ruler_run(tmp_path, "2026-01-01", "full", {4096: {"niah_single_1": 100.0, "vt": 80.0},
                                                      8192: {"niah_single_1": 100.0, "vt": 60.0}})
    write_ruler_run(tmp_path, "2026-01-02", "longheads", {4096: {"niah_single_1": 100.0, "vt": 90.0}})
    write_ruler_run(tmp_path, "2026-01-03", "longheads", {8192: {"niah_single_1": 100.0, "vt": 75.0}})
    runs = aggregate.load_runs(tmp_path)
    cells = aggregate.table(runs, "ruler", "average")
    assert cells.loc["full", 4096] == "90 (2)" and cells.loc["longheads", 8192] == "87.5 (2)"
    effective = aggregate.effective_lengths(runs, "ruler", "average", threshold=85.6)
    assert effective.xs("full", level="label").iloc[0] == 4096  # 90 at 4k, 80 at 8k
    assert effective.xs("longheads", level="label").iloc[0] == 8192  # 95, then 87.5
    assert aggregate.effective_lengths(runs, threshold=95.0).xs("longheads", level="label").iloc[0] == 0
    by_task = aggregate.dataset_table(runs, "ruler")
    assert list(by_task.index.get_level_values("dataset")) == ["niah_single_1", "vt"] * 2
    assert by_task.xs(("full", "vt"), level=["label", "dataset"])[8192].iloc[0] == "60 (1)"
    assert by_task.xs(("longheads", "vt"), level=["label", "dataset"])[4096].iloc[0] == "90 (1)"
