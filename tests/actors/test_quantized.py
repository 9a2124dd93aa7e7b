"""Quantized models: a GGUF file loads as the file quantizes it, int8/int4 quantize a dense
model group-wise, and speculation stays lossless with respect to the target as loaded."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import Gemma2TensorProcessor, LlamaTensorProcessor

import decoding.acceptance as acceptance
from actors import loading, native
from actors.model import Transformer
from actors.quantized import QuantEmbedding, QuantLinear
from cluster.engine import EngineConfig, LocalEngine
from cluster.local import DecodeConfig
from decoding.sampling import SamplingParams

import tiny
from sampling_check import chi2_pvalue, exact_sequence_probs, runners, sample_sequences

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernels")

HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm"}
CASES = [  # family, linear blocks, embedding blocks, sizes
    ("qwen2", "Q8_0", "Q8_0", {}),
    ("qwen2", "Q5_0", "Q4_0", {}),
    ("llama", "Q4_0", "Q8_0", {}),
    ("qwen2", "Q4_K", "Q6_K", {"hidden_size": 256, "intermediate_size": 512}),
    ("gemma3", "Q6_K", "Q8_0", {"hidden_size": 256, "intermediate_size": 512}),
]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")

    def make(family, linear, embed, sizes):
        name = f"{family}-{linear}-{embed}-{sizes.get('hidden_size', 64)}"
        return tiny.make_tiny_gguf(root / name, family, linear, embed, **sizes)

    return make


def reference_hf(path, family):
    """An HF model holding the file's weights dequantized by gguf-py, mapped as transformers'
    own GGUF loader maps them (its llama permutation and Gemma norm processors)."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    proc = {"llama": LlamaTensorProcessor, "gemma3": Gemma2TensorProcessor}.get(family)
    proc = proc(config={"num_attention_heads": cfg.num_attention_heads,
                        "num_key_value_heads": cfg.num_key_value_heads}) if proc else None
    params = dict(hf.named_parameters())
    ffn_norm = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    extra = {"ffn_norm": ffn_norm, "post_attention_norm": "post_attention_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"}
    for t in gguf.GGUFReader(str(path / "model.gguf")).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed([int(d) for d in t.shape])))
        if proc is not None:
            values = proc.process(values, t.name).weights
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            _, layer, kind, what = t.name.split(".")
            name = f"model.layers.{layer}.{HF_NAMES.get(kind) or extra[kind]}.{what}"
        with torch.no_grad():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight)  # no output.weight: tied, as llama.cpp
    return hf


