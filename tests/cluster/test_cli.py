"""Bad input fails with a clear message and a non-zero exit, before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from actors import native
from cluster import cli


def run(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_unknown_alias_names_the_builtins(capsys, no_model_loads):
    code, err = run(["generate", "--target", "qwen9-huge", "--prompt", "hi"], capsys)
    assert code != 0
    assert "qwen9-huge" in err and "qwen2.5-coder-1.5b" in err and "gemma-3-270m" in err


def test_missing_path(capsys, no_model_loads, tmp_path):
    code, err = run(["generate", "--target", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert code != 0 and "nope" in err and "qwen2.5-coder-0.5b" in err


@pytest.mark.parametrize(
    "flags,word",
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--max-new-tokens", "-3"], "max_new_tokens"),
        (["--temperature", "-0.1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
    ],
)
def test_bad_numbers_fail_before_models(capsys, no_model_loads, tiny_dir, flags, word):
    code, err = run(["generate", "--target", tiny_dir("qwen2"), "--prompt", "hi", *flags], capsys)
    assert code != 0 and word in err


def test_prompt_longer_than_context(capsys, no_model_loads, tiny_dir):
    code, err = run(["generate", "--target", tiny_dir("llama"), "--prompt", "ab" * 400], capsys)
    assert code != 0 and "context" in err and "800" in err


def test_draft_with_other_vocabulary_is_refused(capsys, no_model_loads, tiny_dir):
    code, err = run(
        ["generate", "--target", tiny_dir("llama"), "--draft", tiny_dir("llama", vocab_size=80), "--prompt", "hi"],
        capsys,
    )
    assert code != 0 and "vocabulary" in err


def test_ray_pipeline_without_a_draft_is_refused(capsys, no_model_loads, tiny_dir):
    code, err = run(["generate", "--target", tiny_dir("llama"), "--prompt", "hi", "--pipeline", "async"], capsys)
    assert code != 0 and "--pipeline async needs --draft" in err


@pytest.mark.parametrize("pipeline", ["async", "ssd"])
def test_chain_pipelines_with_a_tree_are_refused(capsys, no_model_loads, tiny_dir, pipeline):
    code, err = run(["generate", "--target", tiny_dir("llama"), "--draft", tiny_dir("llama"), "--prompt", "hi",
                     "--pipeline", pipeline, "--tree-width", "2"], capsys)
    assert code != 0 and "--tree-width" in err


def test_lookahead_must_be_positive(capsys, tiny_dir):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--target", tiny_dir("llama"), "--prompt", "hi", "--lookahead", "0"])
    assert "--lookahead" in capsys.readouterr().err


def test_generate_json_contract(tiny_dir):
    """The --json line other tools parse: text, token_ids (new tokens only), stats."""
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--target", tiny_dir("llama"),
         "--draft", tiny_dir("llama", noise=0.3), "--prompt", "hello", "--max-new-tokens", "12",
         "--draft-dtype", "float32", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "token_ids", "stats"}
    assert len(out["token_ids"]) == out["stats"]["new_tokens"] <= 12
    assert {"new_tokens", "target_forwards", "mean_accepted", "tokens_per_s", "wall_s"} <= set(out["stats"])
    runtime = out["stats"]["runtime"]  # what the dtypes resolved to, and the kernel per shape class
    assert runtime["target"]["dtype"] == "float32" and runtime["draft"]["dtype"] == "float32"
    assert "64x64 float32" in runtime["target"]["kernels"]  # tiny: hidden 64 -> q_proj 64x64
    assert runtime["cpu"]["native_bf16"] in (True, False) and runtime["threading"]["threads"] >= 1


@pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernels")
def test_the_default_dtype_decodes_a_gguf_models_own_blocks_and_says_so(tmp_path):
    import tiny

    path = tiny.make_tiny_gguf(tmp_path / "q", "qwen2", "Q8_0", "Q8_0")
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--target", str(path), "--prompt", "hello",
                           "--max-new-tokens", "6", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runtime = json.loads(proc.stdout.strip().splitlines()[-1])["stats"]["runtime"]
    assert runtime["target"]["dtype"] == "Q8_0" and runtime["target"]["layers"].startswith("fused")
    assert f"{path}: --dtype file -> its GGUF file as the file is quantized" in proc.stderr


def test_gguf_dtype_for_a_model_without_a_gguf_file_is_refused_first(capsys, no_model_loads, tiny_dir):
    code, err = run(["generate", "--target", tiny_dir("llama"), "--prompt", "hi", "--dtype", "gguf"], capsys)
    assert code != 0 and "--dtype gguf" in err and "int8 or int4" in err
    code, err = run(["generate", "--target", tiny_dir("llama"), "--draft", tiny_dir("llama"), "--prompt", "hi",
                     "--draft-dtype", "gguf"], capsys)
    assert code != 0 and "--draft-dtype gguf" in err
