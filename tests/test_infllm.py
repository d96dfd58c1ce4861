"""InfLLM against a written-out reference of the paper's computation, and its promised properties.

Small-scale parameters (the defaults are for an 8k model): blocks of 8 tokens, n_init 8, n_local 32, 2 blocks
retrieved per lookup, 2 representative tokens, lookups shared by chunks of 16 queries: lookups start at
8 + 2 * 8 + 32 = 56, so a 200-token input retrieves from most of its memory.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AttentionInterface

from conftest import logits, model_chain, rounding_tolerance, tiny_llama
from longctx.methods.base import MethodError, with_cache
from longctx.methods.infllm import InfLLM
from longctx.methods.longheads import LongHeads
from longctx.methods.retrieval.triton_kernel import triton
from longctx.models import LoadedModel
from test_longheads import plain_rope

SMALL = dict(chunk_size=8, sink_tokens=8, recent_window=32, topk=2, repr_topk=2, query_block=16, exact_tail=8)
SEQ = 200
on_gpu = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    triton is None or not (on_gpu or os.environ.get("TRITON_INTERPRET") == "1"), reason="no GPU and not under TRITON_INTERPRET=1"
)


def infllm(**params) -> InfLLM:
    return InfLLM(**{**SMALL, **params})


def reference_attention(lm, query, key, value, scaling, block_size, n_init, n_local, topk, repr_topk, exc_block_size,
                        exact_tail, sharing="layer", **_):
    """InfLLM written out query by query (a prefill from position 0), with the model's own rotary embedding.

    Per chunk of exc_block_size queries: the memory blocks whose tokens have left every later local window get their
    representative keys (the repr_topk tokens that received the most attention while in a local window, keys without
    RoPE, averaged); from position n_init + topk * block_size + n_local on, the chunk's mean query at distance
    n_local - 1 scores them (summed over the heads that share a lookup) and keeps the top ones. Then each query attends,
    in one softmax, to the keys within n_local at their true distance and to the initial tokens, the retrieved blocks
    and the recent tokens not yet in a block at distance n_local - 1; the first part's probabilities are credited to
    the keys. The last exact_tail queries look up one by one (the chunk before them may be partial).
    """
    _, q_heads, n, _ = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    units = {"layer": 1, "kv_group": kv_heads, "head": q_heads}[sharing]
    rope = lambda x, positions: plain_rope(lm.model, x, positions)  # noqa: E731
    positions = list(range(n))
    raw_q = torch.stack([rope(query[0, h], [-t for t in positions]) for h in range(q_heads)])
    raw_k = torch.stack([rope(key[0, h], [-t for t in positions]) for h in range(kv_heads)])
    w, far = block_size, n_local - 1
    begin = n_init + topk * w + n_local
    credit = torch.zeros(q_heads, n, dtype=query.dtype)
    representative: list[torch.Tensor] = []  # per block: [Hq, D]
    out = torch.zeros_like(query)
    tail = max(0, n - exact_tail)
    chunks = [range(s, min(tail, s + exc_block_size)) for s in range(0, tail, exc_block_size)] + [range(t, t + 1) for t in range(tail, n)]
    for chunk in chunks:
        start = chunk[0]
        recent = max(0, (start - n_local) // w)  # blocks before this one have left every later local window
        for c in range(len(representative), recent):
            top = credit[:, c * w : (c + 1) * w].topk(repr_topk, dim=-1).indices + c * w  # [Hq, r]
            representative.append(torch.stack([raw_k[h // group, top[h]].mean(dim=0) for h in range(q_heads)]))
        retrieved = [set() for _ in range(units)]
        if start >= begin:
            mean_q = rope(raw_q[:, list(chunk)].mean(dim=1), [far] * q_heads)  # [Hq, D], at the one distance
            candidates = list(range(n_init // w, recent))
            for unit in range(units):
                heads = range(unit * q_heads // units, (unit + 1) * q_heads // units)
                score = torch.tensor([sum(float(mean_q[h] @ representative[c][h]) for h in heads) for c in candidates])
                retrieved[unit] = {candidates[i] for i in score.topk(topk).indices.tolist()}
        for t in chunk:
            distance = t - torch.arange(t + 1)
            local = distance < n_local
            for h in range(q_heads):
                kv = h // group
                seen_far = torch.tensor([start < begin or x < n_init or x // w in retrieved[h * units // q_heads] or x >= recent * w
                                         for x in range(t + 1)]) & ~local
                # within the local window: query and keys as the model rotated them, at their true positions
                q_far = rope(raw_q[h, t : t + 1], [far])[0]
                logits = torch.cat(((key[0, kv, : t + 1] @ query[0, h, t])[local], (raw_k[kv, : t + 1] @ q_far)[seen_far])) * scaling
                probs = torch.softmax(logits, dim=0)
                out[0, h, t] = probs @ torch.cat((value[0, kv, : t + 1][local], value[0, kv, : t + 1][seen_far]))
                credit[h, : t + 1][local] += probs[: int(local.sum())]
    return out.transpose(1, 2), None


def reference_logits(lm: LoadedModel, ids: torch.Tensor, **params) -> torch.Tensor:
    release_names = {new: old for old, new in InfLLM.renamed.items()}  # the reference speaks the release's names
    params = {release_names.get(name, name): value for name, value in {**SMALL, **params}.items()}

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return reference_attention(lm, query, key, value, scaling, **params)

    AttentionInterface.register("infllm_reference", reference)
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("infllm_reference")
    try:
        return logits(lm, ids)
    finally:
        lm.model.set_attn_implementation(previous)


@pytest.fixture(scope="module")
def sharp64() -> LoadedModel:
    """Weights large enough for distinct attention (lookups far from ties), in float64: the kernels and the reference
    then differ by rounding alone (RoPE angles are float32 in both, as transformers computes them, and one-distance
    positions never compose two rotations), so a float64 rounding bound separates right from wrong."""
    lm = tiny_llama(initializer_range=0.2)
    lm.model.double()
    return lm


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(sharp64, ids) -> torch.Tensor:
    return reference_logits(sharp64, ids, exact_tail=0)


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_equals_written_out_reference(sharp64, ids, expected, kernel):
    got = logits(sharp64, ids, infllm(kernel=kernel, exact_tail=0))  # 200 = 12 chunks of 16 and a partial one
    torch.testing.assert_close(got, expected, atol=rounding_tolerance(expected, model_chain(sharp64.model.config, SEQ)), rtol=0)
    assert not torch.allclose(got, logits(sharp64, ids), atol=1e-3)  # the method acts on this input


@needs_triton
def test_triton_kernel_equals_written_out_reference(ids, monkeypatch):
    """Triton computes in float32 (tl.dot has no float64): the float32 model against the reference in float32. Without
    a GPU the kernels run in Triton's interpreter, which the method itself never picks."""
    import longctx.methods.retrieval.attention as attention
    import longctx.methods.retrieval.method as method

    if not on_gpu:
        for module in (attention, method):
            monkeypatch.setattr(module, "triton_available", lambda device: True)
    lm = tiny_llama(initializer_range=0.2)
    expected = reference_logits(lm, ids, exact_tail=0)
    got = logits(lm, ids, infllm(kernel="triton", exact_tail=0))
    torch.testing.assert_close(got, expected, atol=rounding_tolerance(expected, model_chain(lm.model.config, SEQ)), rtol=0)


