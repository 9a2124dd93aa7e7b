"""`specray bench`: every method a `DecoderSpec` decoded through `make_decoder`, the
pipelines' drafter in a Ray actor, the target's weights loaded once for them all."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import ray

from cluster import cli
from cluster.bench_methods import METHODS, method_spec
from cluster.factory import make_decoder
from cluster.local import DecodeConfig
from cluster.models import ModelPool


def test_bench_with_ray_pipelines_reports_every_method(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("hello there", "def f(x):", "a b c")))
    out = tmp_path / "bench"
    methods = ["hf", "ar", "spec-local", "spec-sync", "spec-async"]
    ray.init(address="local", num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    try:
        code = cli.main(["bench", "--target", tiny_dir("llama"), "--draft", tiny_dir("llama", noise=0.3),
                         "--prompts", str(prompts), "--methods", ",".join(methods), "--max-new-tokens", "24",
                         "--draft-dtype", "float32", "--lookahead", "4", "--out", str(out)])
    finally:
        ray.shutdown()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == methods and report["config"]["lookahead"] == 4
    for name, row in report["methods"].items():
        assert row["identical_to_target"] is True, name
        assert row["new_tokens"] == 3 * 24
        # seconds: 3 decimals
        assert row["tokens_per_s"] == pytest.approx(row["new_tokens"] / row["seconds"], rel=0.02), name
    hf_rate = report["methods"]["hf"]["tokens_per_s"]
    for name in ("ar", "spec-local", "spec-sync", "spec-async"):
        row = report["methods"][name]  # each against hf's measured rate, not its own
        assert row["speedup_vs_hf"] == pytest.approx(row["tokens_per_s"] / hf_rate, rel=1e-3), name
    for name in ("spec-local", "spec-sync", "spec-async"):  # the pair agrees often: drafts are accepted
        assert report["methods"][name]["mean_accepted"] > 1.2, name
    for name in ("spec-sync", "spec-async"):
        # the target waits for each answer from the drafter's actor; how long is a timing
        # figure (BENCHMARKS.md), on tiny models noise
        row = report["methods"][name]
        assert row["verifier_wait_seconds"] > 0 and 0 < row["verifier_wait_share"] <= 1
    runtime = report["config"]["runtime"]  # where each method ran, with what
    assert runtime["target"]["dtype"] == runtime["draft"]["dtype"] == runtime["pipeline_draft"]["dtype"] == "float32"
    assert runtime["pipeline_draft"]["where"] == "own actor, over the protocol" and runtime["target"]["kernels"]
    assert runtime["pipeline_draft"]["pid"] != os.getpid()
    assert (out / "report.png").stat().st_size > 0
    assert "waiting for drafts" in capsys.readouterr().out


def test_bench_methods_share_the_weights_loaded_once(tiny_dir):
    """Each method is its own decoder (runner, cache, policy); the weights are the pool's."""
    args = argparse.Namespace(target=tiny_dir("llama"), draft=tiny_dir("llama", noise=0.3), dtype="float32",
                              draft_dtype="float32", heads=None, amphista_heads=None, llamacpp=None, lookahead=8,
                              accelerator="auto", cpus_per_actor=1, spread=False)
    models = ModelPool()
    decoders = {m: make_decoder(method_spec(m, args), models=models) for m in ("hf", "hf-assisted", "ar", "spec-local")}
    try:
        assert sorted(models.loaded) == sorted([(args.target, "float32"), (args.draft, "float32")])
        ar, spec = decoders["ar"].engine, decoders["spec-local"].engine
        assert ar.target_runner is not spec.target_runner  # own caches
        weight = lambda runner: runner.model.tok_embeddings.data_ptr()  # noqa: E731
        assert weight(ar.target_runner) == weight(spec.target_runner)
        assert decoders["hf"].engine.target.hf_model is spec.target.hf_model
        assert decoders["hf-assisted"].engine.assistant is spec.draft.hf_model
        prompt, cfg = [5, 9, 2, 7], DecodeConfig(max_new_tokens=12)
        outputs = {m: d.generate(prompt, cfg, METHODS[m].speculative).token_ids for m, d in decoders.items()}
        assert len(set(map(tuple, outputs.values()))) == 1, outputs  # greedy: one output, four ways
    finally:
        for decoder in decoders.values():
            decoder.close()


def test_bad_method_combinations_name_the_method(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x"}))
    code = cli.main(["bench", "--target", tiny_dir("llama"), "--prompts", str(prompts), "--methods", "ar,hf",
                     "--dtype", "int8", "--out", str(tmp_path / "o")])
    assert code == 2 and "bench method hf:" in capsys.readouterr().err
    code = cli.main(["bench", "--target", tiny_dir("llama"), "--prompts", str(prompts), "--methods", "ar,spec-sync",
                     "--out", str(tmp_path / "o")])
    assert code == 2 and "spec-sync need --draft" in capsys.readouterr().err


def test_async_bench_with_a_tree_is_refused_before_loading(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x"}))
    code = cli.main(["bench", "--target", tiny_dir("llama"), "--draft", tiny_dir("llama"), "--prompts",
                     str(prompts), "--methods", "spec-async", "--tree-width", "2", "--out", str(tmp_path / "o")])
    assert code == 2 and "--tree-width" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_bench_reports_prompt_lookup_and_each_category(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [("coding", "def f(x): return x\ndef g(x): return"), ("writing", "a b c a b c a b"),
            ("coding", "x = 1\ny = 2\nx = 1\ny =")]
    prompts.write_text("\n".join(json.dumps({"category": c, "turns": [p]}) for c, p in rows))
    out = tmp_path / "bench"
    code = cli.main(["bench", "--target", tiny_dir("llama"), "--prompts", str(prompts), "--methods", "ar,spec-ngram",
                     "--max-new-tokens", "16", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["spec-ngram"]["identical_to_target"] is True
    cats = report["by_category"]
    assert list(cats) == ["coding", "writing"] and set(cats["coding"]) == {"ar", "spec-ngram"}
    assert all(rate > 0 for rates in cats.values() for rate in rates.values())
    assert (out / "by_category.png").stat().st_size > 0
    assert "| coding |" in capsys.readouterr().out
