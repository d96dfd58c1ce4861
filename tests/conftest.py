import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernel runs in Triton's interpreter on machines without a GPU; this must precede the first import of
    # Triton, which transformers' model classes import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longctx.models import LoadedModel  # noqa: E402


def tiny_llama(max_positions: int = 256, seed: int = 0, tokenizer=None, **config) -> LoadedModel:
    """A 2-layer random Llama with GQA (4 query heads over 2 KV heads): fast, and exercises every code path."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
    )
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()
    return LoadedModel(model, tokenizer, "tiny", max_positions)


@pytest.fixture
def tiny() -> LoadedModel:
    return tiny_llama()


@pytest.fixture
def wandb_sandbox(tmp_path, monkeypatch):
    """wandb's directories inside the test's tmp_path and its console output off, so offline runs touch nothing else."""
    for variable in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded SmolLM2-135M (real weights), loaded once per session on CPU."""
    from longctx.models import load_model

    return load_model(device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def gemma3_270m() -> LoadedModel:
    """The embedded Gemma 3 270M (real weights), loaded once per session on CPU."""
    from longctx.models import load_model

    return load_model("embedded:gemma3", device="cpu", dtype="float32")
