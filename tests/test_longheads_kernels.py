"""LongHeads' fast kernels against the reference formulation: the fused Triton kernel (interpreted on CPU, compiled on
a GPU), the stock-torch CPU kernel, and the growing cache that decoding writes into."""

import os

import pytest
import torch

from conftest import model_chain, rounding_tolerance, tiny_llama
from longctx.methods.base import with_cache
from longctx.methods.longheads import LongHeads
from longctx.methods.retrieval.geometry import Geometry
from longctx.methods.retrieval.kernels import attend_reference as reference_with_lse
from longctx.methods.retrieval.kernels import attend_torch
from longctx.methods.retrieval.selection import block_selection as select_with_units
from longctx.methods.retrieval.triton_kernel import shift_table, triton, triton_attend, triton_select

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
on_gpu = torch.cuda.is_available()
if not on_gpu:
    needs_triton = pytest.mark.skipif(
        triton is None or os.environ.get("TRITON_INTERPRET") != "1", reason="no GPU and not under TRITON_INTERPRET=1"
    )
DEVICE = "cuda" if on_gpu else "cpu"


# LongHeads on the shared retrieval kernels: the first chunk is the sink, the previous and current chunks the recent
# span (implied by the group's position), so a selection lists the first chunk and the K - 3 middle ones
def attend_reference(*args):
    return reference_with_lse(*args)[0]


def attend_slot_keys(*args):
    return attend_torch(*args)[0]


def block_selection(query, summaries, q_start, block, geometry, inv_freq):
    return select_with_units(query, summaries, q_start, block, geometry, query.shape[1], inv_freq)


def triton_selective_attention(query, keys, values, chosen, q_start, block, window, table, scaling, out):
    geometry = Geometry(window, 1, chosen.shape[-1] - 1, window, 0, block, 0, 2**20)
    inv_freq = INV_FREQ[query.shape[-1], table[0].shape[1]]
    triton_attend(query, keys, values, chosen, q_start, block, geometry, inv_freq, table, scaling, out)


def triton_block_selection(query, summaries, q_start, block, window, slots, inv_freq):
    geometry = Geometry(window, 1, slots - 3, window, 0, block, 0, 2**20)
    return triton_select(query, summaries, q_start, block, geometry, query.shape[1], inv_freq)


def triton_token_attention(query, keys, values, summaries, q_start, window, slots, inv_freq, table, scaling, out):
    geometry = Geometry(window, 1, slots - 3, window, 0, 1, 0, 2**20)
    chosen = triton_select(query, summaries, q_start, 1, geometry, query.shape[1], inv_freq)
    triton_attend(query, keys, values, chosen, q_start, 1, geometry, inv_freq, table, scaling, out)
    return chosen


INV_FREQ = {}  # (head dim, rotary half-dims) -> the case's frequencies, for the Triton wrappers above


def random_selection(q_start: int, q_len: int, block: int, window: int, slots: int, heads: int, seed: int):
    """A valid choice per (head, block): first chunk, sorted distinct middle chunks (previous and current implied)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-q_len // block)
    chosen = torch.empty(1, heads, blocks, slots - 2, dtype=torch.long)
    for g in range(blocks):
        current = (q_start + g * block) // window
        for h in range(heads):
            middle = torch.randperm(current - 2, generator=generator)[: slots - 3] + 1
            chosen[0, h, g] = torch.tensor([0, *sorted(middle.tolist())])
    return chosen


def case(window, slots, dim, q_heads, kv_heads, kv_len, q_len, block, rotary_half=None, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q_start = kv_len - q_len
    query = torch.randn(1, q_heads, q_len, dim, generator=generator).to(DEVICE, dtype)
    keys = torch.randn(1, kv_heads, kv_len, dim, generator=generator).to(DEVICE, dtype)
    values = torch.randn(1, kv_heads, kv_len, dim, generator=generator).to(DEVICE, dtype)
    inv_freq = 1.0 / (1000.0 ** (torch.arange(rotary_half or dim // 2, dtype=torch.float32) / (rotary_half or dim // 2)))
    chosen = random_selection(q_start, q_len, block, window, slots, q_heads, seed).to(DEVICE)
    geometry = Geometry(window, 1, slots - 3, window, slots * window, block, 0, 2**20)
    INV_FREQ[dim, inv_freq.numel()] = inv_freq.to(DEVICE)
    return query, keys, values, chosen, q_start, geometry, inv_freq.to(DEVICE)


def kernel_tolerance(out: torch.Tensor, slots: int, window: int) -> float:
    """How far the kernel in `out`'s dtype may be from the float32 reference on the same (rounded) inputs: the
    kernel rounds the turned query and the probabilities to the dtype before its dot products, which then sum over
    the head dim and over every attended key (slots * window), so the longest chain of roundings is their sum plus
    the head dim; the reference's own float32 rounding is smaller and covered by the factor 2 in the bound."""
    return rounding_tolerance(out, slots * window + 2 * out.shape[-1])


