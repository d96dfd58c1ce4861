"""LongBench: metrics against hand-worked examples and the official implementation's numbers, middle truncation, the
built-in suite's properties, official-format folders (v1 and v2) end to end on a tiny random Llama, and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from conftest import tiny_llama

from longctx.models import LoadedModel, embedded_model_dir
from longctx.registry import build_method, build_task
from longctx.runner import evaluate
from longctx.tracking import read_provenance
from longctx.tasks.base import TaskError
from longctx.tasks.longbench import LongBench, LongBenchV2, data, metrics
from longctx.tasks.longbench.builtin import BUILTIN_DATASETS, SuiteBuilder, hotpotqa, squad
from longctx.tasks.longbench.metrics import score_sample
from longctx.tasks.longbench.protocol import (
    chat_frame, context_offset, dataset_specs, encode_prompt, format_prompt, official_names, spec_for, truncate_middle,
)
from longctx.tasks.longbench.v2 import extract_answer

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = json.loads((Path(__file__).parent / "data" / "longbench_official_scores.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (it has a chat template); only the tokenizer is loaded."""
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def tiny_lm(tokenizer) -> LoadedModel:
    return tiny_llama(
        1024, tokenizer=tokenizer, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


@pytest.fixture
def short_answers(monkeypatch):
    """Cap generation at 6 tokens: a random model never stops by itself, and 512-token summaries cost a minute."""
    from longctx.tasks.longbench import protocol, task, v2

    def capped(lm, ids, max_new_tokens, stop_at_newline=False):
        return protocol.generate(lm, ids, min(max_new_tokens, 6), stop_at_newline)

    monkeypatch.setattr(task, "generate", capped)
    monkeypatch.setattr(v2, "generate", capped)


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


# --- metrics ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", OFFICIAL["cases"], ids=lambda case: f"{case['metric']}:{case['prediction'][:20]!r}")
def test_metric_matches_the_official_implementation(case):
    # numbers computed once with the official LongBench/metrics.py (see the fixture's "source")
    ours = metrics.METRICS[case["metric"]](case["prediction"], case["reference"], all_classes=case["all_classes"])
    assert ours == pytest.approx(case["official"], abs=1e-12)


def test_answer_normalisation_drops_case_punctuation_articles_and_spaces():
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert metrics.normalize_answer("theatre") == "theatre"  # only whole-word articles go
    assert metrics.normalize_zh_answer("北京， 是首都。") == "北京是首都"


def test_qa_f1_by_hand():
    assert metrics.qa_f1("Paris", "paris.") == 1.0
    assert metrics.qa_f1("Paris, France", "Paris") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert metrics.qa_f1("the cat sat", "a cat stood up") == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert metrics.qa_f1("", "Paris") == 0.0 and metrics.qa_f1("London", "Paris") == 0.0
    assert metrics.qa_f1_zh("北京", "北京") == 1.0


def test_other_metrics_by_hand():
    # LCS of "a b c d" and "a b e d" is "a b d": precision = recall = 3/4
    assert metrics.rouge_l("a b c d", "a b e d") == pytest.approx(0.75, abs=1e-6)
    assert metrics.rouge_l("", "a b") == 0.0
    classes = ["Location", "Entity", "Human being"]
    assert metrics.classification("Location", "Location", all_classes=classes) == 1.0
    assert metrics.classification("Entity or Location", "Location", all_classes=classes) == 0.5
    assert metrics.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert metrics.retrieval("Paragraph 3, not Paragraph 12", "Paragraph 12") == 0.5
    assert metrics.count("There are 17.", "17") == 1.0 and metrics.count("none", "17") == 0.0
    assert metrics.code_sim("# a comment\nx = f(1)", "x = f(1)") == 1.0  # comment lines are skipped
    assert metrics.code_sim("abcd", "abce") == 0.75  # indel similarity 1 - 2/8


def test_score_takes_the_best_reference_and_the_first_line_where_the_protocol_says():
    assert score_sample("qa_f1", "in 1889", ["1887", "1889"]) == pytest.approx(2 / 3)
    assert score_sample("qa_f1", "\nParis\nLondon is bigger", ["Paris"], only_first_line=True) == 1.0
    assert score_sample("qa_f1", "\nParis\nLondon is bigger", ["Paris"]) < 1.0
    assert score_sample("rouge", "", ["anything"]) == 0.0


# --- the protocol as data ---------------------------------------------------------------------------------------


def test_protocol_holds_the_official_21_datasets_and_their_rules():
    names = official_names()
    assert len(names) == 21 and "hotpotqa" in names and "repobench-p" in names
    specs = dataset_specs()
    assert specs["hotpotqa"].max_new_tokens == 32 and specs["gov_report"].max_new_tokens == 512
    assert {name for name in names if not specs[name].chat} == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert {name for name in names if specs[name].first_line} == {"trec", "triviaqa", "samsum", "lsht"}
    assert [name for name in names if specs[name].stop_at_newline] == ["samsum"]
    assert all(spec.metric in metrics.METRICS for spec in specs.values())
    assert "{context}" in specs["narrativeqa"].prompt and "asconcisely" in specs["narrativeqa"].prompt  # verbatim
    assert spec_for("hotpotqa_e") is specs["hotpotqa"]
    with pytest.raises(TaskError, match="unknown LongBench dataset 'hotpot'.*known: narrativeqa"):
        spec_for("hotpot")
    with pytest.raises(TaskError, match="unknown"):
        spec_for("squad_count_e")  # LongBench-E exists for official datasets only


# --- truncation and prompts -------------------------------------------------------------------------------------


def test_middle_truncation_keeps_head_and_tail_exactly_within_budget():
    ids = list(range(100))
    assert truncate_middle(ids, 10) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert truncate_middle(ids, 7) == [0, 1, 2, 96, 97, 98, 99]
    assert truncate_middle(ids, 100) == ids and truncate_middle(ids, 500) == ids


def test_encoded_prompt_lands_on_the_budget_with_the_chat_template_counted(tokenizer):
    frame = chat_frame(tokenizer, chat=True)
    assert tokenizer.decode(frame.prefix).startswith("<|im_start|>") and tokenizer.decode(frame.suffix).endswith("assistant\n")
    assert chat_frame(tokenizer, chat=False).size == 0  # SmolLM2's tokenizer adds no special tokens of its own
    prompt = "BEGIN " + "word " * 400 + "END of the prompt"
    for budget in (64, 65, 300):
        encoded = encode_prompt(tokenizer, prompt, frame, budget)
        assert len(encoded.ids) == budget
        assert encoded.removed_tokens == count(tokenizer, prompt) - (budget - frame.size)
        body = tokenizer.decode(encoded.ids[len(frame.prefix) : budget - len(frame.suffix)])
        assert body.startswith("BEGIN word") and body.endswith("END of the prompt")
    short = encode_prompt(tokenizer, "a short prompt", frame, 300)
    assert short.removed_tokens == 0 and len(short.ids) == frame.size + count(tokenizer, "a short prompt")
    with pytest.raises(TaskError, match="leaves no room for the prompt: the chat template alone takes"):
        encode_prompt(tokenizer, prompt, frame, frame.size + 1)


def test_needle_span_follows_the_kept_tokens(tokenizer):
    frame = chat_frame(tokenizer, chat=False)
    prompt = "start " + "x " * 50 + "NEEDLE HERE " + "y " * 300 + "TAIL NEEDLE end"
    for word, budget in (("NEEDLE HERE", 140), ("TAIL NEEDLE", 100), ("NEEDLE HERE", 1000)):
        start = prompt.index(word)
        encoded = encode_prompt(tokenizer, prompt, frame, budget, (start, start + len(word)))
        assert tokenizer.decode(encoded.ids[encoded.needle_token : encoded.needle_end]).strip() == word
    middle = prompt.index("y " * 10) + 200  # inside the cut middle
    assert encode_prompt(tokenizer, prompt, frame, 100, (middle, middle + 2)).needle_token is None


# --- the built-in suite -----------------------------------------------------------------------------------------


def built(tokenizer, dataset, length, num_questions=4, seed=0):
    spec = spec_for(dataset)
    return SuiteBuilder(tokenizer, seed).build(spec, chat_frame(tokenizer, spec.chat), length, num_questions)


def prompt_ids(tokenizer, sample):
    spec = spec_for(sample.record["dataset"])
    offset = context_offset(spec.prompt, sample.record)
    needle = (offset + sample.needle[0], offset + sample.needle[1]) if sample.needle else None
    return encode_prompt(tokenizer, format_prompt(spec.prompt, sample.record), chat_frame(tokenizer, spec.chat), None, needle)


@pytest.mark.parametrize("dataset", BUILTIN_DATASETS)
@pytest.mark.parametrize("length", [1024, 3000])
def test_builtin_prompts_meet_the_target_length(tokenizer, dataset, length):
    for sample in built(tokenizer, dataset, length):
        assert length - 4 <= len(prompt_ids(tokenizer, sample).ids) <= length
        assert sample.record["target_length"] == length and set(data.V1_REQUIRED) <= set(sample.record)


def test_builtin_multidoc_qa_holds_its_gold_paragraphs_once_and_at_depth(tokenizer):
    questions, _ = hotpotqa()
    by_question = {question.question: question for question in questions}
    for sample in built(tokenizer, "hotpotqa_mdqa", 4096):
        record, question = sample.record, by_question[sample.record["input"]]
        assert record["answers"] == list(question.answers)
        context = record["context"]
        for paragraph in question.gold:  # both gold paragraphs (which hold the supporting facts), each once
            assert context.count(f"\n{paragraph.title}\n{paragraph.text}\n") + context.endswith(paragraph.text) == 1
        titles = re.findall(r"Passage \d+:\n(.*)\n", context)
        assert len(titles) == len(set(titles))  # no paragraph twice
        assert not (set(titles) - {p.title for p in question.gold}) & question.excluded_titles  # no own distractor
        assert context[sample.needle[0] : sample.needle[1]].count("Passage") == 2
        # depth: the share of the other paragraphs' tokens that precede the gold ones
        before = count(tokenizer, context[: sample.needle[0]])
        others = count(tokenizer, context) - count(tokenizer, context[sample.needle[0] : sample.needle[1]])
        assert before / others == pytest.approx(record["depth"], abs=0.05)


def test_builtin_retrieval_answer_names_the_paragraph_that_answers(tokenizer):
    questions, _ = squad()
    by_question = {question.question: question for question in questions}
    for sample in built(tokenizer, "squad_retrieval", 2048):
        record, question = sample.record, by_question[sample.record["input"]]
        paragraphs = dict(re.findall(r"Paragraph (\d+): (.*)", record["context"]))
        gold_number = record["answers"][0].removeprefix("Paragraph ")
        assert paragraphs[gold_number] == question.gold[0].text
        assert any(answer in paragraphs[gold_number] for answer in question.answers)  # answer recoverable
        assert list(paragraphs.values()).count(question.gold[0].text) == 1
        assert record["context"][sample.needle[0] : sample.needle[1]] == f"Paragraph {gold_number}: {question.gold[0].text}"


def test_builtin_count_answer_is_the_number_of_distinct_paragraphs(tokenizer):
    answers = set()
    for sample in built(tokenizer, "squad_count", 2048):
        paragraphs = re.findall(r"Paragraph \d+: (.*)", sample.record["context"])
        assert sample.record["answers"] == [str(len(set(paragraphs)))]
        assert len(set(paragraphs)) < len(paragraphs)  # there are repeats to see through
        assert sample.needle is None and sample.record["depth"] is None
        answers.add(sample.record["answers"][0])
    assert len(answers) > 1


def test_builtin_is_deterministic_per_seed_and_keeps_questions_across_lengths(tokenizer):
    first, again = built(tokenizer, "squad_retrieval", 1024), built(tokenizer, "squad_retrieval", 1024)
    assert [s.record for s in first] == [s.record for s in again]
    other_seed = built(tokenizer, "squad_retrieval", 1024, seed=1)
    assert [s.record["input"] for s in other_seed] != [s.record["input"] for s in first]
    longer = built(tokenizer, "squad_retrieval", 2048)
    assert [s.record["input"] for s in longer] == [s.record["input"] for s in first]
    assert [s.record["depth"] for s in first] == [0.125, 0.375, 0.625, 0.875]


# --- end to end on a tiny random Llama --------------------------------------------------------------------------

FILLER = "The committee met on Tuesday to review the annual budget and the plans for the new library. "


def official_record(dataset: str, index: int, **fields) -> dict:
    record = {
        "input": f"Question {index}?", "context": FILLER * 40, "answers": [f"answer {index}"], "length": 700 + 4000 * index,
        "dataset": dataset, "language": "en", "all_classes": None, "_id": f"{dataset}-{index}",
    }
    return {**record, **fields}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("longbench")
    write_jsonl(folder / "hotpotqa.jsonl", [official_record("hotpotqa", i) for i in range(2)])
    classes = ["Location", "Entity", "Human being"]
    write_jsonl(folder / "trec.jsonl", [official_record("trec", i, answers=["Location"], all_classes=classes) for i in range(2)])
    write_jsonl(folder / "passage_count.jsonl", [official_record("passage_count", 0, answers=["7"], input="")])
    write_jsonl(folder / "lcc.jsonl", [official_record("lcc", 0, answers=["return x"])])
    write_jsonl(folder / "samsum.jsonl", [official_record("samsum", 0, answers=["They met about the budget."])])
    write_jsonl(folder / "2wikimqa_e.jsonl", [official_record("2wikimqa_e", i) for i in range(3)])
    return folder


def test_official_folder_runs_end_to_end(tiny_lm, official_folder, tmp_path, short_answers):
    task = build_task("longbench", source="folder", path=str(official_folder), num_questions=None, max_input_length=256)
    run_dir = tmp_path / "run"
    result = evaluate(tiny_lm, build_method("full"), task, out_dir=run_dir, wandb_mode="disabled")

    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in records] == ["2wikimqa_e"] * 3 + ["hotpotqa"] * 2 + ["lcc", "passage_count", "samsum"] + ["trec"] * 2
    assert all(r["length"] == 256 and r["prompt_tokens"] <= 256 and r["truncated_tokens"] > 0 for r in records)
    assert all(0.0 <= r["score"] <= 1.0 for r in records)
    frame = pd.DataFrame(records)
    for dataset, group in frame.groupby("dataset"):
        assert result[f"{dataset}@256"] == pytest.approx(round(100 * group.score.mean(), 2))
        spec = spec_for(dataset)  # every score is the metric re-applied to the saved output
        for record in group.itertuples():
            classes = ["Location", "Entity", "Human being"] if dataset == "trec" else None
            assert record.score == score_sample(spec.metric, record.output, record.answers, classes, spec.first_line)
    names = ["2wikimqa_e", "hotpotqa", "lcc", "passage_count", "samsum", "trec"]
    assert result["average@256"] == pytest.approx(round(sum(result[f"{name}@256"] for name in names) / 6, 2))
    # LongBench-E: 2wikimqa_e's three questions fall in the 0-4k, 4-8k and 8k+ buckets (length 700, 4700, 8700 words)
    assert {key for key in result if "/" in key} == {"2wikimqa_e/0-4k@256", "2wikimqa_e/4-8k@256", "2wikimqa_e/8k+@256"}
    scores = pd.read_csv(run_dir / "scores.csv")
    assert list(scores.dataset) == [*names, "average"]
    assert (run_dir / "scores.md").read_text().startswith("| dataset")
    assert (run_dir / "scores_by_length_bucket.csv").is_file()