@pytest.mark.parametrize("sharing", ["head", "kv_group"])
def test_per_head_lookup_equals_reference(sharp64, ids, sharing):
    """The release's perhead=true (and the kv-group middle way) through the same seam; the last 8 queries look up one
    by one."""
    expected = reference_logits(sharp64, ids, sharing=sharing)
    got = logits(sharp64, ids, infllm(sharing=sharing))
    torch.testing.assert_close(got, expected, atol=rounding_tolerance(expected, model_chain(sharp64.model.config, SEQ)), rtol=0)


def test_within_local_window_equals_full_attention(sharp64, ids):
    short = ids[:, : SMALL["recent_window"]]
    expected = logits(sharp64, short)
    got = logits(sharp64, short, infllm())
    torch.testing.assert_close(got, expected, atol=rounding_tolerance(expected, model_chain(sharp64.model.config, short.shape[1])), rtol=0)
    # one token more and the first one moves to the one distance: no longer full attention
    longer = ids[:, : SMALL["recent_window"] + 1]
    assert not torch.allclose(logits(sharp64, longer, infllm())[:, -1], logits(sharp64, longer)[:, -1], atol=1e-6)


def test_decoding_equals_prefill(sharp64, ids):
    """Per-token lookups (query_block=1): token-by-token decoding reproduces the prefill's logits."""
    method = infllm(query_block=1)
    prefill = logits(sharp64, ids, method)
    with method(sharp64) as installed, torch.no_grad():
        cache = installed.new_cache()
        sharp64.model(ids[:, :130], **with_cache(sharp64.model, cache))  # 130: mid-block, past the first lookup
        steps = [sharp64.model(ids[:, t : t + 1], **with_cache(sharp64.model, cache)).logits[:, -1] for t in range(130, SEQ)]
    tolerance = rounding_tolerance(prefill, model_chain(sharp64.model.config, SEQ))
    torch.testing.assert_close(torch.stack(steps, dim=1), prefill[:, 130:], atol=tolerance, rtol=0)


def test_prefill_in_pieces_equals_one_prefill(sharp64, ids):
    """Lookups are aligned to absolute positions and the memory carries over: a prompt fed in two calls (split at a
    chunk boundary, as the release's generation loop feeds 8k pieces) gives the logits of one call (exact_tail=0: a
    call's last queries would otherwise look up one by one)."""
    method = infllm(exact_tail=0)
    whole = logits(sharp64, ids, method)
    with method(sharp64) as installed, torch.no_grad():
        cache = installed.new_cache()
        first = sharp64.model(ids[:, :96], **with_cache(sharp64.model, cache)).logits
        second = sharp64.model(ids[:, 96:], **with_cache(sharp64.model, cache)).logits
    tolerance = rounding_tolerance(whole, model_chain(sharp64.model.config, SEQ))
    torch.testing.assert_close(torch.cat((first, second), dim=1), whole, atol=tolerance, rtol=0)


