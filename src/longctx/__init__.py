"""longctx: training-free long-context extension of causal LMs (LongHeads and the baselines it is compared with).

The Python API the CLI is built on:

    import longctx
    lm = longctx.load_model()                                  # embedded SmolLM2-135M, offline
    method = longctx.build_method("longheads", atten_length=2048)
    with method(lm):                                           # patch the model; undone on exit
        text = longctx.generate(lm, long_prompt, max_new_tokens=16)
    metrics = longctx.evaluate(lm, method, longctx.build_task("passkey", lengths=[16384]), out_dir="results/mine")
"""

from __future__ import annotations

import torch

from longctx.models import LoadedModel, load_model
from longctx.registry import METHODS, TASKS, build_method, build_task
from longctx.runner import evaluate

__all__ = ["LoadedModel", "load_model", "build_method", "build_task", "evaluate", "generate", "METHODS", "TASKS"]


def generate(lm: LoadedModel, prompt: str, max_new_tokens: int = 32, **generate_kwargs) -> str:
    """Greedy continuation of `prompt` with whatever method is applied to `lm` right now."""
    ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(lm.device)
    generate_kwargs.setdefault("do_sample", False)
    with torch.inference_mode():
        output = lm.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            pad_token_id=lm.tokenizer.eos_token_id, **generate_kwargs,
        )
    return lm.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