CASES = [  # window, slots, head dim, query heads, kv heads, kv_len, q_len, block (+ rotary half-dims); groups start at
    # multiples of the block, as the method always makes them
    dict(window=16, slots=4, dim=16, q_heads=2, kv_heads=2, kv_len=160, q_len=96, block=16),  # MHA, aligned
    dict(window=16, slots=5, dim=32, q_heads=4, kv_heads=2, kv_len=148, q_len=68, block=4),  # GQA 2, partial chunk
    dict(window=32, slots=3, dim=16, q_heads=3, kv_heads=1, kv_len=200, q_len=40, block=8),  # MQA, unaligned length
    dict(window=16, slots=4, dim=16, q_heads=4, kv_heads=2, kv_len=150, q_len=7, block=1),  # per-token queries
    dict(window=16, slots=4, dim=16, q_heads=2, kv_heads=1, kv_len=133, q_len=1, block=1),  # one decoding step
    dict(window=16, slots=4, dim=24, q_heads=2, kv_heads=1, kv_len=140, q_len=12, block=4, rotary_half=8),  # partial rotary, odd dim
]


@needs_triton
@pytest.mark.parametrize("params", CASES, ids=lambda p: f"w{p['window']}K{p['slots']}D{p['dim']}G{p['q_heads']}/{p['kv_heads']}b{p['block']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if on_gpu else []))
def test_triton_kernel_matches_reference(params, dtype):
    params = dict(params)
    block, rotary_half = params.pop("block"), params.pop("rotary_half", None)
    query, keys, values, chosen, q_start, geometry, inv_freq = case(
        **params, block=block, rotary_half=rotary_half, dtype=dtype
    )
    scaling = query.shape[-1] ** -0.5
    expected = attend_reference(query.float(), keys.float(), values.float(), chosen, q_start, block, geometry, inv_freq, scaling)
    out = torch.empty(1, query.shape[2], query.shape[1], query.shape[3], dtype=dtype, device=DEVICE)
    table = shift_table(inv_freq, geometry.window, keys.shape[2] // geometry.window + 2, query.device)
    triton_selective_attention(query, keys, values, chosen, q_start, block, geometry.window, table, scaling, out)
    tolerance = kernel_tolerance(out, geometry.slots + 2, geometry.window)
    error = (out.transpose(1, 2).float() - expected).abs().max().item()
    assert error < tolerance, error


TOKEN_CASES = [  # window, slots, head dim, query heads, kv heads, kv_len, q_len (+ rotary half-dims)
    dict(window=16, slots=4, dim=16, q_heads=4, kv_heads=2, kv_len=150, q_len=7),  # exact tail, partial chunk
    dict(window=16, slots=5, dim=32, q_heads=2, kv_heads=1, kv_len=133, q_len=1),  # one decoding step
    dict(window=32, slots=4, dim=24, q_heads=3, kv_heads=3, kv_len=700, q_len=40, rotary_half=8),  # 21 chunks to rank
]


@needs_triton
@pytest.mark.parametrize("params", TOKEN_CASES, ids=lambda p: f"w{p['window']}K{p['slots']}D{p['dim']}L{p['q_len']}")
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if on_gpu else []))
def test_triton_token_kernel_selects_and_attends_like_reference(params, dtype):
    """Decoding's fused kernel: the same chunks as the torch selection, the same output as the reference."""
    params = dict(params)
    rotary_half = params.pop("rotary_half", None)
    query, keys, values, _, q_start, geometry, inv_freq = case(**params, block=1, rotary_half=rotary_half, dtype=dtype)
    done = keys.shape[2] // geometry.window
    summaries = torch.randn(1, query.shape[1], done, query.shape[3], generator=torch.Generator().manual_seed(9)).to(DEVICE)
    scaling = query.shape[-1] ** -0.5
    geometry = Geometry(geometry.window, 1, geometry.top_k, geometry.window, geometry.begin, 1, 0, 2**20)
    expected_chosen = block_selection(query, summaries, q_start, 1, geometry, inv_freq)
    expected = attend_reference(
        query.float(), keys.float(), values.float(), expected_chosen, q_start, 1, geometry, inv_freq, scaling
    )
    out = torch.empty(1, query.shape[2], query.shape[1], query.shape[3], dtype=dtype, device=DEVICE)
    table = shift_table(inv_freq, geometry.window, done + 2, query.device)
    chosen = triton_token_attention(
        query, keys, values, summaries, q_start, geometry.window, geometry.slots + 2, inv_freq, table, scaling, out
    )
    agree = (chosen.long() == expected_chosen).all(dim=-1).float().mean().item()
    assert agree >= (1.0 if dtype == torch.float32 else 0.95), agree  # bf16 queries may flip a near tie
    same = (chosen.long() == expected_chosen).all(dim=-1)  # [1, Hq, L]
    error = (out.transpose(1, 2).float() - expected).abs().amax(dim=-1)[same].max().item()
    assert error < kernel_tolerance(out, geometry.slots + 2, geometry.window), error