def test_builtin_suite_runs_end_to_end_with_depth_figure(tiny_lm, tmp_path, short_answers, wandb_sandbox):
    task = LongBench(source="builtin", lengths=[768], num_questions=2, datasets=["squad_retrieval", "squad_count"])
    run_dir = tmp_path / "run"
    # wandb offline, the CLI's default: its tables take only flat string column names
    result = evaluate(tiny_lm, build_method("longheads", chunk_size=16, atten_length=64, query_block=4), task,
                      out_dir=run_dir, wandb_mode="offline", wandb_dir=tmp_path)
    assert read_provenance(run_dir)["status"] == "finished"
    assert set(result) >= {"squad_retrieval@768", "squad_count@768", "average@768", "seconds@768"}
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["prompt_tokens"] <= 768 and r["truncated_tokens"] == 0 for r in records)
    retrieval = [r for r in records if r["dataset"] == "squad_retrieval"]
    assert all(r["needle_token"] is not None and r["depth"] in (0.25, 0.75) for r in retrieval)
    assert (run_dir / "score_by_depth_squad_retrieval.png").is_file()
    by_depth = pd.read_csv(run_dir / "score_by_depth.csv")
    assert list(by_depth.columns) == ["depth_bin", "dataset", "length", "score"]
    assert set(by_depth.dataset) == {"squad_retrieval"} and set(by_depth.depth_bin) == {0.2, 0.7}


