"""`specray bench` with the Ray pipelines in the run: every method on the same prompts,
the engine's methods inside the verifier actor, the report says what async hid."""

from __future__ import annotations

import json

import ray

from cluster import cli


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
    for name in ("spec-sync", "spec-async"):
        row = report["methods"][name]
        assert 0 <= row["hidden_draft_fraction"] <= 1 and row["draft_seconds"] > 0
        assert row["mean_accepted"] >= 1
    assert (out / "report.png").stat().st_size > 0
    assert "drafting hidden" in capsys.readouterr().out


def test_async_bench_with_a_tree_is_refused_before_loading(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x"}))
    code = cli.main(["bench", "--target", tiny_dir("llama"), "--draft", tiny_dir("llama"), "--prompts",
                     str(prompts), "--methods", "spec-async", "--tree-width", "2", "--out", str(tmp_path / "o")])
    assert code == 2 and "--tree-width" in capsys.readouterr().err
    assert not ray.is_initialized()
