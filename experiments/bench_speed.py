"""Prefill and decoding speed and peak memory of each method and length, with the ratios that matter, in one run.

    python experiments/bench_speed.py --model smollm2 --lengths 16384 32768 65536 131072 \
        --methods full longheads:triton longheads:torch longheads:reference infllm_2048:torch
    python experiments/bench_speed.py --model llama2-7b --lengths 32768 65536 --methods full longheads:triton
    python experiments/bench_speed.py --lengths 32768 65536 --methods full longheads:torch infllm_2048:torch \
        --repeats 1 --full-max-length 32768      # the CPU kernel's goal: x2.1 per doubling, <= 0.5x full at 32k
    python experiments/bench_speed.py --layers 4 --lengths 32768 --methods longheads:torch infllm_2048:torch \
        --repeats 1 --profile                    # where the time goes, on 4 of the 30 layers (a few minutes on a CPU)
    python experiments/bench_speed.py --model llama2-7b --lengths 131072 --methods longheads:triton:offload --prefill-chunk 16384

Models are built from their configuration with random weights: speed and memory do not depend on weight values, so
the paper's setting (LLaMA-2-7B) is measured without downloading it. A method is `full`, `pi`, `ntk`, `window`, or a
retrieval method `NAME:KERNEL[:offload]` (NAME: longheads, infllm or a preset in conf/method/ such as infllm_2048;
KERNEL: triton, torch, reference; offload keeps the KV cache in host memory).
Prefill is timed over the whole prompt (in pieces of --prefill-chunk tokens if given), decoding over --decode-tokens
single-token steps after it; each figure is the median of --repeats runs after one warm-up. Peak device memory is
torch's allocator peak; peak host memory is the process's resident set, sampled every 10 ms.
Writes <out>/speed.csv, <out>/speed.md and <out>/provenance.json (machine, versions, the machine's load at start and
end and the cores other processes used meanwhile, as a run folder's) and prints the Markdown, with these ratios: each method against full
attention at the same length, triton against torch, and time(2N) / time(N).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from omegaconf import OmegaConf

from longctx.methods.base import with_cache
from longctx.models import LoadedModel
from longctx.registry import build_method
from longctx.tracking import cpu_counters, environment, load_since, write_json

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "method"
RETRIEVAL = ("longheads", "infllm")

SHAPES = {
    # SmolLM2-135M, the embedded model (what `load_model()` reads from its GGUF)
    "smollm2": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # LLaMA-2-7B, the paper's model
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
    ),
}


class PeakHostMemory:
    """Largest resident set size seen while the block runs (a sampling thread; 10 ms resolution)."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def build_model(shape: str, device: torch.device, dtype: torch.dtype, layers: int = 0) -> LoadedModel:
    """The shape with random weights; `layers` > 0 keeps only that many layers (a quick probe of the same kernels)."""
    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:  # random weights made where they live: a 7B model never passes through host memory in float32
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    name = f"{shape}-random" + (f"-{layers}-layers" if layers else "")
    return LoadedModel(model.eval(), None, name, config.max_position_embeddings)