def write_v2(path: Path) -> Path:
    questions = [
        {"_id": str(i), "domain": "Single-Document QA", "sub_domain": "x", "difficulty": difficulty, "length": bucket,
         "question": f"Which is right {i}?", "choice_A": "one", "choice_B": "two", "choice_C": "three", "choice_D": "four",
         "answer": "ABCD"[i], "context": FILLER * 60}
        for i, (difficulty, bucket) in enumerate([("easy", "short"), ("hard", "short"), ("hard", "medium"), ("easy", "long")])
    ]
    path.write_text(json.dumps(questions), encoding="utf-8")
    return path


def test_v2_file_runs_end_to_end(tiny_lm, tmp_path, short_answers):
    task = LongBenchV2(source="folder", path=str(write_v2(tmp_path / "data.json")), max_input_length=300)
    run_dir = tmp_path / "run"
    result = evaluate(tiny_lm, build_method("full"), task, out_dir=run_dir, wandb_mode="disabled")
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["prompt_tokens"] <= 300 and r["truncated_tokens"] > 0 for r in records)
    assert all(r["correct"] == (r["pred"] == r["answer"]) for r in records)
    assert set(result) >= {f"accuracy{group}@300" for group in ("", "_easy", "_hard", "_short", "_medium", "_long")}
    assert result["accuracy@300"] == pytest.approx(round(100 * sum(r["correct"] for r in records) / 4, 1))
    assert list(pd.read_csv(run_dir / "accuracy_by_group.csv").group) == ["overall", "easy", "hard", "short", "medium", "long"]


