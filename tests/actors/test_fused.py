"""Fused layers (`actors.fused`, `actors/native/layer_ops.c`): each native op against the
torch it replaces, the same bits in every instruction-set variant and thread count, and a
fused model that decodes as the torch layers do and stays row-exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_native import random_blocks

from actors import fused, loading, native
from actors.layers import rotate_half
from actors.native import layer
from actors.quantized import QuantLinear, QuantWeight

import tiny

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernels")

VARIANTS = native.runnable_variants()
GEN = torch.Generator().manual_seed(0)


def quant_linear(qtype: int, n: int, k: int, seed: int, bias: bool = False) -> QuantLinear:
    blocks = torch.from_numpy(random_blocks(qtype, n, k, seed=seed))
    b = torch.randn(n, generator=GEN) if bias else None
    return QuantLinear(QuantWeight(blocks, qtype, n, k), b)


def test_one_product_of_several_weights_is_each_weight_alone_bitwise():
    k = 512
    lins = [quant_linear(native.Q4_K, 48, k, 1, bias=True), quant_linear(native.Q8_0, 16, k, 2, bias=True),
            quant_linear(native.Q6_K, 16, k, 3)]  # mixed block sizes: x is quantized per size
    prod = layer.Products(lins)
    x = torch.randn(5, k, generator=GEN)
    want = torch.cat([lin(x) for lin in lins], dim=1)
    assert torch.equal(prod(x), want)
    res = torch.randn(5, 80, generator=GEN)
    assert torch.equal(prod(x, residual=res), res + want)
    with pytest.raises(ValueError, match="x must be"):
        prod(torch.randn(5, k + 32))
    with pytest.raises(ValueError, match="residual must be"):
        prod(x, residual=torch.randn(5, 79))


def test_rmsnorm_and_swiglu_match_torch():
    x, w = torch.randn(7, 96, generator=GEN) * 3, torch.randn(96, generator=GEN)
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(layer.rmsnorm(x, w, 1e-6), want, rtol=1e-5, atol=1e-5)
    gu = torch.randn(3, 2 * 40, generator=GEN) * 4
    gu[0, 0], gu[0, 1] = -200.0, 200.0  # the exponential's clamps
    torch.testing.assert_close(layer.swiglu(gu), F.silu(gu[:, :40]) * gu[:, 40:], rtol=1e-5, atol=1e-6)


def test_rope_and_cache_write_are_torchs_bits():
    H, Hkv, D, T, cap, start = 4, 2, 16, 3, 12, 5
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=GEN)
    pos = torch.tensor([5, 6, 6])[:, None].float() * torch.rand(D // 2, generator=GEN)[None]
    emb = torch.cat((pos, pos), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    kc, vc = torch.zeros(Hkv, cap, D), torch.zeros(Hkv, cap, D)
    q = qkv[:, :H * D].reshape(T, H, D).transpose(0, 1)
    k = qkv[:, H * D:(H + Hkv) * D].reshape(T, Hkv, D).transpose(0, 1)
    v = qkv[:, (H + Hkv) * D:].reshape(T, Hkv, D).transpose(0, 1)
    q_want, k_want, v_want = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v.clone()
    layer.rope_store(qkv, cos, sin, kc, vc, start, H, Hkv, D)
    assert torch.equal(qkv[:, :H * D].reshape(T, H, D).transpose(0, 1), q_want)
    assert torch.equal(kc[:, start:start + T], k_want) and torch.equal(vc[:, start:start + T], v_want)
    assert not kc[:, :start].any() and not kc[:, start + T:].any()
    with pytest.raises(ValueError, match="past"):
        layer.rope_store(qkv, cos, sin, kc, vc, cap - 1, H, Hkv, D)


def sdpa_row(q, kc, vc, slots, H, Hkv, D):
    keys = kc[:, slots] if not isinstance(slots, slice) else kc[:, slots]
    vals = vc[:, slots] if not isinstance(slots, slice) else vc[:, slots]
    o = F.scaled_dot_product_attention(q.reshape(1, H, 1, D), keys[None], vals[None], enable_gqa=True)
    return o.reshape(H * D)


@pytest.mark.parametrize("length", [9, 3000])  # the long one runs on threads
def test_row_attention_matches_sdpa_and_is_the_same_bits_alone_or_batched(length):
    H, Hkv, D = 6, 2, 32
    kc, vc = torch.randn(Hkv, length + 8, D, generator=GEN), torch.randn(Hkv, length + 8, D, generator=GEN)
    rows = [slice(0, length), torch.tensor([*range(length - 1), length + 2]), slice(0, length + 1)]
    q = torch.randn(3, H * D, generator=GEN)
    table = layer.slot_table(rows)
    out = layer.attend_rows(q, table, kc, vc, H, Hkv, D, D ** -0.5, threads=2)
    for t, slots in enumerate(rows):
        torch.testing.assert_close(out[t], sdpa_row(q[t], kc, vc, slots, H, Hkv, D), rtol=1e-4, atol=1e-5)
        alone = layer.attend_rows(q[t:t + 1], layer.slot_table([slots]), kc, vc, H, Hkv, D, D ** -0.5, threads=1)
        assert torch.equal(alone[0], out[t])


@pytest.mark.skipif(len(VARIANTS) < 2, reason="one instruction-set variant here")
def test_every_variant_gives_the_layer_ops_the_same_bits(monkeypatch):
    H, Hkv, D, k = 4, 2, 16, 256
    x, w = torch.randn(3, k, generator=GEN), torch.randn(k, generator=GEN)
    gu = torch.randn(3, 2 * k, generator=GEN)
    kc, vc = torch.randn(Hkv, 40, D, generator=GEN), torch.randn(Hkv, 40, D, generator=GEN)
    q = torch.randn(2, H * D, generator=GEN)
    table = layer.slot_table([slice(0, 37), torch.tensor([0, 3, 7, 39])])
    lins = [quant_linear(native.Q4_K, 32, k, 4), quant_linear(native.Q5_0, 32, k, 5)]
    outs = {}
    for v in VARIANTS:
        monkeypatch.setenv(native.ISA_ENV, v)
        outs[v] = (layer.rmsnorm(x, w, 1e-6), layer.swiglu(gu), layer.attend_rows(q, table, kc, vc, H, Hkv, D, 0.25),
                   layer.Products(lins)(x))
    first = outs[VARIANTS[0]]
    for v in VARIANTS[1:]:
        for a, b in zip(first, outs[v]):
            assert torch.equal(a, b), v


@pytest.fixture(scope="module")
def tiny_q4k(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return tiny.make_tiny_gguf(root / "qwen2-q4k", "qwen2", "Q4_K", "Q6_K", hidden_size=256, intermediate_size=512)


def test_a_fused_model_decodes_as_the_torch_layers_do(tiny_q4k, monkeypatch):
    model = loading.load(str(tiny_q4k), "gguf", progress=False).build()
    assert fused.applies(model) and model.fused_layers()
    prompt = torch.randint(2, 64, (11,), generator=GEN)

    def logits(enabled: str):
        monkeypatch.setenv(fused.ENV, enabled)
        model._fused = None
        cache = model.new_cache(32)
        rows = [model.forward(prompt, cache)]
        for tok in (5, 9, 13):
            rows.append(model.forward(torch.tensor([tok]), cache))
        return torch.cat(rows)

    with_fused, with_torch = logits("1"), logits("0")
    assert model._fused == []  # the switch took
    # int8-rounded activations let a last-bit difference move a code now and then: close, not equal
    torch.testing.assert_close(with_fused, with_torch, rtol=0.05, atol=0.05 * float(with_torch.abs().max()))
    assert (with_fused.argmax(-1) == with_torch.argmax(-1)).float().mean() > 0.9


def test_models_it_cannot_run_keep_the_torch_layers(tmp_path):
    gemma = loading.load(str(tiny.make_tiny_gguf(tmp_path / "g", "gemma3", "Q8_0", "Q8_0")), "gguf",
                         progress=False).build()
    assert not fused.applies(gemma) and gemma.fused_layers() is None
    dense = loading.load(str(tiny.make_tiny(tmp_path / "q", "qwen2")), "float32", progress=False).build()
    assert not fused.applies(dense)
    int8 = loading.load(str(tmp_path / "q"), "int8", progress=False).build()  # quantized here: fused too
    assert fused.applies(int8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_layer_stack_gives_the_per_layer_calls_bits(tiny_q4k, monkeypatch, variant):
    """One native call for all layers (`FusedStack`) against the per-layer calls: decoding
    steps, a tree verify and a batch of two sequences, bitwise, in every instruction-set
    variant this CPU runs; prompt chunks keep the per-layer path."""
    from actors.model import BatchItem

    monkeypatch.setenv(native.ISA_ENV, variant)
    model = loading.load(str(tiny_q4k), "gguf", progress=False).build()
    prompt = torch.randint(2, 64, (11,), generator=GEN)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)

    def run(mode: str) -> list[torch.Tensor]:
        monkeypatch.setenv(fused.ENV, mode)
        model._fused = None
        assert model.fused_layers() and (model._fused_stack is not None) == (mode == "1")
        a, b = model.new_cache(40), model.new_cache(40)
        out = [model.forward(prompt, a), model.forward(prompt[:7], b)]
        for tok in (5, 9):
            out.append(model.forward(torch.tensor([tok]), a))
        out.append(model.forward(torch.tensor([3, 4, 8, 2]), a, tree_mask=tree))
        out += model.forward_batch([BatchItem(torch.tensor([6]), a), BatchItem(torch.tensor([7, 1, 2]), b)])
        return out + [a.k[:, :, :, :a.length], b.v[:, :, :, :b.length]]

    calls = []
    monkeypatch.setattr(fused.FusedStack, "__call__", lambda self, x, segs, _f=fused.FusedStack.__call__:
                        calls.append(len(segs)) or _f(self, x, segs))
    stacked, layers = run("1"), run("layers")
    assert calls == [1, 1, 1, 2]  # the two steps, the verify, the batch; not the prompts
    for got, want in zip(stacked, layers):
        assert torch.equal(got, want)


def test_the_stack_names_what_is_wrong_with_its_arguments(tiny_q4k, monkeypatch):
    monkeypatch.setenv(fused.ENV, "1")
    model = loading.load(str(tiny_q4k), "gguf", progress=False).build()
    assert model.fused_layers()
    stack, cfg = model._fused_stack.stack, model.config
    cache = model.new_cache(8)
    cos, sin = torch.zeros(1, cfg.head_dim), torch.zeros(1, cfg.head_dim)
    table = layer.slot_table([slice(0, 1)])
    x = torch.randn(1, cfg.hidden_size)
    with pytest.raises(ValueError, match="x must be"):
        stack(torch.randn(1, cfg.hidden_size + 1), [(0, 1, 0, cache.k, cache.v, cos, sin, table)])
    with pytest.raises(ValueError, match="cover the rows in order"):
        stack(x, [(1, 1, 0, cache.k, cache.v, cos, sin, table)])
    with pytest.raises(ValueError, match="KV cache must be contiguous"):
        stack(x, [(0, 1, 0, cache.k[:, :, :, :4], cache.v[:, :, :, :4], cos, sin, table)])
    with pytest.raises(ValueError, match="past its 8"):
        stack(x, [(0, 1, 8, cache.k, cache.v, cos, sin, table)])
    with pytest.raises(ValueError, match="cover 1 rows of 2"):
        stack(torch.randn(2, cfg.hidden_size), [(0, 1, 0, cache.k, cache.v, cos, sin, table)])


def test_two_threads_decoding_on_one_model_each_get_their_own_rows(tiny_q4k, monkeypatch):
    """Two runners may share one model (same weights, own caches) from two threads: the
    stack's workspace is per thread, so each thread's logits are those it gets alone."""
    import threading

    monkeypatch.setenv(fused.ENV, "1")
    model = loading.load(str(tiny_q4k), "gguf", progress=False).build()

    def decode(first: int) -> list[torch.Tensor]:
        cache = model.new_cache(80)
        rows = [model.forward(torch.tensor([first, 3, 5]), cache)]
        for tok in range(40):
            rows.append(model.forward(torch.tensor([(first + tok) % 60 + 2]), cache))
        return rows

    alone = {first: decode(first) for first in (7, 11)}
    together: dict[int, list] = {}
    threads = [threading.Thread(target=lambda f=f: together.__setitem__(f, decode(f))) for f in (7, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for first in (7, 11):
        assert all(torch.equal(a, b) for a, b in zip(alone[first], together[first]))
