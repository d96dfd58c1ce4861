import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernel runs in Triton's interpreter on machines without a GPU; this must precede the first import of
    # Triton, which transformers' model classes import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longctx.models import LoadedModel  # noqa: E402


def rounding_tolerance(output: torch.Tensor, chain: int) -> float:
    """How far two evaluations of one function may differ in `output`'s dtype from rounding alone.

    Each of `chain` dependent roundings (the terms summed along the longest path from input to output, see
    `model_chain`) is off by at most the unit roundoff u = eps / 2, relative to the values it combines; Higham's
    worst case for the whole chain is gamma_n = n u / (1 - n u) of the largest magnitude, here taken as the output's.
    Both evaluations err, hence twice that. A figure of the dtype and the computation's size, not of one machine:
    it holds for any summation order a BLAS or SDPA kernel picks.
    """
    unit_roundoff = torch.finfo(output.dtype).eps / 2
    gamma = chain * unit_roundoff / (1 - chain * unit_roundoff)
    return 2 * gamma * float(output.detach().abs().max())


def model_chain(config, tokens: int, max_position: int | None = None) -> int:
    """Roundings on the longest path through a decoder of this config over `tokens` tokens: per layer the projections'
    and the MLP's dot products (hidden, intermediate terms), the attention's sum over keys, and RoPE: an angle p * f
    is rounded relative to itself, which moves a rotated query or key by u * p * f relative to its length, i.e. as
    p * f roundings (f <= 1 rad per position, positions up to `max_position`, default `tokens`; query and key both);
    then the LM head."""
    rope = 2 * (max_position if max_position is not None else tokens)
    per_layer = 2 * config.hidden_size + config.intermediate_size + tokens + rope
    return config.num_hidden_layers * per_layer + config.hidden_size


def logits(lm: LoadedModel, ids: torch.Tensor, method=None, **kwargs) -> torch.Tensor:
    """The model's logits for `ids`, under `method` if one is given (planned for the input's length, applied and
    removed around the call)."""
    with torch.no_grad():
        if method is None:
            return lm.model(ids, **kwargs).logits
        with method(lm, max_length=ids.shape[1]):
            return lm.model(ids, **kwargs).logits


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