def test_v2_answer_extraction_follows_the_official_patterns():
    assert extract_answer("The correct answer is (B).") == "B"
    assert extract_answer("**The correct answer is C**") == "C"
    assert extract_answer("I think (A) but the correct answer is (D)") is None  # case matters, as in pred.py
    assert extract_answer("The correct answer is (E)") is None


def test_hub_source_unzips_the_release_archive(monkeypatch, tmp_path, official_folder):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(official_folder / "hotpotqa.jsonl", "data/hotpotqa.jsonl")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, repo_type: str(archive))
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    task = LongBench(source="hub", path="someone/LongBench", num_questions=1)
    assert task._chosen == ["hotpotqa"] and (tmp_path / "cache" / "someone--LongBench" / "data" / "hotpotqa.jsonl").is_file()


# --- bad input --------------------------------------------------------------------------------------------------


def test_bad_input_gets_one_line_errors(tmp_path, official_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TaskError, match=r"no \.jsonl files in .*empty"):
        LongBench(source="folder", path=str(empty))
    with pytest.raises(TaskError, match="does not exist"):
        LongBench(source="folder", path=str(tmp_path / "nowhere"))
    with pytest.raises(TaskError, match="needs task.path"):
        LongBench(source="folder")
    with pytest.raises(TaskError, match="task.source must be one of builtin, folder, hub"):
        LongBench(source="web")

    broken = tmp_path / "broken"
    broken.mkdir()
    write_jsonl(broken / "hotpotqa.jsonl", [official_record("hotpotqa", 0), {"input": "q", "context": "c"}])
    with pytest.raises(TaskError, match=r"broken/hotpotqa\.jsonl:2: missing field 'answers'"):
        LongBench(source="folder", path=str(broken), num_questions=None)
    (broken / "hotpotqa.jsonl").write_text("{not json\n")
    with pytest.raises(TaskError, match=r"hotpotqa\.jsonl:1: not valid JSON"):
        LongBench(source="folder", path=str(broken))
    write_jsonl(broken / "hotpotqa.jsonl", [official_record("trec", 0)])
    (broken / "hotpotqa.jsonl").rename(broken / "trec.jsonl")
    with pytest.raises(TaskError, match=r"trec\.jsonl:1: missing field 'all_classes'"):
        LongBench(source="folder", path=str(broken))
    (broken / "trec.jsonl").rename(broken / "my_data.jsonl")
    with pytest.raises(TaskError, match="unknown LongBench dataset 'my_data'; known: narrativeqa"):
        LongBench(source="folder", path=str(broken))

    with pytest.raises(TaskError, match="unknown LongBench dataset 'hotpot'"):
        LongBench(source="folder", path=str(official_folder), datasets=["hotpot"])
    with pytest.raises(TaskError, match="no musique.jsonl in the data; found: 2wikimqa_e, hotpotqa, lcc"):
        LongBench(source="folder", path=str(official_folder), datasets=["musique"])
    with pytest.raises(TaskError, match="source=builtin builds .*; hotpotqa needs the official data"):
        LongBench(source="builtin", datasets=["hotpotqa"])
    with pytest.raises(TaskError, match="task.num_questions must be >= 1"):
        LongBench(num_questions=0)

    v2 = write_v2(tmp_path / "v2.json")
    questions = json.loads(v2.read_text())
    questions[1]["answer"] = "E"
    v2.write_text(json.dumps(questions))
    with pytest.raises(TaskError, match=r"v2\.json: question 1: field 'answer' must be one of A, B, C, D"):
        LongBenchV2(source="folder", path=str(v2))
    del questions[1]["choice_C"]
    v2.write_text(json.dumps(questions))
    with pytest.raises(TaskError, match=r"question 1: missing field 'choice_C'"):
        LongBenchV2(source="folder", path=str(v2))


