"""The llama.cpp bench methods: refused clearly without a build, and its output parsed."""

from __future__ import annotations

import json

import pytest

from cluster import bench_llamacpp, cli
from decoding.sampling import SamplingParams

SPEC_ERR = """0.12.340.918 I encoded   38 tokens in    0.524 seconds, speed:   72.529 t/s
0.12.340.931 I decoded  137 tokens in   10.209 seconds, speed:   13.420 t/s
0.12.340.956 I n_accept  = 118"""
AR_ERR = ("common_perf_print: prompt eval time =     390.81 ms /    38 tokens "
          "(   10.28 ms per token,    97.23 tokens per second)\n"
          "common_perf_print:        eval time =    8656.13 ms /   127 runs   "
          "(   68.16 ms per token,    14.67 tokens per second)")


def test_timings_and_text_are_read_from_its_output():
    ar = bench_llamacpp.parse("llamacpp", "def f():\n    pass", AR_ERR, "PROMPT")
    assert ar.tokens == 128 and ar.seconds == pytest.approx(9.04694) and ar.text.startswith("def f")
    spec = bench_llamacpp.parse("llamacpp-spec", "PROMPTdef g(): pass", SPEC_ERR, "PROMPT")
    assert spec.tokens == 137 and spec.seconds == pytest.approx(10.733) and spec.text == "def g(): pass"
    with pytest.raises(RuntimeError, match="no timings"):
        bench_llamacpp.parse("llamacpp", "", "crashed", "PROMPT")


def test_same_text_compares_up_to_the_shorter():
    assert bench_llamacpp.same_text("def f(x):\n    return x", "def f(x):\n    return x + 1")
    assert not bench_llamacpp.same_text("def f(x):", "def g(x):")


def test_llamacpp_methods_without_a_build_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(bench_llamacpp.LLAMACPP_ENV, raising=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x"}))
    code = cli.main(["bench", "--target", "qwen2.5-coder-1.5b", "--draft", "qwen2.5-coder-0.5b", "--dtype", "gguf",
                     "--prompts", str(prompts), "--methods", "ar,llamacpp", "--out", str(tmp_path / "o")])
    assert code == 2 and "--llamacpp DIR" in capsys.readouterr().err
    code = cli.main(["bench", "--target", "qwen2.5-coder-1.5b", "--draft", "qwen2.5-coder-0.5b", "--dtype", "gguf",
                     "--prompts", str(prompts), "--methods", "llamacpp", "--llamacpp", str(tmp_path),
                     "--out", str(tmp_path / "o")])
    assert code == 2 and "llama-completion" in capsys.readouterr().err
    code = cli.main(["bench", "--target", "qwen2.5-coder-1.5b", "--draft", "qwen2.5-coder-0.5b", "--dtype", "gguf",
                     "--prompts", str(prompts), "--methods", "hf,ar", "--out", str(tmp_path / "o")])
    assert code == 2 and "dense target" in capsys.readouterr().err


STAND_IN = """#!/bin/sh
# A stand-in for llama.cpp's llama-completion (no build on CI machines): it prints what the
# real one prints, an answer on stdout and its timings on stderr, and records its flags.
echo "$@" > "$(dirname "$0")/flags.txt"
printf ' return 42\\n'
echo "common_perf_print: prompt eval time =     10.00 ms /     4 tokens" >&2
echo "common_perf_print:        eval time =     90.00 ms /     5 runs" >&2
"""


def test_llamacpp_is_a_decoder_like_the_others(tiny_dir, tmp_path):
    """The llama.cpp backend through `make_decoder` and `Decoder.generate`: our prompt as text,
    our max_new_tokens as -n, its text encoded again, its own count and time."""
    import shutil

    from cluster.factory import make_decoder
    from cluster.local import DecodeConfig
    from cluster.spec import DecoderSpec

    model = tmp_path / "model"
    shutil.copytree(tiny_dir("llama"), model)
    (model / "model.gguf").write_bytes(b"")  # llama.cpp reads this file; the stand-in does not
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "llama-completion").write_text(STAND_IN)
    (bin_dir / "llama-completion").chmod(0o755)
    with make_decoder(DecoderSpec(target=str(model), backend="llamacpp", llamacpp=str(bin_dir))) as decoder:
        with pytest.raises(RuntimeError, match="temperature must be 0"):
            decoder.generate([5, 6, 7], DecodeConfig(max_new_tokens=6, sampling=SamplingParams(temperature=1.0)))
        result = decoder.generate([5, 6, 7], DecodeConfig(max_new_tokens=6), speculative=False)
        flags = (bin_dir / "flags.txt").read_text().split()
        assert flags[flags.index("-n") + 1] == "6" and flags[flags.index("-m") + 1] == str(model / "model.gguf")
        assert decoder.tokenizer.decode(result.token_ids) == " return 42\n"
        assert result.stats.new_tokens == 6 and result.stats.wall_s == pytest.approx(0.1)
