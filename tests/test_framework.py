"""The framework around the methods: passkey prompts and scoring, configs and registry, the runner end to end
(tiny random Llama with the embedded tokenizer), wandb offline runs, the CLI's answers to bad input, and one
real-weight check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from transformers import AutoTokenizer

from conftest import tiny_llama

from longctx.methods.full import FullAttention
from longctx.models import LoadedModel, ModelLoadError, embedded_model_dir, load_model
from longctx.methods.method import MethodError, parameters
from longctx.registry import METHODS, TASKS, RegistryError, build_method, build_task
from longctx.runner import evaluate
from longctx.tasks.base import TaskError
from longctx.tasks.passkey import INSTRUCTION, NEEDLE, QUESTION, Passkey, build_prompt, first_integer

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RECORD_KEYS = {
    "sample", "length", "prompt_tokens", "depth", "needle_token", "needle_end", "key", "output", "correct", "seconds", "peak_gpu_gib",
    "peak_rss_gib",
}


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (vocab 49152); only the tokenizer is loaded, not the weights."""
    return AutoTokenizer.from_pretrained(embedded_model_dir())


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


# --- passkey prompts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [512, 1024, 4096, 16384])
def test_prompt_length_is_close_to_the_target(tokenizer, length):
    for depth in (0.0, 0.5, 1.0):
        prompt = build_prompt(tokenizer, length, depth, key=12345)
        assert prompt.num_tokens == count(tokenizer, prompt.text)  # what the runner will feed the model
        # never past the target (that would test a longer context), and topped up to within a few tokens of it
        assert length - 8 <= prompt.num_tokens <= length, (length, depth, prompt.num_tokens)


@pytest.mark.parametrize(
    "length, depth, tolerance",
    [(4096, 0.0, 0.02), (4096, 0.1, 0.02), (4096, 0.5, 0.02), (4096, 0.9, 0.02), (4096, 1.0, 0.02),
     (1024, 0.25, 0.05), (512, 0.5, 0.06), (16384, 0.7, 0.005)],
)
def test_needle_is_at_the_requested_depth(tokenizer, length, depth, tolerance):
    key = 48213
    prompt = build_prompt(tokenizer, length, depth, key)
    assert abs(prompt.needle_token / prompt.num_tokens - depth) <= tolerance
    ids = tokenizer(prompt.text, add_special_tokens=False).input_ids
    needle = NEEDLE.format(key=key)
    assert tokenizer.decode(ids[prompt.needle_token : prompt.needle_end]).strip() == needle.strip()
    assert "pass key" not in tokenizer.decode(ids[: prompt.needle_token])
    assert prompt.text.startswith(INSTRUCTION) and prompt.text.endswith(QUESTION)
    assert prompt.text.count(str(key)) == 2


def test_samples_are_deterministic_per_seed(tokenizer):
    task = Passkey(lengths=[512, 1024], num_samples=3, seed=0)
    first, again = task.samples(tokenizer), Passkey(lengths=[512, 1024], num_samples=3, seed=0).samples(tokenizer)
    assert first == again
    other = Passkey(lengths=[512, 1024], num_samples=3, seed=1).samples(tokenizer)
    assert [p.key for p in first] != [p.key for p in other]
    assert all(10000 <= p.key <= 99999 for p in first)
    assert [p.depth for p in first[:3]] == pytest.approx([1 / 6, 3 / 6, 5 / 6])  # spread evenly when depths=None
    fixed = Passkey(lengths=[512], num_samples=4, depths=[0.1, 0.9]).samples(tokenizer)
    assert [p.depth for p in fixed] == [0.1, 0.9, 0.1, 0.9]


def test_length_below_the_fixed_part_is_a_task_error(tokenizer):
    with pytest.raises(TaskError, match="length 10"):
        build_prompt(tokenizer, 10, 0.5, 12345)
    with pytest.raises(TaskError, match="length 10"):
        Passkey(lengths=[10], num_samples=1).samples(tokenizer)
    with pytest.raises(TaskError, match="depth"):
        build_prompt(tokenizer, 1024, 1.5, 12345)


# --- scoring ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12345", 12345),
        (" 12345.", 12345),
        ("\n67890 is the key", 67890),
        ("The pass key is 54321. Remember it.", 54321),
        ("12,345", 12),  # the model must answer plainly
        ("first 111 then 222", 111),
        ("007", 7),
        ("no digits here", None),
        ("", None),
    ],
)
def test_first_integer(text, expected):
    assert first_integer(text) == expected


