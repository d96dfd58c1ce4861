"""Reading LongBench data in the official release's format, from a folder or the hub, with one-line errors.

v1: one `<dataset>.jsonl` per dataset (LongBench-E: `<dataset>_e.jsonl`), one question per line with fields `input`,
`context`, `answers` (list), `all_classes` (list or null), `length` (words), `dataset`, `language`, `_id`.
v2: one JSON list (or JSONL) of questions with `question`, `choice_A`..`choice_D`, `answer` (A-D), `context`,
`difficulty`, `length` (short/medium/long), `domain`, `_id`.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Iterator

from longctx.models import DEFAULT_CACHE_DIR
from longctx.tasks.base import TaskError
from longctx.tasks.longbench.protocol import spec_for

log = logging.getLogger(__name__)

HUB_V1 = "zai-org/LongBench"  # formerly THUDM/LongBench: data.zip holds data/<dataset>.jsonl
HUB_V2 = "zai-org/LongBench-v2"  # data.json
CACHE_DIR = DEFAULT_CACHE_DIR / "longbench"
OFFLINE_HINT = "without the hub use task.source=folder task.path=<folder of the release's jsonl files> or task.source=builtin"
OFFLINE_HINT_V2 = "without the hub use task.source=folder task.path=<LongBench v2's data.json>"

V1_REQUIRED = ("input", "context", "answers")
V2_REQUIRED = ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")


def _lines(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSONL file, at most `limit` objects, blank lines skipped."""
    taken = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and taken >= limit:
                return
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(item, dict):
                raise TaskError(f"{path}:{number}: expected a JSON object, got {type(item).__name__}")
            taken += 1
            yield number, item


def _require(item: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    for field in fields:
        if field not in item:
            raise TaskError(f"{where}: missing field {field!r}")


def check_v1_record(item: dict[str, Any], dataset: str, where: str) -> dict[str, Any]:
    """The record with its fields checked (answers as strings); `where` (file:line) prefixes every error."""
    _require(item, V1_REQUIRED, where)
    for field in ("input", "context"):
        if not isinstance(item[field], str):
            raise TaskError(f"{where}: field {field!r} must be a string, got {type(item[field]).__name__}")
    answers = item["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int)) for a in answers):
        raise TaskError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r:.80}")
    if spec_for(dataset).metric == "classification" and not item.get("all_classes"):
        raise TaskError(f"{where}: missing field 'all_classes' (the class names {dataset} is scored against)")
    length = item.get("length")
    if length is not None and not isinstance(length, int):
        raise TaskError(f"{where}: field 'length' must be an integer (words), got {length!r:.40}")
    return {**item, "answers": [str(answer) for answer in answers]}


def folder_datasets(folder: Path) -> dict[str, Path]:
    """Dataset name (file stem) -> jsonl file, for every .jsonl in `folder` (or in its data/ subfolder, as unzipped)."""
    if not folder.is_dir():
        raise TaskError(f"LongBench folder {folder} does not exist")
    files = sorted(folder.glob("*.jsonl")) or sorted(folder.glob("data/*.jsonl"))
    if not files:
        raise TaskError(f"no .jsonl files in {folder}: expected the release's <dataset>.jsonl files (e.g. hotpotqa.jsonl)")
    found = {path.stem: path for path in files}
    for name in found:
        spec_for(name)  # an unknown file name fails here, listing the known ones
    return found


def read_v1(files: dict[str, Path], num_questions: int | None) -> dict[str, list[dict[str, Any]]]:
    """Every selected dataset's first `num_questions` records (all if None), checked."""
    data = {}
    for dataset, path in files.items():
        records = [check_v1_record(item, dataset, f"{path}:{number}") for number, item in _lines(path, num_questions)]
        if not records:
            raise TaskError(f"{path} holds no questions")
        data[dataset] = records
    return data


def hub_v1_folder(repo: str | None) -> Path:
    """The release's data.zip from the hub, unzipped once into the cache; returns the folder of jsonl files."""
    repo = repo or HUB_V1
    target = CACHE_DIR / repo.replace("/", "--")
    if not any(target.glob("data/*.jsonl")):
        archive = _hub_download(repo, "data.zip", OFFLINE_HINT)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(target)
    return target


def _hub_download(repo: str, filename: str, hint: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset"))
    except Exception as error:  # offline, unknown repo, no such file: all say the same to the user
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TaskError(f"cannot fetch {filename} of dataset {repo} from the hub ({first}); {hint}") from None


def check_v2_record(item: dict[str, Any], where: str) -> dict[str, Any]:
    _require(item, V2_REQUIRED, where)
    for field in V2_REQUIRED:
        if not isinstance(item[field], str):
            raise TaskError(f"{where}: field {field!r} must be a string, got {type(item[field]).__name__}")
    if item["answer"] not in ("A", "B", "C", "D"):
        raise TaskError(f"{where}: field 'answer' must be one of A, B, C, D, got {item['answer']!r:.20}")
    return item


def read_v2(path: Path, num_questions: int | None) -> list[dict[str, Any]]:
    """LongBench v2 questions from a data.json (a JSON list), a JSONL file, or a folder holding data.json."""
    if path.is_dir():
        candidates = [path / "data.json"] if (path / "data.json").is_file() else sorted(path.glob("*.json*"))
        if not candidates:
            raise TaskError(f"no data.json (or other .json/.jsonl file) in {path}: expected LongBench v2's data.json")
        path = candidates[0]
    if not path.is_file():
        raise TaskError(f"LongBench v2 file {path} does not exist; point task.path at the release's data.json")
    if path.suffix == ".jsonl":
        items = list(_lines(path, num_questions))
    else:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(loaded, list):
            raise TaskError(f"{path}: expected a JSON list of questions, got {type(loaded).__name__}")
        # a JSON list has no line numbers; errors name the question's index instead
        items = list(enumerate(loaded[:num_questions] if num_questions is not None else loaded))
    if not items:
        raise TaskError(f"{path} holds no questions")
    kind = "line" if path.suffix == ".jsonl" else "question"
    records = []
    for index, item in items:
        where = f"{path}:{index}" if kind == "line" else f"{path}: question {index}"
        if not isinstance(item, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(item).__name__}")
        records.append(check_v2_record(item, where))
    return records


def hub_v2_file(repo: str | None) -> Path:
    return _hub_download(repo or HUB_V2, "data.json", OFFLINE_HINT_V2)
