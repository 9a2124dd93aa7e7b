"""actors.model.Transformer against the Hugging Face reference, on tiny random models."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from actors import kernels
from actors.model import Transformer
from actors.model_config import ModelConfig

V = 97
ATOL = 1e-4


def _config(name: str):
    common = dict(vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=256)
    if name == "qwen2":
        return transformers.Qwen2Config(num_hidden_layers=2, **common)
    if name == "qwen2-sliding":  # layer 1 uses a sliding window of 5
        return transformers.Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=5,
                                        max_window_layers=1, **common)
    if name == "llama":  # with llama3 RoPE scaling, which changes the frequencies
        return transformers.LlamaConfig(
            num_hidden_layers=2, rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **common)
    if name == "gemma3":  # window 4 (< test sequences), distinct local/global RoPE bases, softcap
        return transformers.Gemma3TextConfig(
            num_hidden_layers=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=5.0,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            **common)
    raise KeyError(name)


FAMILIES = ["qwen2", "qwen2-sliding", "llama", "gemma3"]
_MODELS: dict[str, tuple] = {}


def _models(name: str):
    if name not in _MODELS:
        torch.manual_seed(1234)
        hf = transformers.AutoModelForCausalLM.from_config(_config(name)).float().eval()
        with torch.no_grad():  # HF inits biases to 0 and norms to 1 / 0: perturb everything
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        _MODELS[name] = (hf, Transformer.from_hf(hf))
    return _MODELS[name]


@pytest.fixture(params=FAMILIES)
def pair(request):
    return _models(request.param)


def _window(hf) -> int | None:
    c = hf.config
    return c.sliding_window if "sliding_attention" in (getattr(c, "layer_types", None) or ()) else None


@torch.no_grad()
def hf_logits(hf, ids) -> torch.Tensor:
    return hf(torch.as_tensor(ids).reshape(1, -1)).logits[0].float()


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n,), generator=g)


def _tree(n: int, seed: int):
    """Random forest in topological order: parents (-1 = root), depths, ancestor-or-self mask."""
    rng = random.Random(seed)
    parents = [-1]
    for i in range(1, n):  # mostly deep chains, sometimes a second root
        parents.append(-1 if i == 3 else rng.randint(max(0, i - 3), i - 1))
    depth, mask = [], torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        depth.append(0 if p < 0 else depth[p] + 1)
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
    return parents, torch.tensor(depth), mask


def _path(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


# --------------------------------------------------------------------------- basics


def test_prefill_matches_hf(pair):
    hf, m = pair
    ids = _ids(13, 0)
    out = m(ids, m.new_cache(32))
    assert out.dtype == torch.float32 and out.shape == (13, V)
    torch.testing.assert_close(out, hf_logits(hf, ids), atol=ATOL, rtol=1e-4)


def test_incremental_and_chunked_decode_match_full(pair):
    hf, m = pair
    ids = _ids(14, 1)
    full = m(ids, m.new_cache(32))
    cache = m.new_cache(32)
    one_by_one = torch.cat([m(ids[i:i + 1], cache) for i in range(14)])
    assert cache.length == 14
    torch.testing.assert_close(one_by_one, full, atol=ATOL, rtol=1e-4)
    cache, outs, s = m.new_cache(32), [], 0
    for n in (5, 1, 3, 5):  # T > 1 on a non-empty cache
        outs.append(m(ids[s:s + n], cache))
        s += n
    torch.testing.assert_close(torch.cat(outs), full, atol=ATOL, rtol=1e-4)


def test_last_only_and_hidden(pair):
    hf, m = pair
    ids = _ids(7, 2)
    full = m(ids, m.new_cache(16))
    last = m(ids, m.new_cache(16), last_only=True)
    assert last.shape == (1, V)
    torch.testing.assert_close(last, full[-1:], atol=1e-6, rtol=1e-6)
    h = m.forward_hidden(ids, m.new_cache(16))
    assert h.shape == (7, 64)
    torch.testing.assert_close(m.logits(h), full, atol=1e-6, rtol=1e-6)


def test_zero_copy(pair):
    hf, m = pair
    hf_ptrs = {p.data_ptr() for p in hf.parameters()}
    ours = {p.data_ptr() for p in m.parameters()}
    assert ours == hf_ptrs
    assert m.layers[0].attn.wq.weight is hf.model.layers[0].self_attn.q_proj.weight
    if hf.config.tie_word_embeddings:
        assert m.output.weight is m.tok_embeddings


@pytest.mark.parametrize("kernel", sorted(kernels.KERNELS))
def test_every_linear_kernel_matches_hf(pair, kernel):
    """Each candidate kernel, forced on every linear for every row count, gives HF's logits."""
    hf, m = pair
    if kernel not in kernels.candidates(torch.float32, "cpu"):
        pytest.skip(f"{kernel} cannot run here")
    ids = _ids(9, 3)
    try:
        for lin in m.linears():
            lin.kernels = (kernels.KERNELS[kernel],) * kernels.MAX_ROWS
        cache = m.new_cache(16)  # T = 6, 2, 1: several row counts
        out = torch.cat([m(ids[:6], cache), m(ids[6:8], cache), m(ids[8:], cache)])
    finally:
        for lin in m.linears():
            lin.kernels = kernels.DEFAULT
    torch.testing.assert_close(out, hf_logits(hf, ids), atol=ATOL, rtol=1e-4)


