"""LongHeads against a deliberately plain reference, and its promised properties."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import logits, model_chain, rounding_tolerance, tiny_llama
from longctx.models import LoadedModel
from longctx.methods.base import MethodError, with_cache
from longctx.methods.longheads import LongHeads

W, A = 16, 64  # chunk length and attended tokens on the tiny model: K = 4 slots, selection from position 64 on
SEQ = 200


def lh(**params) -> LongHeads:
    """LongHeads at the tiny model's scale (the defaults are for 4k-token heads)."""
    return LongHeads(**{"chunk_size": W, "atten_length": A, "query_block": 4, "exact_tail": 8, **params})


def plain_rope(module_holder, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Rotate x [n, D] to `positions` with the model's own rotary module (negative positions un-rotate)."""
    ids = torch.tensor([positions])
    cos, sin = module_holder.model.rotary_emb(x[None], position_ids=ids)
    rotated, _ = apply_rotary_pos_emb(x[None, None], x[None, None], cos, sin)
    return rotated[0, 0]


def reference_attention(lm, module, query, key, value, scaling):
    """Token by token, head by head: summaries, selection, gather and RoPE written out in full (prefill from 0)."""
    _, q_heads, n, dim = query.shape
    group = q_heads // key.shape[1]
    slots = A // W
    out = torch.zeros_like(query)
    rope = lambda x, pos: plain_rope(lm.model, x, pos)  # noqa: E731
    for h in range(q_heads):
        q_abs, k_abs, v = query[0, h], key[0, h // group], value[0, h // group]
        q_raw = torch.stack([rope(q_abs[p : p + 1], [-p])[0] for p in range(n)])
        k_raw = torch.stack([rope(k_abs[p : p + 1], [-p])[0] for p in range(n)])
        summaries = []
        for c in range(n // W):
            local = list(range(W))
            qc, kc = rope(q_raw[c * W : (c + 1) * W], local), rope(k_raw[c * W : (c + 1) * W], local)
            inner = torch.softmax(qc @ kc.T * scaling, dim=-1) @ v[c * W : (c + 1) * W]
            u = inner.mean(dim=0)
            summaries.append(torch.softmax(u @ kc.T * scaling, dim=-1) @ kc)
        for p in range(n):
            if p < A:
                weights = torch.softmax(q_abs[p] @ k_abs[: p + 1].T * scaling, dim=-1)
                out[0, h, p] = weights @ v[: p + 1]
                continue
            j, offset = divmod(p, W)
            scores = {c: float(q_raw[p] @ summaries[c]) for c in range(1, j - 1)}
            middle = sorted(sorted(scores, key=scores.get, reverse=True)[: slots - 3])
            chosen = [0, *middle, j - 1, j]
            keys, values, positions = [], [], []
            for slot, c in enumerate(chosen):
                last = offset + 1 if c == j else W
                keys.append(k_raw[c * W : c * W + last])
                values.append(v[c * W : c * W + last])
                positions += [slot * W + t for t in range(last)]
            ks = rope(torch.cat(keys), positions)
            qs = rope(q_raw[p : p + 1], [(slots - 1) * W + offset])[0]
            assert max((slots - 1) * W + offset - pos for pos in positions) < A
            weights = torch.softmax(qs @ ks.T * scaling, dim=-1)
            out[0, h, p] = weights @ torch.cat(values)
    return out.transpose(1, 2), None


@pytest.fixture
def ids():
    return torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))


def test_within_atten_length_equals_full_attention(tiny, ids):
    short = ids[:, :A]
    expected = logits(tiny, short)
    tolerance = rounding_tolerance(expected, model_chain(tiny.model.config, A))
    torch.testing.assert_close(logits(tiny, short, lh()), expected, atol=tolerance, rtol=0)


def test_beyond_atten_length_differs_from_full_attention(tiny, ids):
    assert not torch.allclose(logits(tiny, ids, lh()), logits(tiny, ids), atol=1e-3)


def test_token_level_prefill_equals_plain_reference(tiny, ids):
    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return reference_attention(tiny, module, query, key, value, scaling)

    AttentionInterface.register("longheads_reference", reference)
    previous = tiny.model.config._attn_implementation
    tiny.model.set_attn_implementation("longheads_reference")
    try:
        expected = logits(tiny, ids)
    finally:
        tiny.model.set_attn_implementation(previous)
    got = logits(tiny, ids, lh(query_block=1))
    tolerance = rounding_tolerance(expected, model_chain(tiny.model.config, SEQ))
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


def test_block_path_keeps_exact_tail_and_differs_in_bulk(tiny, ids):
    per_token = logits(tiny, ids, lh(query_block=1))
    block = logits(tiny, ids, lh(query_block=W, exact_tail=0))
    assert not torch.allclose(block, per_token, atol=1e-4)  # block selection is a real approximation...
    one_block_per_query = logits(tiny, ids, lh(query_block=1, exact_tail=0))
    # ...and block size 1 is per-token selection, through the other code path: rounding only
    tolerance = rounding_tolerance(per_token, model_chain(tiny.model.config, SEQ))
    torch.testing.assert_close(one_block_per_query, per_token, atol=tolerance, rtol=0)


def test_forced_chunks_and_distances(tiny, ids):
    method = lh(query_block=4, record_selection=True)
    with method(tiny) as installed, torch.no_grad():
        tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        trace = installed.trace()
    slots = A // W
    assert len(trace["steps"]) == 20  # one per generated token: prefill's last query, then 19 decode steps
    for step, chosen in enumerate(trace["steps"]):
        position = SEQ - 1 + step
        current = position // W
        assert chosen.shape == (2, 4, slots)  # layers x query heads x slots
        for row in chosen.reshape(-1, slots).tolist():
            assert row[0] == 0 and row[-2:] == [current - 1, current]
            assert row == sorted(set(row))  # distinct, original order
            # remapped: slot i starts at i*w, query at (K-1)*w + its offset -> largest distance is to slot 0's start
            assert (slots - 1) * W + position % W < A


def test_heads_choose_differently(tiny, ids):
    method = lh(query_block=1, record_selection=True)
    with method(tiny) as installed, torch.no_grad():
        tiny.model(ids)
    chosen = installed.trace()["chosen"]
    assert len({tuple(row) for row in chosen.reshape(-1, chosen.shape[-1]).tolist()}) > 1


def test_decoding_equals_prefill_at_same_position(tiny, ids):
    """Per-token selection: decoding reproduces prefill exactly (documented difference: float rounding only)."""
    method = lh(query_block=1)
    full_prefill = logits(tiny, ids, method)
    with method(tiny) as installed, torch.no_grad():
        cache = installed.new_cache()
        tiny.model(ids[:, :130], **with_cache(tiny.model, cache))  # 130: mid-chunk, past the selective start
        steps = [tiny.model(ids[:, t : t + 1], **with_cache(tiny.model, cache)).logits[:, -1] for t in range(130, SEQ)]
    tolerance = rounding_tolerance(full_prefill, model_chain(tiny.model.config, SEQ))
    torch.testing.assert_close(torch.stack(steps, dim=1), full_prefill[:, 130:], atol=tolerance, rtol=0)


@pytest.fixture
def sharp() -> LoadedModel:
    """Weights large enough that the context moves the logits: a mixed-up cache shows."""
    return tiny_llama(initializer_range=0.2)


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_batch_of_two_equals_two_single_runs(sharp, kernel):
    """Two equal-length sequences in one batch: each gets its own chunk selection, in prefill and in decoding."""
    tiny = sharp
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(2))
    method = lh(kernel=kernel)  # block selection in the bulk of the prefill, per token in its tail and in decoding

    def prefill_then_decode(batch: torch.Tensor) -> torch.Tensor:
        cache = installed.new_cache()
        prefill = tiny.model(batch[:, :150], **with_cache(tiny.model, cache)).logits
        steps = [tiny.model(batch[:, t : t + 1], **with_cache(tiny.model, cache)).logits for t in range(150, SEQ)]
        return torch.cat([prefill, *steps], dim=1)

    with method(tiny) as installed, torch.no_grad():
        together = prefill_then_decode(ids)
        alone = torch.cat([prefill_then_decode(ids[b : b + 1]) for b in range(2)])
    # the same arithmetic per sequence; a batched matmul may only sum in another order
    tolerance = rounding_tolerance(alone, model_chain(tiny.model.config, SEQ))
    torch.testing.assert_close(together, alone, atol=tolerance, rtol=0)
    assert (together[0] - together[1]).abs().max() > 100 * tolerance  # two different sequences, not one copied