def test_lengths_too_short_for_the_fixed_part_fail_before_running(tiny_lm):
    task = LongBench(source="builtin", lengths=[100], num_questions=1, datasets=["hotpotqa_mdqa"])
    with pytest.raises(TaskError, match="length 100 is below the prompt's fixed part and gold paragraphs"):
        task.check(tiny_lm)


def test_budget_below_the_chat_template_fails_before_running(tiny_lm, official_folder, tmp_path):
    task = LongBench(source="folder", path=str(official_folder), max_input_length=20)
    with pytest.raises(TaskError, match="max_input_length=20 leaves no room for the prompt: 2wikimqa's chat template alone takes 30 tokens"):
        task.check(tiny_lm)
    task = LongBenchV2(source="folder", path=str(write_v2(tmp_path / "data.json")), max_input_length=20)
    with pytest.raises(TaskError, match="max_input_length=20 leaves no room for the prompt"):
        task.check(tiny_lm)


def test_official_data_default_budget_is_the_models_length(tiny_lm, official_folder):
    task = LongBench(source="folder", path=str(official_folder))
    task.check(tiny_lm)
    assert task.max_length() == tiny_lm.pretrained_length == 1024
    assert LongBench(source="builtin", lengths=[2048, 8192]).max_length() == 8192
    assert LongBench(source="builtin", lengths=[2048, 8192], max_input_length=4096).max_length() == 4096


def test_cli_reports_bad_data_in_one_line_before_loading_a_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "run.py", "task=longbench", "task.source=folder", f"task.path={tmp_path}", "logger=none",
         f"output_dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: no .jsonl files in {tmp_path}: expected the release's <dataset>.jsonl files (e.g. hotpotqa.jsonl)"


@pytest.mark.slow
def test_builtin_retrieval_on_the_embedded_model(smollm2, tmp_path):
    task = LongBench(source="builtin", lengths=[1024], num_questions=1, datasets=["squad_retrieval"])
    metrics_ = evaluate(smollm2, build_method("full"), task, out_dir=tmp_path / "run", wandb_mode="disabled")
    record = json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])
    assert record["output"].strip() and record["prompt_tokens"] <= 1024
    assert 0.0 <= metrics_["squad_retrieval@1024"] <= 100.0
