"""Long contexts at the front ends: the TidalDecode flags, request limits and bench-long.

Bad combinations are refused before any model loads; `--draft self` and a sparse draft
give the target's own output and say so; `--attention tidal` is labelled approximate;
bench-long decodes every method from one prefill and writes its report.
"""

from __future__ import annotations

import json

import pytest

from cluster import cli
from cluster.engine import EngineConfig, LocalEngine
from cluster.local import DecodeConfig


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """A tiny pair with 3 layers (select, sparse, sparse under a 1-layer-full layout) and room for 2k tokens."""
    from tiny import make_tiny

    root = tmp_path_factory.mktemp("long")
    kw = dict(max_position_embeddings=2048, num_hidden_layers=3)
    return str(make_tiny(root / "t", **kw)), str(make_tiny(root / "d", noise=0.3, **kw))


@pytest.mark.parametrize("argv,message", [
    (["--draft-attention", "tidal"], "--draft-attention sets how a draft attends"),
    (["--draft", "self", "--attention", "tidal"], "give one of them"),
    (["--draft", "self", "--heads", "medusa"], "two ways to draft"),
    (["--draft", "self", "--pipeline", "sync"], "--pipeline local"),
    (["--attention", "quest:4"], "attention must be 'tidal'"),
    (["--draft", "self", "--pipeline", "async", "--draft-attention", "tidal:8"], "--pipeline local"),
    (["--draft-attention", "tidal:0", "--draft", "self"], "positive integer"),
])
def test_bad_long_context_flags_are_refused_before_loading(capsys, no_model_loads, long_tiny, argv, message):
    code = cli.main(["generate", "--target", long_tiny[0], "--prompt", "hi", *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_a_request_past_max_len_names_the_limit(capsys, no_model_loads, long_tiny):
    code = cli.main(["generate", "--target", long_tiny[0], "--prompt", "a" * 40, "--max-new-tokens", "30",
                     "--max-len", "50"])
    err = capsys.readouterr().err
    assert code == 2 and "max_len=50" in err and "--max-len" in err
    code = cli.main(["generate", "--target", long_tiny[0], "--prompt", "a" * 2040, "--max-new-tokens", "30"])
    assert code == 2 and "context of 2048" in capsys.readouterr().err


def test_self_drafting_engine_is_the_target_and_says_how_it_drafted(long_tiny):
    prompt = [(7 * i + 3) % 60 + 2 for i in range(300)]
    cfg = DecodeConfig(max_new_tokens=24, eos_token_ids=(-1,))
    engine = LocalEngine(EngineConfig(long_tiny[0], "self", draft_attention="tidal:16", max_len=400), False)
    alone = engine.generate(prompt, cfg, speculative=False)
    selfspec = engine.generate(prompt, cfg)
    assert selfspec.token_ids == alone.token_ids
    assert selfspec.stats.verify_rounds > 0  # it really speculated
    stats = selfspec.stats.as_dict()
    assert stats["approximate"] is False and stats["draft_attention"] == "self tidal:16"
    assert engine.runtime_info()["self_draft"].startswith("tidal:16")
    with pytest.raises(ValueError, match="max_len=400"):
        engine.generate(prompt, DecodeConfig(max_new_tokens=101))


def test_a_sparse_target_is_labelled_approximate(long_tiny):
    engine = LocalEngine(EngineConfig(long_tiny[0], attention="tidal:8"), False)
    result = engine.generate([(5 * i) % 60 + 2 for i in range(100)], DecodeConfig(max_new_tokens=8))
    assert result.stats.as_dict()["approximate"] is True and result.stats.as_dict()["attention"] == "tidal:8"
    assert "approximate" in engine.runtime_info()["target"]["attention"]


def test_cli_generate_with_a_sparse_draft_prints_the_targets_text(capsys, long_tiny):
    base = ["generate", "--target", long_tiny[0], "--prompt", "the quick brown fox " * 20, "--max-new-tokens", "16",
            "--json"]
    assert cli.main(base) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(base + ["--draft", long_tiny[1], "--draft-attention", "tidal:16", "--draft-dtype", "float32"]) == 0
    sparse = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sparse["token_ids"] == alone["token_ids"]
    assert sparse["stats"]["draft_attention"] == "tidal:16" and sparse["stats"]["approximate"] is False


def test_bench_long_decodes_every_method_from_one_prefill(tmp_path, long_tiny, monkeypatch):
    from actors.runner import ModelRunner

    prefills = []
    real = ModelRunner.prefill
    monkeypatch.setattr(ModelRunner, "prefill",
                        lambda self, toks, progress=None: prefills.append(len(toks)) or real(self, toks, progress))
    out = tmp_path / "long"
    code = cli.main(["bench-long", "--target", long_tiny[0], "--draft", long_tiny[1], "--draft-dtype", "float32",
                     "--context", "768,1024", "--max-new-tokens", "6", "--needles", "1", "--codes", "1",
                     "--budget", "32", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["contexts"]) == {"768", "1024"}
    for ctx, rows in report["contexts"].items():
        assert list(rows) == ["ar", "spec-local", "spec-tidal-draft", "self-tidal", "tidal"]
        for method in ("spec-local", "spec-tidal-draft", "self-tidal"):
            assert rows[method]["identical_to_target"] is True, (ctx, method)
        assert rows["tidal"]["approximate"] is True and rows["ar"]["approximate"] is False
        assert all(set(r) >= {"tokens_per_s", "step_ms", "identical_to_target", "needle_accuracy"}
                   for r in rows.values())
        assert report["prefill"][ctx]["prompts"] == 2
    # one prefill per prompt and model (2 contexts x 2 prompts x 2 models), plus the warm-up's
    long = [n for n in prefills if n > 500]
    assert len(long) == 8, prefills
    assert (out / "report.png").stat().st_size > 0 and "approximate" in (out / "report.md").read_text()