def test_beam_search_scores_equal_each_beams_own_prefill(sharp, ids):
    """Beam search reorders the cache every step: the keys and the chunk summaries must follow their beam. Each
    returned beam's score (the sum of its tokens' log-probabilities, length_penalty 0) must then equal what a LongHeads
    prefill of that beam's whole sequence gives (per-token selection: decoding equals prefill). With the cache left in
    its old order the scores were off by 1.9."""
    tiny = sharp
    method = lh(query_block=1)
    prompt = ids[:, :150]
    with method(tiny), torch.no_grad():
        out = tiny.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), num_beams=3, num_return_sequences=3, do_sample=False,
            max_new_tokens=12, min_new_tokens=12, length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
        )
        rescored = []
        for sequence in out.sequences:
            log_probs = tiny.model(sequence[None]).logits[0].log_softmax(dim=-1)
            rescored.append(sum(log_probs[t - 1, sequence[t]] for t in range(150, sequence.shape[0])))
    assert len({tuple(sequence.tolist()) for sequence in out.sequences}) == 3
    # 12 log-softmax values, each within the model's rounding bound
    tolerance = 12 * rounding_tolerance(torch.stack(rescored), model_chain(tiny.model.config, SEQ))
    torch.testing.assert_close(out.sequences_scores, torch.stack(rescored), atol=tolerance, rtol=0)