def test_lookups_are_per_layer_sorted_and_local(sharp64, ids):
    method = infllm(query_block=1)
    with method(sharp64) as installed, torch.no_grad():
        sharp64.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        trace = installed.trace()
    w, sink = SMALL["chunk_size"], SMALL["sink_tokens"] // SMALL["chunk_size"]
    for step, attended in enumerate(trace["steps"]):
        position = SEQ - 1 + step
        recent = (position - SMALL["recent_window"]) // w
        assert attended.shape == (2, 1, sink + SMALL["topk"] + position // w - recent + 1)  # layers x one lookup x blocks
        for row in attended.reshape(-1, attended.shape[-1]).tolist():
            assert row[:sink] == list(range(sink)) and row[-(position // w - recent + 1):] == list(range(recent, position // w + 1))
            retrieved = row[sink : sink + SMALL["topk"]]
            assert retrieved == sorted(set(retrieved)) and all(sink <= c < recent for c in retrieved)


def test_cpu_offload_gives_same_logits(sharp64, ids):
    expected = logits(sharp64, ids, infllm())
    torch.testing.assert_close(logits(sharp64, ids, infllm(cpu_offload=True)), expected, atol=0, rtol=0)


def test_remove_restores_model(sharp64, ids):
    before = logits(sharp64, ids)
    logits(sharp64, ids, infllm())
    assert sharp64.model.config._attn_implementation != "infllm"
    assert torch.equal(logits(sharp64, ids), before)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"sink_tokens": 12}, "sink_tokens .* multiple of chunk_size"),
        ({"recent_window": 36}, "recent_window .* multiple of chunk_size"),
        ({"query_block": 12}, "query_block"),
        ({"query_block": 64}, "must not exceed recent_window"),
        ({"repr_topk": 9}, "repr_topk"),
        ({"topk": 0}, "topk"),
        ({"sharing": "token"}, "sharing must be one of"),
        ({"positions": "nearest"}, "positions must be one of"),
    ],
)
def test_bad_parameters_give_one_line_errors(params, message):
    with pytest.raises(MethodError, match=message) as error:
        infllm(**params)
    assert "\n" not in str(error.value)


def test_defaults_are_the_releases_8k_config():
    """config/llama-3-inf-llm.yaml (Llama-3-8B, trained on 8k): the model size of the embedded SmolLM2."""
    method = InfLLM()
    assert (method.chunk_size, method.sink_tokens, method.recent_window, method.topk, method.repr_topk, method.query_block) == (
        128, 128, 4096, 16, 4, 512)
    assert method.attended_tokens == 128 + 16 * 128 + 4096
    assert (method.sharing, method.positions, method.summary) == ("layer", "one_distance", "representative_tokens")


def test_a_mix_through_the_seams(sharp64, ids):
    """LongHeads' selection (in-chunk summaries, per head) with InfLLM's positions: set by parameters, decodes as it
    prefills, and every key it reads sits within its one-chunk local window or at distance w - 1."""
    method = LongHeads(chunk_size=16, atten_length=64, query_block=1, exact_tail=0, positions="one_distance")
    assert method.largest_distance() == 15
    prefill = logits(sharp64, ids, method)
    assert not torch.allclose(prefill, logits(sharp64, ids, LongHeads(chunk_size=16, atten_length=64, query_block=1)), atol=1e-3)
    with method(sharp64) as installed, torch.no_grad():
        cache = installed.new_cache()
        sharp64.model(ids[:, :150], **with_cache(sharp64.model, cache))
        steps = [sharp64.model(ids[:, t : t + 1], **with_cache(sharp64.model, cache)).logits[:, -1] for t in range(150, SEQ)]
    tolerance = rounding_tolerance(prefill, model_chain(sharp64.model.config, SEQ))
    torch.testing.assert_close(torch.stack(steps, dim=1), prefill[:, 150:], atol=tolerance, rtol=0)


# --- real weights ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_finds_passkey_beyond_the_local_window(smollm2):
    """Real weights: a 1.5k prompt read through a 256-token local window and 4 retrieved blocks of 64 finds the key,
    and the layers look the key's block up."""
    from longctx.tasks.passkey import Passkey

    task = Passkey(lengths=[1536], num_samples=1, depths=[0.3])
    method = InfLLM(chunk_size=64, sink_tokens=64, recent_window=256, topk=4, query_block=128, exact_tail=1)
    with method(smollm2) as installed:
        metrics = task.run(smollm2, on_sample=lambda record: None)
        attended = installed.trace()["chosen"]
    assert metrics["accuracy"] == 1.0
    needle_block = task.samples(smollm2.tokenizer)[0].needle_token // 64
    assert (attended[:, :, 1:5] == needle_block).any(axis=-1).mean() > 0.2