@pytest.mark.parametrize("family,linear,embed,sizes", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_gguf_model_computes_the_files_weights(gguf_dir, family, linear, embed, sizes):
    path = gguf_dir(family, linear, embed, sizes)
    loaded = loading.load(str(path), "gguf", progress=False)
    ours = loaded.build()
    kinds = {type(m) for m in ours.modules()}
    assert QuantLinear in kinds and isinstance(ours.quant_embedding, QuantEmbedding)
    assert all(m.qweight.type_name in (linear, "Q8_0", embed) for m in ours.modules() if hasattr(m, "qweight"))
    dense = Transformer.from_hf(reference_hf(path, family))
    ids = torch.tensor([3, 9, 4, 17, 22, 5, 8, 30, 2, 11])
    positions = 300 + 7 * torch.arange(10)  # far apart: RoPE turns every pair of dims a lot
    got = ours(ids, ours.new_cache(16), positions=positions)
    want = dense(ids, dense.new_cache(16), positions=positions)
    # Weights are the file's exactly; activations are rounded to int8 per 32 before each
    # product (llama.cpp does the same), which moves these random models' logits by up to ~10% of their spread;
    # a wrong mapping (a missed permutation, norm offset, block layout) moves them by ~100%.
    spread = float(want.std())
    assert float((got - want).abs().max()) < 0.15 * spread
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_int8_and_int4_quantize_every_linear_group_wise(tiny_dir):
    dense = loading.load(tiny_dir("llama"), "float32", progress=False).build()
    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    want = dense(ids, dense.new_cache(8))
    for fmt, tol in (("int8", 0.1), ("int4", 0.4)):
        q = loading.load(tiny_dir("llama"), fmt, progress=False).build()
        types = {m.qweight.type_name for m in q.modules() if isinstance(m, QuantLinear)}
        assert types == {"Q8_0" if fmt == "int8" else "Q4_0"}
        got = q(ids, q.new_cache(8))
        assert float((got - want).abs().max()) < tol * float(want.std()), fmt


@pytest.mark.parametrize("target_dtype,draft_dtype", [("gguf", "gguf"), ("float32", "int4"), ("int8", "int8")])
def test_greedy_speculation_is_the_quantized_target_alone(gguf_dir, tiny_dir, target_dtype, draft_dtype):
    if target_dtype == "gguf":
        target, draft = gguf_dir("qwen2", "Q4_K", "Q6_K", {"hidden_size": 256, "intermediate_size": 512}), None
        draft = tiny.make_tiny_gguf(target.with_name("draft-q50"), "qwen2", "Q5_0", "Q8_0", seed=0,
                                    hidden_size=256, intermediate_size=512)
        target, draft = str(target), str(draft)
    else:
        target, draft = tiny_dir("qwen2"), tiny_dir("qwen2", noise=0.3)
    engine = LocalEngine(EngineConfig(target, draft, dtype=target_dtype, draft_dtype=draft_dtype), progress=False)
    assert engine.runtime_info()["draft"]["dtype"] != "float32"
    gen = torch.Generator().manual_seed(3)
    for trial in range(4):
        prompt = torch.randint(2, 64, (int(torch.randint(2, 20, (), generator=gen)),), generator=gen).tolist()
        alone = engine.generate(prompt, DecodeConfig(max_new_tokens=40), speculative=False).token_ids
        for draft_length, width in ((None, 1), (3, 2)):
            cfg = DecodeConfig(max_new_tokens=40, draft_length=draft_length, tree_width=width)
            assert engine.generate(prompt, cfg).token_ids == alone, (trial, draft_length, width)


def test_sampling_with_quantized_target_and_draft_follows_the_quantized_target(tiny_dir, monkeypatch):
    target, draft = runners(tiny_dir, target_dtype="int8", draft_dtype="int4")
    params = SamplingParams(temperature=1.0)
    probs = exact_sequence_probs(target, params)  # of the int8 target, as loaded
    assert chi2_pvalue(sample_sequences(target, draft, params), probs) > 1e-3
    # power check: the classic residual bug must be caught with these models too
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p / p.sum(-1, keepdim=True))
    assert chi2_pvalue(sample_sequences(target, draft, params, n=2500), probs) < 1e-6


@pytest.mark.parametrize("family,linear,embed,sizes", [CASES[1], CASES[3], CASES[4]])
def test_verifying_a_tree_gives_each_path_the_bits_of_decoding_it_alone(gguf_dir, family, linear, embed, sizes):
    """The quantized model is row-exact: score a token tree in one forward, and every node's
    logits are bitwise those of feeding its path one token at a time. This is what makes
    greedy speculation on a quantized target equal its decoding alone even at near-ties
    (with int8-rounded activations, a last-bit difference in attention can move a code)."""
    from actors.runner import ModelRunner
    from decoding.tree import TokenTree

    model = loading.load(str(gguf_dir(family, linear, embed, sizes)), "gguf", progress=False).build()
    assert model.row_exact
    runner = ModelRunner(model, 64)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, 64, (9,), generator=gen).tolist()
    paths = [[5, 7, 9, 11], [5, 7, 13], [6, 8], [5, 12, 14, 3]]
    tree = TokenTree.from_paths(prompt[-1], paths)
    runner.reset()
    runner.feed(prompt[:-1])
    scored = runner.score_tree(prompt, tree)
    for node in range(tree.size):
        path = [prompt[-1]] + [int(tree.tokens[n]) for n in tree.path(node)]  # root to node
        runner.reset()
        runner.feed(prompt[:-1])
        for tok in path[:-1]:
            runner.feed([tok])
        alone = runner.feed([path[-1]])
        assert torch.equal(scored[node], alone), (node, path, float((scored[node] - alone).abs().max()))
