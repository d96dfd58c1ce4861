"""The lm-evaluation-harness adapter: a local task (yaml + jsonl written here) through `lm_eval.simple_evaluate` with
LongHeads applied, for generation and loglikelihood requests; the harness's numbers equal longctx's own computation
with the method applied, and differ from full attention's. Skipped when the optional extra is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

pytest.importorskip("lm_eval", reason='the harness adapter is an optional extra: pip install -e ".[harness]"')

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import longctx.harness  # noqa: E402,F401  (registers model "longctx")
from longctx.models import embedded_model_dir, load_model  # noqa: E402
from longctx.registry import build_method  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. " * 20
LONGHEADS = dict(chunk_size=16, atten_length=64, query_block=4)  # prompts of ~300 tokens: selection does the work


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a model folder `pretrained=` can name."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    """Two local harness tasks over one jsonl: generate_until and multiple choice (loglikelihood requests)."""
    folder = tmp_path_factory.mktemp("tasks")
    docs = [{"context": f"{FILLER}The key is {key}. What is the key?", "answer": f" {key}", "choices": ["red", "blue"],
             "label": 1} for key in (11, 22)]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\ntest_split: test\n"
    (folder / "tiny_generate.yaml").write_text(
        "task: tiny_generate\n" + common + 'output_type: generate_until\ndoc_to_text: "{{context}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 5\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n" + common + 'output_type: multiple_choice\ndoc_to_text: "{{context}} The sky is"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    return folder


def harness_run(model_args: str, task_folder: Path) -> dict:
    return lm_eval.simple_evaluate(
        model="longctx", model_args=model_args, tasks=["tiny_generate", "tiny_choice"],
        task_manager=TaskManager(include_path=str(task_folder)), log_samples=True,
    )


def continuation_logprob(lm, method, context: str, continuation: str) -> float:
    """log p(continuation | context) with `method` applied, tokenized as the harness does (the whole text encoded,
    the continuation being what follows the context's tokens)."""
    context_ids = lm.tokenizer(context, add_special_tokens=False).input_ids
    whole = lm.tokenizer(context + continuation, add_special_tokens=False).input_ids
    continuation_ids = whole[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    with method(lm), torch.no_grad():
        logits = lm.model(ids[:, :-1]).logits.float().log_softmax(-1)
    picked = logits[0, len(context_ids) - 1 :].gather(-1, torch.tensor(continuation_ids)[:, None])
    return float(picked.sum())


def test_longheads_inside_the_harness_answers_both_request_types(tiny_folder, task_folder):
    args = f"pretrained={tiny_folder},method=longheads,{','.join(f'{k}={v}' for k, v in LONGHEADS.items())}," \
           "max_length=1024,device=cpu,dtype=float32"
    results = harness_run(args, task_folder)
    assert {"tiny_generate", "tiny_choice"} <= set(results["results"])
    assert results["config"]["model"] == "longctx"

    lm = load_model(str(tiny_folder), device="cpu", dtype="float32")
    longheads, full = build_method("longheads", **LONGHEADS), build_method("full")
    for sample in results["samples"]["tiny_choice"]:
        context = f"{sample['doc']['context']} The sky is"
        for (logprob, _), choice in zip(sample["filtered_resps"], sample["doc"]["choices"]):
            ours = continuation_logprob(lm, longheads, context, f" {choice}")
            # the same float32 computation: only summation order may differ between the two calls
            assert logprob == pytest.approx(ours, abs=1e-3)
            assert abs(logprob - continuation_logprob(lm, full, context, f" {choice}")) > 1e-3  # the method acted
    for sample in results["samples"]["tiny_generate"]:
        ids = lm.tokenizer(sample["doc"]["context"], return_tensors="pt").input_ids
        with longheads(lm), torch.no_grad():
            output = lm.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
        expected = lm.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert sample["filtered_resps"][0] == expected


def test_bad_model_args_fail_in_one_line_before_loading():
    # what lm_eval does with --model_args: parse the string, then construct the model class
    def create(arg_string: str):
        return longctx.harness.LongctxLM.create_from_arg_string(arg_string)

    with pytest.raises(ValueError, match="pass max_length=<tokens> with method=longheads"):
        create("pretrained=/nonexistent,method=longheads")
    with pytest.raises(ValueError, match="atten_lenght is neither a parameter of method 'longheads'"):
        create("pretrained=/nonexistent,method=longheads,atten_lenght=64,max_length=512")
    with pytest.raises(ValueError, match="unknown method 'longhead'"):
        create("pretrained=/nonexistent,method=longhead")
    with pytest.raises(ValueError, match="use batch_size=1"):
        create("pretrained=/nonexistent,method=window,max_length=512,batch_size=4")


def test_max_length_reaches_the_method_and_remove_restores_the_model(tiny_folder):
    # PI with factor=None stretches RoPE by max_length / trained length: the harness's max_length must get there
    adapter = longctx.harness.LongctxLM(pretrained=str(tiny_folder), method="pi", max_length=1024, device="cpu", dtype="float32")
    assert adapter.max_length == 1024
    assert adapter.installation.plan.factor == 1024 / 256
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        stretched = adapter.model(ids).logits
        adapter.remove_method()
        restored = adapter.model(ids).logits
        plain = load_model(str(tiny_folder), device="cpu", dtype="float32").model(ids).logits
    assert not torch.equal(stretched, restored)
    assert torch.equal(restored, plain)
