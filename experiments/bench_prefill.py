"""Prefill time and peak memory per method and length on a model with the embedded model's shape, random weights.

Speed and memory do not depend on the weights, so this runs where the real checkpoint cannot travel.
    python experiments/bench_prefill.py --lengths 16384 32768 --methods full longheads:64 longheads:1
`longheads:B` is LongHeads with prefill block size B (1 = per-token selection, as the authors' release).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.models import LoadedModel
from longctx.registry import build_method

# SmolLM2-135M's architecture (what `load_model()` reads from the embedded GGUF).
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
)


def parse_method(spec: str):
    name, _, block = spec.partition(":")
    params = {"block_size": int(block)} if block else {}
    if name == "longheads":
        params["cpu_offload"] = False
    return build_method(name, **params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--methods", nargs="+", default=["full", "longheads:64", "longheads:1"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="results/bench/prefill.csv")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, attn_implementation="sdpa"))
    model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    lm = LoadedModel(model, None, "smollm2-random", 8192)
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, SMOLLM2["vocab_size"], (1, length), device=device)
        for spec in args.methods:
            method = parse_method(spec)
            times = []
            with method(lm), torch.inference_mode():
                for _ in range(args.repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    started = time.perf_counter()
                    model.model(ids)  # hidden states only: the logits are the task's business
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append({"length": length, "method": spec, "median_s": statistics.median(times), "peak_gib": peak})
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    frame["ratio_to_full"] = frame.median_s / frame.length.map(frame[frame.method == "full"].set_index("length").median_s)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