@needs_triton
@pytest.mark.parametrize("params", [p for p in CASES if p["block"] > 1], ids=lambda p: f"w{p['window']}b{p['block']}")
def test_triton_block_selection_matches_torch_selection(params):
    params = dict(params)
    block, rotary_half = params.pop("block"), params.pop("rotary_half", None)
    query, keys, _, _, q_start, geometry, inv_freq = case(**params, block=block, rotary_half=rotary_half)
    done = keys.shape[2] // geometry.window
    summaries = torch.randn(1, query.shape[1], done, query.shape[3], generator=torch.Generator().manual_seed(5)).to(DEVICE)
    expected = block_selection(query, summaries, q_start, block, geometry, inv_freq)
    got = triton_block_selection(query, summaries, q_start, block, geometry.window, geometry.slots + 2, inv_freq)
    assert torch.equal(got.long(), expected)


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"w{p['window']}b{p['block']}L{p['q_len']}")
def test_torch_kernel_matches_reference(params):
    params = dict(params)
    block, rotary_half = params.pop("block"), params.pop("rotary_half", None)
    query, keys, values, chosen, q_start, geometry, inv_freq = case(**params, block=block, rotary_half=rotary_half)
    query, keys, values, chosen, inv_freq = (t.cpu() for t in (query, keys, values, chosen, inv_freq))
    scaling = query.shape[-1] ** -0.5
    expected = attend_reference(query, keys, values, chosen, q_start, block, geometry, inv_freq, scaling)
    got = attend_slot_keys(query, keys, values, chosen, q_start, block, geometry, inv_freq, scaling)
    # the same attention in another order. Its output is a convex combination of values (rounded over D + n terms),
    # and a score off by e relative moves the weights by scaling |q| |k| e; e is bounded over the same chain, where
    # RoPE's angles p * f <= p radians count as p roundings (see conftest.model_chain)
    chain = query.shape[-1] + keys.shape[-2] + 2 * (q_start + query.shape[-2])
    score_size = scaling * float(query.norm(dim=-1).max() * keys.norm(dim=-1).max())
    tolerance = rounding_tolerance(values, chain) * (1 + score_size)
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


W, A = 16, 64


