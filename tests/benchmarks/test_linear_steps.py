"""Smoke test of benchmarks/linear_steps.py on a tiny random model: it runs and writes its
report. Timings are not checked (they belong in the benchmark, not in a test)."""

from __future__ import annotations

import dataclasses
import json

import torch

from actors.linear_attention import LinearConfig
from benchmarks.linear_steps import build_pair, folds_in, main, tiny_config


def test_writes_the_report(tmp_path):
    out = tmp_path / "steps"
    main(["--shape", "tiny", "--contexts", "64,256", "--steps", "2", "--repeats", "1", "--out", str(out)])
    for name in ("report.json", "report.md", "report.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert {"config", "contexts", "flat"} <= report.keys()
    assert {"cpu", "threads", "torch"} <= report["config"]["machine"].keys()
    assert report["config"]["dtype"] == "float32"
    assert list(report["contexts"]) == ["64", "256"]
    for row in report["contexts"].values():
        assert {"base_ms", "linear_ms", "linear_over_base", "base_vs_first", "linear_vs_first"} <= row.keys()
    assert {"linear_256_over_64", "base_256_over_64"} <= report["flat"].keys()


def test_the_linear_model_shares_the_base_weights():
    cfg = dataclasses.replace(tiny_config(), tie_word_embeddings=True)
    base, linear = build_pair(cfg, torch.float32, LinearConfig())
    shared = dict(base.named_parameters())
    for name, p in linear.named_parameters():
        if ".attn.linear." not in name:
            assert p is shared[name], name
    assert base.config.linear is None and linear.config.linear is not None
    assert linear.output.weight is linear.tok_embeddings


def test_folds_count_the_boundaries_a_window_crosses():
    assert folds_in(1025, 16, 64) == 0
    assert folds_in(1025, 64, 64) == 1
    assert folds_in(101, 70, 16) == 4
