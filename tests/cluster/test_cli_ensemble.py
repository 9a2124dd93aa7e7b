"""`specray generate|bench --ensemble`: clear refusals before any model loads, a --json run
and an interleaved ensemble,cos bench on tiny models (in process: the Ray path is
tests/cluster/test_ray_ensemble.py)."""

from __future__ import annotations

import json

import pytest

from cluster import cli

import tiny


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return tiny_dir("llama"), tiny_dir("llama", noise=0.3)


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra, words", [
    ([], "--ensemble needs --combine"),
    (["--combine", "avg:1"], "bad combine rule"),
    (["--combine", "we:0.5", "--draft", "{b}"], "--draft does not apply to --ensemble"),
    (["--combine", "cd:0.1,{b}"], "one number"),
    (["--combine", "we:0.5", "--pipeline", "async"], "no async variant"),
    (["--combine", "we:0.5", "--tree-width", "2"], "--tree-width"),
])
def test_generate_refuses_bad_ensemble_input(pair, capsys, no_model_loads, extra, words):
    a, b = pair
    extra = [x.replace("{b}", b) for x in extra]
    code, _, err = run(["generate", "--ensemble", f"{a},{b}", "--prompt", "hi", *extra], capsys)
    assert code == 2 and words in err, err


def test_generate_refuses_cd_with_three_models_and_unknown_members(pair, capsys, no_model_loads):
    a, b = pair
    code, _, err = run(["generate", "--ensemble", f"{a},{b},{a}", "--combine", "cd:0.1", "--prompt", "x"], capsys)
    assert code == 2 and "exactly 2 models" in err and "expert first" in err
    code, _, err = run(["generate", "--ensemble", f"{a},qwen9-huge", "--combine", "we:0.5", "--prompt", "x"], capsys)
    assert code == 2 and "qwen9-huge" in err
    code, _, err = run(["generate", "--ensemble", a, "--combine", "we:0.5", "--prompt", "x"], capsys)
    assert code == 2 and "at least 2" in err
    code, _, err = run(["generate", "--target", a, "--combine", "we:0.5", "--prompt", "x"], capsys)
    assert code == 2 and "--ensemble" in err


def test_generate_refuses_members_with_other_vocabularies(pair, tmp_path, capsys, no_model_loads):
    other = str(tiny.make_tiny(tmp_path / "v80", "llama", vocab_size=80))
    code, _, err = run(["generate", "--ensemble", f"{pair[0]},{other}", "--combine", "we:0.5", "--prompt", "x"],
                       capsys)
    assert code == 2 and "share a vocabulary" in err and "v80" in err


def test_generate_json_cos_equals_the_baseline(pair, capsys):
    a, b = pair
    argv = ["generate", "--ensemble", f"{a},{b}", "--combine", "we:0.6", "--prompt", "hello", "--max-new-tokens",
            "24", "--json"]
    code, out, _ = run(argv, capsys)
    assert code == 0
    cos = json.loads(out.strip().splitlines()[-1])
    assert set(cos) == {"text", "token_ids", "stats"} and cos["stats"]["new_tokens"] == len(cos["token_ids"])
    assert set(cos["stats"]) >= {"new_tokens", "target_forwards", "mean_accepted", "tokens_per_s", "wall_s"}
    code, out, _ = run(argv + ["--ensemble-method", "ensemble"], capsys)
    base = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and base["token_ids"] == cos["token_ids"] and base["text"] == cos["text"]


def test_bench_ensemble_methods(pair, tmp_path, capsys):
    a, b = pair
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("hello there", "def f(x):", "a b c")))
    # greedy with the adaptive plan (it may fall back to baseline steps), sampled with a fixed draft length
    for temperature, out, extra in (("0", tmp_path / "greedy", []),
                                    ("1", tmp_path / "sampled", ["--draft-length", "2"])):
        code, stdout, err = run(["bench", "--ensemble", f"{a},{b}", "--combine", "cd:0.2", "--methods",
                                 "ensemble,cos", "--prompts", str(prompts), "--max-new-tokens", "16",
                                 "--temperature", temperature, "--ensemble-local", "--out", str(out), *extra], capsys)
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        assert list(report["methods"]) == ["ensemble", "cos"] and report["config"]["speedup_reference"] == "ensemble"
        base, cos = report["methods"]["ensemble"], report["methods"]["cos"]
        # cos is measured against the baseline's own rate
        assert cos["speedup_vs_hf"] == pytest.approx(cos["tokens_per_s"] / base["tokens_per_s"], rel=1e-3)
        assert base["acceptance_rate"] is None  # the baseline proposes nothing
        if extra:  # two cd:0.2 members of one tiny family agree often, not always
            assert 0 < cos["acceptance_rate"] < 1
        assert cos["new_tokens"] == base["new_tokens"] == 3 * 16
        if temperature == "0":  # the baseline's outputs are the reference: cos must equal them
            assert cos["identical_to_target"] is True
        else:
            assert cos["identical_to_target"] is None
        assert (out / "report.png").stat().st_size > 0 and "| cos |" in (out / "report.md").read_text()


def test_bench_refusals(pair, tmp_path, capsys, no_model_loads):
    a, b = pair
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x"}))
    code, _, err = run(["bench", "--prompts", str(prompts), "--methods", "cos"], capsys)
    assert code == 2 and "--ensemble" in err
    code, _, err = run(["bench", "--target", a, "--draft", b, "--prompts", str(prompts), "--methods", "cos"], capsys)
    assert code == 2 and "need --ensemble" in err
    code, _, err = run(["bench", "--ensemble", f"{a},{b}", "--combine", "we:0.5", "--prompts", str(prompts),
                        "--methods", "hf"], capsys)
    assert code == 2 and "choose from ensemble, cos" in err