def parse_method(spec: str, lm: LoadedModel, length: int):
    name, *options = spec.split(":")
    params = {}
    if (PRESETS / f"{name}.yaml").exists():  # a preset: the method it extends, with its values
        preset = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
        name, params = preset.pop("defaults")[0], preset
    if name not in RETRIEVAL:
        params = {"factor": length / lm.pretrained_length} if name in ("pi", "ntk") else params
        return build_method(name, **params)
    if name == "longheads":  # the project's default (2048), or half the pretrained length
        params.setdefault("atten_length", min(2048, lm.pretrained_length // 2))
    kernel = options[0] if options else "auto"
    return build_method(name, **params, kernel=kernel, cpu_offload="offload" in options, record_selection=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(lm: LoadedModel, installed, ids: torch.Tensor, prefill_chunk: int, decode_tokens: int):
    """One prefill of `ids` then `decode_tokens` single-token steps: (prefill s, decode s per token)."""
    model, device = lm.model, ids.device
    reserve = ids.shape[1] + decode_tokens
    cache = installed.new_cache(reserve) if hasattr(installed, "new_cache") else DynamicCache(config=model.config)
    synchronize(device)
    started = time.perf_counter()
    for first in range(0, ids.shape[1], prefill_chunk or ids.shape[1]):
        hidden = model.model(ids[:, first : first + (prefill_chunk or ids.shape[1])], **with_cache(model.model, cache)).last_hidden_state
    synchronize(device)
    prefill = time.perf_counter() - started
    token = ids[:, -1:]
    started = time.perf_counter()
    for _ in range(decode_tokens):
        hidden = model.model(token, **with_cache(model.model, cache)).last_hidden_state
    synchronize(device)
    del hidden, cache
    return prefill, (time.perf_counter() - started) / max(1, decode_tokens)


def measure(lm: LoadedModel, spec: str, length: int, args, device: torch.device) -> dict:
    method = parse_method(spec, lm, length)
    ids = torch.randint(0, lm.model.config.vocab_size, (1, length), device=device)
    prefills, decodes = [], []
    with method(lm, max_length=length + args.decode_tokens) as installed, torch.inference_mode():
        run_once(lm, installed, ids[:, : min(length, 4096)], args.prefill_chunk, 2)  # warm-up: kernels compiled, tables built
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with PeakHostMemory() as host:
            for _ in range(args.repeats):
                prefill, decode = run_once(lm, installed, ids, args.prefill_chunk, args.decode_tokens)
                prefills.append(prefill)
                decodes.append(decode)
    prefill, decode = statistics.median(prefills), statistics.median(decodes)
    return {
        "model": lm.name, "method": spec, "length": length, "prefill_s": prefill, "prefill_tok_s": length / prefill,
        "decode_tok_s": 1 / decode if args.decode_tokens else float("nan"),
        "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "peak_host_gib": host.peak / 2**30, "repeats": args.repeats,
    }


def profile(lm: LoadedModel, spec: str, length: int, args, device: torch.device) -> str:
    """Where one prefill's time goes: the operators with the most self time on the device (or CPU)."""
    method = parse_method(spec, lm, length)
    ids = torch.randint(0, lm.model.config.vocab_size, (1, length), device=device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with method(lm, max_length=length) as installed, torch.inference_mode():
        run_once(lm, installed, ids, args.prefill_chunk, 0)
        with torch.profiler.profile(activities=activities) as prof:
            run_once(lm, installed, ids, args.prefill_chunk, 0)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"## {spec} at {length} tokens\n\n" + prof.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60)


def with_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    key = ["model", "length"]
    full = frame[frame.method == "full"].set_index(key)
    index = pd.MultiIndex.from_frame(frame[key])
    frame["prefill_vs_full"] = frame.prefill_s.to_numpy() / full.prefill_s.reindex(index).to_numpy()
    frame["decode_vs_full"] = frame.decode_tok_s.to_numpy() / full.decode_tok_s.reindex(index).to_numpy()
    torch_rows = frame[frame.method.str.startswith("longheads:torch")].assign(
        method=lambda f: f.method.str.replace("longheads:torch", "longheads:triton")
    ).set_index(["model", "method", "length"])
    triton_index = pd.MultiIndex.from_frame(frame[["model", "method", "length"]])
    frame["prefill_triton_vs_torch"] = frame.prefill_s.to_numpy() / torch_rows.prefill_s.reindex(triton_index).to_numpy()
    frame = frame.sort_values(["model", "method", "length"])
    previous = frame.groupby(["model", "method"]).shift(1)
    doubled = frame.length == 2 * previous.length
    frame["prefill_x_per_doubling"] = (frame.prefill_s / previous.prefill_s).where(doubled)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--methods", nargs="+", default=["full", "longheads:auto"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=0, help="feed the prompt in pieces of this many tokens")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--out", default="results/bench/speed")
    parser.add_argument("--profile", action="store_true", help="also profile one prefill per method at the longest length")
    parser.add_argument("--layers", type=int, default=0,
                        help="build the model with this many layers instead of the shape's (a quick probe; the name says so)")
    parser.add_argument("--full-max-length", type=int, default=0,
                        help="measure full attention only up to this length (its prefill is quadratic: ~15 min at 64k on 2 CPU cores)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    lm = build_model(args.model, device, dtype, args.layers)
    provenance, cpu_at_start = environment(device, dtype), cpu_counters()  # the machine and its load, as a run's
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'} x{torch.get_num_threads()} threads"
    rows = []
    for length in args.lengths:
        for spec in args.methods:
            if spec == "full" and 0 < args.full_max_length < length:
                continue
            try:
                row = measure(lm, spec, length, args, device)
            except torch.OutOfMemoryError:
                row = {"model": lm.name, "method": spec, "length": length, "prefill_s": float("nan"), "note": "out of memory"}
                torch.cuda.empty_cache()
            row.update(machine=machine, dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                       transformers=transformers.__version__)
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    frame = with_ratios(pd.DataFrame(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    provenance["load"] |= load_since(cpu_at_start)
    write_json(out / "provenance.json", {"status": "finished", **provenance})
    frame.to_csv(out / "speed.csv", index=False)
    columns = ["model", "method", "length", "prefill_s", "prefill_tok_s", "decode_tok_s", "peak_device_gib",
               "peak_host_gib", "prefill_vs_full", "decode_vs_full", "prefill_triton_vs_torch", "prefill_x_per_doubling"]
    table = frame[[c for c in columns if c in frame]].to_markdown(index=False, floatfmt=".3g")
    header = f"Machine: {machine}, {rows[0]['dtype']}, torch {torch.__version__}, transformers {transformers.__version__}; median of {args.repeats}.\n\n"
    (out / "speed.md").write_text(header + table + "\n")
    print(header + table)
    if args.profile:
        profiles = [profile(lm, spec, max(args.lengths), args, device) for spec in args.methods]
        (out / "profile.txt").write_text("\n\n".join(profiles) + "\n")
        print("\n\n".join(profiles))


if __name__ == "__main__":
    main()