# --- configs and registry ---------------------------------------------------------------------------------------


def group_files(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_run_config(overrides: list[str]):
    """The config run.py would get, with HydraConfig set so `${hydra:runtime.cwd}` resolves."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def hydra_config_reset():
    yield
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_config_combination_composes(method, task, hydra_config_reset):
    for model in group_files("model"):
        for logger in group_files("logger"):
            cfg = compose_run_config([f"method={method}", f"task={task}", f"model={model}", f"logger={logger}"])
            assert (cfg.method.name, cfg.task.name, cfg.model.name, cfg.logger.name) == (method, task, model, logger)
            missing = OmegaConf.missing_keys(cfg)
            assert missing == ({"model.path"} if model == "hf" else set()), missing
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert resolved["output_dir"].startswith(f"{os.getcwd()}/results/{task}/{model}/{method}/")
            if logger == "wandb":
                assert resolved["logger"]["dir"] == f"{os.getcwd()}/results"
            if "seed" in resolved["task"]:  # the run's seed, unless the task keeps its own (RULER: prepare.py's 42)
                assert resolved["task"]["seed"] == (resolved["seed"] if TASKS[task].follows_run_seed else 42)


@pytest.mark.parametrize("group, registry", [("method", METHODS), ("task", TASKS)])
def test_config_defaults_are_the_dataclass_defaults(group, registry, hydra_config_reset):
    """One source of defaults: `method=<name>` / `task=<name>` compose to exactly what the API builds by default."""
    for name, cls in registry.items():
        cfg = compose_run_config([f"{group}={name}", "seed=5"])
        params = OmegaConf.to_container(cfg[group], resolve=True)
        assert params.pop("name") == name
        built = cls()
        for field in parameters(cls):
            follows = field.name == "seed" and cls.follows_run_seed  # a task's seed follows the run's, RULER's is 42
            expected = 5 if follows else getattr(built, field.name)
            assert params.pop(field.name) == expected, (name, field.name)
        assert params == {}, (name, params)


def test_longheads_default_is_the_tuned_attention_length():
    # the README's tables, the benchmark and the CLI all ran A=2048 on the 8k model; the API must start there too
    assert build_method("longheads").atten_length == 2048


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_config_entries_build_through_the_registry(method, task, hydra_config_reset):
    cfg = compose_run_config([f"method={method}", f"task={task}", "seed=7"])
    method_params = OmegaConf.to_container(cfg.method, resolve=True)
    task_params = OmegaConf.to_container(cfg.task, resolve=True)
    built_method = build_method(method_params.pop("name"), **method_params)
    built_task = build_task(task_params.pop("name"), **task_params)
    assert isinstance(built_method, METHODS[method]) and built_method.name == method
    assert isinstance(built_task, TASKS[task]) and built_task.name == task
    for key, value in method_params.items():
        assert getattr(built_method, key) == value
    if "lengths" in task_params:
        assert built_task.max_length() == max(task_params["lengths"])
    if task == "passkey":
        assert built_task.seed == 7


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, registry", [(build_method, METHODS), (build_task, TASKS)])
def test_unknown_name_lists_the_valid_ones(build, registry):
    with pytest.raises(RegistryError) as error:
        build("nope")
    message = str(error.value)
    assert "\n" not in message and "'nope'" in message
    assert all(name in message for name in registry)


def test_unknown_parameter_is_named():
    with pytest.raises(RegistryError) as error:
        build_method("longheads", chunk_sise=64)
    message = str(error.value)
    assert "\n" not in message and "chunk_sise" in message and "chunk_size" in message
    with pytest.raises(RegistryError, match="lenghts"):
        build_task("passkey", lenghts=[1024])


def test_missing_model_folder_is_a_one_line_error():
    with pytest.raises(ModelLoadError) as error:
        load_model("/nonexistent/dir", device="cpu")
    message = str(error.value)
    assert "\n" not in message and "/nonexistent/dir" in message


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_unknown_method_names_the_options_without_a_traceback():
    result = run_cli("method=nope")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "nope" in result.stderr
    assert all(name in result.stderr for name in METHODS), result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.lengths=[10]"], "length 10"),
        (["task.lengths=abc"], "task.lengths must be a list of int"),
        (["model=hf"], "needs model.path"),
        (["task=pg19", "task.source=folder", "task.path={empty}"], "no non-empty .txt books"),
        (["method=longheads", "method.kernel=triton"], "kernel=triton needs a CUDA device"),  # model.device=cpu
        (["method=longheads", "method.rope_scaling={name:ntk}"], "dynamic ntk"),  # before the model loads
        (["method=dca", "method.rope_scaling={name:yarn,scale:2}"], "no parameter scale"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(tmp_path, overrides, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a book")
    overrides = [override.replace("{empty}", str(tmp_path / "empty")) for override in overrides]
    result = run_cli(*overrides, "logger=none", "model.device=cpu", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    # before any work: the run folder holds only Hydra's own files, no config, provenance or predictions of ours
    assert not any((tmp_path / "run" / name).exists() for name in ("config.yaml", "provenance.json", "predictions.jsonl"))


# --- the runner end to end on a tiny random Llama ---------------------------------------------------------------


@pytest.fixture
def tiny_lm(tokenizer) -> LoadedModel:
    """A 2-layer random Llama whose vocabulary is the embedded tokenizer's, so the passkey task runs on it."""
    return tiny_llama(
        512, tokenizer=tokenizer, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def read_predictions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def test_runner_writes_the_run_folder(tiny_lm, tmp_path):
    run_dir = tmp_path / "run"
    task = Passkey(lengths=[256], num_samples=2, max_new_tokens=3)
    metrics = evaluate(tiny_lm, build_method("full"), task, out_dir=run_dir, wandb_mode="disabled")

    for name in ("config.yaml", "metrics.json", "predictions.jsonl", "accuracy_by_depth.png", "accuracy_by_depth.csv"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("chunk_selection_*.png"))  # full attention has no selection to draw
    config = yaml.safe_load((run_dir / "config.yaml").read_text())  # the CLI's shape, so aggregate reads API runs too
    assert config["method"] == {"name": "full"} and config["model"]["name"] == "tiny"
    assert config["task"]["name"] == "passkey" and config["task"]["lengths"] == [256]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == metrics and 0.0 <= saved["accuracy@256"] <= 1.0 and saved["wall_seconds"] > 0

    records = read_predictions(run_dir)
    assert len(records) == 2 and all(set(record) == RECORD_KEYS for record in records)
    assert [record["sample"] for record in records] == [0, 1]
    assert all(record["length"] == 256 for record in records)
    assert all(248 <= record["prompt_tokens"] <= 256 for record in records)
    assert saved["accuracy@256"] == pytest.approx(sum(record["correct"] for record in records) / 2)
    by_depth = pd.read_csv(run_dir / "accuracy_by_depth.csv")
    assert "depth_bin" in by_depth.columns and "256" in by_depth.columns


def test_runner_with_longheads_draws_chunk_selection_and_restores_the_model(tiny_lm, tmp_path):
    ids = torch.randint(0, len(tiny_lm.tokenizer), (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_lm.model(ids).logits
    method = build_method("longheads", chunk_size=16, atten_length=64, query_block=4, exact_tail=8, record_selection=True)
    task = Passkey(lengths=[300], num_samples=2, max_new_tokens=3)
    run_dir = tmp_path / "run"
    evaluate(tiny_lm, method, task, out_dir=run_dir, wandb_mode="disabled")

    heatmaps = sorted(path.name for path in run_dir.glob("chunk_selection_*.png"))
    assert heatmaps == ["chunk_selection_0.png", "chunk_selection_1.png"]
    assert len(read_predictions(run_dir)) == 2
    with torch.no_grad():
        torch.testing.assert_close(tiny_lm.model(ids).logits, before)  # the method was removed on exit


def test_runner_writes_a_wandb_offline_run(tiny_lm, tmp_path, monkeypatch, wandb_sandbox):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    task = Passkey(lengths=[256], num_samples=2, max_new_tokens=3)
    evaluate(tiny_lm, build_method("full"), task, out_dir=run_dir, wandb_mode="offline", wandb_dir=tmp_path)

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb")), list(runs[0].iterdir())
    assert (run_dir / "metrics.json").is_file()


# --- real weights -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_retrieves_the_passkey_at_1024_tokens(smollm2):
    task = Passkey(lengths=[1024], num_samples=2)
    metrics = evaluate(smollm2, FullAttention(), task)
    assert metrics["accuracy@1024"] == 1.0, task._records


@pytest.mark.parametrize("name", sorted(name for name, cls in METHODS.items() if cls.renamed))
def test_a_renamed_parameter_is_refused_naming_the_new_one(name):
    for old, new in METHODS[name].renamed.items():
        with pytest.raises(MethodError, match=f"{old} is now called {new}") as error:
            build_method(name, **{old: 1})
        assert "\n" not in str(error.value)
