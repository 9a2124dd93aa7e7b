"""Linearized models at the front ends: they load by name (a directory written by
`specray linearize`, or a linearized built-in) wherever a model goes, speculate with
their own output, and refuse sparse attention before any weights load."""

from __future__ import annotations

import json

import pytest

from actors import loading
from cluster import cli


@pytest.fixture(scope="module")
def models(tiny_linear, tiny_dir):
    """(linearized target, linearized draft, plain target), made before any test patches loading."""
    return tiny_linear("qwen2"), tiny_linear("qwen2", seed=1), tiny_dir("qwen2")


@pytest.mark.parametrize("argv,message", [
    (["--attention", "tidal"], "linearized model"),
    (["--draft", "self"], "linearized model"),
    (["--draft", "self", "--draft-attention", "tidal:8"], "linearized model"),
])
def test_sparse_attention_on_a_linearized_model_is_refused_before_loading(capsys, models, no_model_loads, argv,
                                                                           message):
    code = cli.main(["generate", "--target", models[0], "--prompt", "hi", *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_a_linearized_draft_attending_sparsely_is_refused_too(capsys, models, no_model_loads):
    code = cli.main(["generate", "--target", models[2], "--draft", models[1],
                     "--draft-attention", "tidal", "--prompt", "hi"])
    assert code == 2 and "linearized model" in capsys.readouterr().err


def test_cli_generate_with_a_linearized_target_speculates_its_own_text(capsys, tiny_linear, tiny_dir):
    base = ["generate", "--target", tiny_linear("qwen2"), "--prompt", "the quick brown fox " * 6,
            "--max-new-tokens", "24", "--json"]
    assert cli.main(base) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(base + ["--draft", tiny_dir("qwen2", noise=0.3), "--draft-dtype", "float32"]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert spec["token_ids"] == alone["token_ids"] and len(spec["token_ids"]) > 0
    assert spec["stats"]["runtime"]["target"]["linear"].startswith("linear attention in 2 of 2 layers")


def test_the_linearized_builtin_names_its_base():
    assert loading.LINEAR_BUILTINS == ("qwen2.5-coder-1.5b-linear",)
    shipped = loading.BUILTIN_LINEAR_ROOT / "qwen2.5-coder-1.5b-linear"
    assert loading.linear_base("qwen2.5-coder-1.5b-linear") == "qwen2.5-coder-1.5b"
    assert (shipped / "linear.safetensors").stat().st_size < 20 * 2**20  # only the new parameters, bf16


def test_bench_refuses_methods_that_would_run_the_softmax_base(capsys, models, no_model_loads, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    code = cli.main(["bench", "--target", models[0], "--draft", models[2], "--prompts", str(prompts),
                     "--methods", "hf,ar,spec-local", "--out", str(tmp_path / "out")])
    assert code == 2 and "softmax base" in capsys.readouterr().err