def run_tiny(kernel: str, ids: torch.Tensor):
    lm = tiny_llama()
    method = LongHeads(chunk_size=W, atten_length=A, query_block=4, exact_tail=8, record_selection=True, kernel=kernel)
    with method(lm) as installed, torch.no_grad():
        logits = lm.model(ids).logits
        chosen = installed.trace()["chosen"]
    return logits, chosen


def test_torch_kernel_equals_reference_on_the_model():
    ids = torch.randint(0, 128, (1, 230), generator=torch.Generator().manual_seed(3))
    fast_logits, fast_chosen = run_tiny("torch", ids)
    reference_logits, reference_chosen = run_tiny("reference", ids)
    assert (fast_chosen == reference_chosen).all()
    tolerance = rounding_tolerance(reference_logits, model_chain(tiny_llama().model.config, 230))
    torch.testing.assert_close(fast_logits, reference_logits, atol=tolerance, rtol=0)


def test_decoding_writes_in_place_and_the_cache_grows_geometrically():
    lm = tiny_llama()
    method = LongHeads(chunk_size=W, atten_length=A, query_block=4, exact_tail=8)
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    with method(lm) as installed, torch.no_grad():
        cache = installed.new_cache()
        lm.model(ids, **with_cache(lm.model, cache))
        layer = cache.layers[0]
        capacities, pointers = [layer.key_store.shape[-2]], [layer.key_store.data_ptr()]
        for token in range(200):
            lm.model(ids[:, token % 100 : token % 100 + 1], **with_cache(lm.model, cache))
            capacities.append(layer.key_store.shape[-2])
            pointers.append(layer.key_store.data_ptr())
    assert layer.keys.shape[-2] == 300 and layer.keys.data_ptr() == layer.key_store.data_ptr()
    growths = [i for i in range(1, len(capacities)) if capacities[i] != capacities[i - 1]]
    assert 1 <= len(growths) <= 5  # 100 -> 300 tokens: a few reallocations, not one per token
    assert all(pointers[i] == pointers[i - 1] for i in range(1, len(pointers)) if i not in growths)
    assert all(c % W == 0 for c in capacities) and all(b >= 1.25 * a - W for a, b in zip(capacities, capacities[1:]) if b != a)


def test_unknown_kernel_is_refused():
    from longctx.methods.base import MethodError

    with pytest.raises(MethodError, match="kernel must be one of"):
        LongHeads(kernel="cuda")


@needs_triton
def test_triton_kernel_equals_reference_on_the_model(monkeypatch):
    """The whole model through the Triton kernels (selection and attention; interpreted without a GPU, which the
    method itself never does) against the reference kernel: the same chunks, the same logits up to float32 rounding."""
    import longctx.methods.retrieval.attention as attention
    import longctx.methods.retrieval.method as method

    if not on_gpu:
        for module in (attention, method):
            monkeypatch.setattr(module, "triton_available", lambda device: True)
    ids = torch.randint(0, 128, (1, 230), generator=torch.Generator().manual_seed(3))
    triton_logits, triton_chosen = run_tiny("triton", ids)
    reference_logits, reference_chosen = run_tiny("reference", ids)
    assert (triton_chosen == reference_chosen).all()
    tolerance = rounding_tolerance(reference_logits, model_chain(tiny_llama().model.config, 230))
    torch.testing.assert_close(triton_logits, reference_logits, atol=tolerance, rtol=0)


def test_torch_kernel_serves_every_query_count_itself(monkeypatch):
    """kernel=torch runs the torch kernel for a decoding step too (it used to fall back to the reference kernel below
    16 queries without saying so), and leaves torch's thread count as it found it."""
    import longctx.methods.retrieval.attention as attention

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference kernel ran")

    monkeypatch.setattr(attention, "attend_reference", no_reference)
    lm = tiny_llama()
    method = LongHeads(chunk_size=W, atten_length=A, query_block=4, exact_tail=8, kernel="torch")
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    with method(lm) as installed, torch.no_grad():
        cache = installed.new_cache()
        lm.model(ids, **with_cache(lm.model, cache))
        lm.model(ids[:, :1], **with_cache(lm.model, cache))  # one decoding step
    assert torch.get_num_threads() == threads