# --------------------------------------------------------------------------- trees


@pytest.mark.parametrize("prefix_len", [0, 9])
def test_tree_verification_matches_paths(pair, prefix_len):
    """THE invariant: a node's logits in the tree pass equal its root-to-node path run plainly."""
    hf, m = pair
    n = 14
    prefix, tree_tokens = _ids(prefix_len, 4), _ids(n, 5)
    parents, depth, mask = _tree(n, seed=6)
    w = _window(hf)
    if w is not None:
        assert int(depth.max()) + 1 > w  # paths cross the sliding-window boundary
    cache = m.new_cache(64)
    if prefix_len:
        m(prefix, cache)
    out = m(tree_tokens, cache, positions=prefix_len + depth, tree_mask=mask)
    assert out.shape == (n, V) and cache.length == prefix_len + n
    for i in range(n):
        seq = torch.cat([prefix, tree_tokens[_path(parents, i)]])
        torch.testing.assert_close(out[i], hf_logits(hf, seq)[-1], atol=ATOL, rtol=1e-4,
                                   msg=lambda s: f"node {i}: {s}")


@pytest.mark.parametrize("leaf", [13, 5])  # node 5 hangs off the second root (slot 3): keep[0] != 0
def test_compact_then_continue(pair, leaf):
    hf, m = pair
    prefix, tree_tokens, nxt = _ids(9, 7), _ids(14, 8), _ids(2, 9)
    parents, depth, mask = _tree(14, seed=6)
    cache = m.new_cache(64)
    m(prefix, cache)
    m(tree_tokens, cache, positions=9 + depth, tree_mask=mask)
    path = _path(parents, leaf)
    cache.compact(9, path)
    assert cache.length == 9 + len(path)
    out = m(nxt, cache)
    ref = hf_logits(hf, torch.cat([prefix, tree_tokens[path], nxt]))[-2:]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    # and it equals a fresh cache fed prefix + accepted path
    fresh = m.new_cache(64)
    m(torch.cat([prefix, tree_tokens[path]]), fresh)
    torch.testing.assert_close(out, m(nxt, fresh), atol=ATOL, rtol=1e-4)


def test_crop_then_continue(pair):
    hf, m = pair
    ids, other = _ids(12, 10), _ids(5, 11)
    cache = m.new_cache(32)
    m(ids, cache)
    cache.crop(7)
    out = m(other, cache)
    ref = m(torch.cat([ids[:7], other]), m.new_cache(32))[7:]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)


def test_write_past_max_len_raises(pair):
    hf, m = pair
    cache = m.new_cache(8)
    m(_ids(6, 12), cache)
    with pytest.raises(ValueError, match="max_len"):
        m(_ids(3, 13), cache)
    assert cache.length == 6
    m(_ids(2, 14), cache)
    assert cache.length == 8
    with pytest.raises(ValueError):
        m(_ids(1, 15), cache)