def test_cpu_offload_gives_same_logits(tiny, ids):
    method = lh(query_block=4, cpu_offload=True)
    expected = logits(tiny, ids, lh(query_block=4))
    torch.testing.assert_close(logits(tiny, ids, method), expected, atol=0, rtol=0)  # the same arithmetic, elsewhere
    with method(tiny) as installed, torch.no_grad():
        cache = installed.new_cache()
        tiny.model(ids[:, :150], **with_cache(tiny.model, cache))
        assert all(layer.keys.device.type == "cpu" for layer in cache.layers)
        assert all(layer.host for layer in cache.layers)


def test_remove_restores_model(tiny, ids):
    before = logits(tiny, ids)
    method = lh()
    logits(tiny, ids, method)
    assert tiny.model.config._attn_implementation != "longheads"
    assert torch.equal(logits(tiny, ids), before)


def test_generate_runs_beyond_pretrained_length():
    lm = tiny_llama(max_positions=64)
    ids = torch.randint(0, 128, (1, 300))
    with lh()(lm), torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 305)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"chunk_size": 16, "atten_length": 72}, "multiple of chunk_size"),
        ({"chunk_size": 16, "atten_length": 32}, "first, previous, current"),
        ({"chunk_size": 16, "atten_length": 64, "begin_selective_length": 48}, ">= atten_length"),
        ({"chunk_size": 16, "atten_length": 64, "query_block": 5}, "must divide"),
    ],
)
def test_bad_parameters_give_clear_errors(params, message):
    with pytest.raises(MethodError, match=message):
        LongHeads(**params)


def test_rope_scaling_combines_and_dynamic_ntk_is_refused(tiny, ids):
    untouched = logits(tiny, ids)
    plain = logits(tiny, ids, lh())
    with_pi = logits(tiny, ids, lh(rope_scaling={"name": "pi", "factor": 2.0}))
    assert not torch.allclose(with_pi, plain, atol=1e-4)  # PI really reaches the heads' remapped positions
    assert torch.equal(logits(tiny, ids), untouched)  # and leaves with LongHeads
    with pytest.raises(MethodError, match="dynamic ntk"):  # when the method is built, before any model loads
        lh(rope_scaling={"name": "ntk", "factor": 2.0})


def test_model_without_rope_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from longctx.models import LoadedModel

    gpt2 = LoadedModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), None, "gpt2", 1024)
    with pytest.raises(MethodError, match="RoPE"):
        with lh()(gpt2):
            pass


def test_atten_length_above_pretrained_warns(tiny, caplog):
    lh(atten_length=4 * tiny.pretrained_length).plan(tiny, 1000)
    assert "exceeds the trained length" in caplog.text


def test_padded_batch_is_refused(tiny, ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with lh()(tiny), pytest.raises(MethodError, match="padded"):
        tiny.model(ids, attention_mask=mask)


@pytest.mark.slow
def test_embedded_model_finds_passkey_beyond_atten_length(smollm2):
    """Real weights: a 1.5k prompt read through 512-token heads (selection active for 2/3 of it) still finds the key."""
    from longctx.tasks.passkey import Passkey

    task = Passkey(lengths=[1536], num_samples=1, depths=[0.3])
    method = LongHeads(chunk_size=64, atten_length=512, query_block=16, record_selection=True)
    with method(smollm2) as installed:
        metrics = task.run(smollm2, on_sample=lambda record: None)
        chosen = installed.trace()["chosen"]
    assert metrics["accuracy"] == 1.0
    needle_chunk = task.samples(smollm2.tokenizer)[0].needle_token // 64
    assert (chosen == needle_chunk).any(axis=-1).mean() > 0.2  # many heads went and looked at the key