def test_greedy_matches_hf_generate(pair):
    hf, m = pair
    prompt = _ids(6, 16)
    hf.generation_config.eos_token_id = None
    ref = hf.generate(prompt[None], max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    cache, toks = m.new_cache(32), []
    logits = m(prompt, cache, last_only=True)
    for _ in range(20):
        toks.append(int(logits[0].argmax()))
        logits = m(torch.tensor(toks[-1:]), cache)
    assert toks == ref


# --------------------------------------------------------------------------- config


def test_config_translation():
    cfg = ModelConfig.from_hf(_config("gemma3"))
    assert cfg.family == "gemma3" and cfg.sliding_window == 4 and cfg.rope_local_theta == 1e4
    assert cfg.rope_theta == 1e6 and cfg.attn_scale == 12 ** -0.5 and cfg.final_logit_softcapping == 5.0
    q = ModelConfig.from_hf(_config("qwen2"))
    assert q.qkv_bias and not q.o_bias and q.layer_types == ("full_attention",) * 2
    assert ModelConfig.from_hf(_config("qwen2-sliding")).layer_types == ("full_attention", "sliding_attention")
    assert ModelConfig.from_hf(_config("llama")).rope_scaling["rope_type"] == "llama3"


def test_refuses_unsupported():
    with pytest.raises(ValueError, match="qwen2, llama, gemma3"):
        ModelConfig.from_hf(transformers.GPT2Config())
    yarn = transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(yarn)
    with pytest.raises(ValueError, match="family"):
        ModelConfig(family="mistral", vocab_size=8, hidden_size=8, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=4, intermediate_size=8)
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(family="llama", vocab_size=8, hidden_size=8, n_layers=1, n_heads=3, n_kv_heads=2,
                    head_dim=4, intermediate_size=8)


def test_input_validation():
    hf, m = _models("qwen2")
    cache = m.new_cache(16)
    with pytest.raises(ValueError, match="tree_mask"):
        m(_ids(3, 0), cache, tree_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        m(_ids(3, 0), cache, positions=torch.arange(4))
    other = transformers.Qwen2Config(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128)
    with pytest.raises(ValueError, match="does not fit"):
        m(_ids(3, 0), Transformer.from_hf(transformers.AutoModelForCausalLM.from_config(other)).new_cache(8))
    assert cache.length == 0


# --------------------------------------------------------------------------- dtypes, devices


def test_bf16_matches_hf(pair):
    import copy

    hf, _ = pair
    hb = copy.deepcopy(hf).to(torch.bfloat16)
    mb = Transformer.from_hf(hb)
    assert mb.new_cache(4).dtype == torch.bfloat16
    ids = _ids(11, 17)
    out = mb(ids, mb.new_cache(16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hf_logits(hb, ids), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_tree_matches_cpu(pair):
    import copy

    hf, m = pair
    mc = Transformer.from_hf(copy.deepcopy(hf).cuda())
    prefix, tree_tokens = _ids(9, 4), _ids(14, 5)
    parents, depth, mask = _tree(14, seed=6)
    outs = []
    for model in (m, mc):
        cache = model.new_cache(64)
        model(prefix, cache)
        outs.append(model(tree_tokens, cache, positions=9 + depth, tree_mask=mask).cpu())
        cache.compact(9, _path(parents, 13))
        outs.append(model(_ids(3, 9), cache).cpu())
    torch.testing.assert_close(outs[2], outs[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(outs[3], outs[1], atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
def test_cuda_sampled_speculation_with_a_cpu_generator(pair):
    """Drafting samples CUDA probabilities with the request's CPU generator (this raised in
    `torch.multinomial`); the run repeats exactly for a seed."""
    import copy

    from actors.runner import ModelRunner
    from cluster.local import speculative_generate
    from decoding.request import DecodeConfig
    from decoding.sampling import SamplingParams

    hf, _ = pair
    target = ModelRunner(Transformer.from_hf(copy.deepcopy(hf).cuda()), 64)
    draft = ModelRunner(Transformer.from_hf(copy.deepcopy(hf).cuda().bfloat16()), 64)
    cfg = DecodeConfig(max_new_tokens=12, sampling=SamplingParams(temperature=1.0), seed=3, draft_length=3,
                       tree_width=2, eos_token_ids=(-1,))
    first = speculative_generate(target, draft, [5, 6, 7], cfg)
    assert len(first.token_ids) == 12 and first.stats.verify_rounds > 0
    assert speculative_generate(target, draft, [5, 6, 7], cfg).token_ids == first.token_ids
