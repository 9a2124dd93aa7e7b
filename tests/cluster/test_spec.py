"""cluster.spec: every rule about which options go together, said once, in each front end's words."""

import pytest

from cluster.spec import CONFIG_KEYS, FLAGS, DecoderSpec

T = "qwen2.5-coder-0.5b"  # a built-in name: nothing loads, the rules are checked first

BAD = [
    (dict(target=T, pipeline="turbo"), "must be one of local, sync, async, ssd"),
    (dict(target=T, dtype="float8"), "must be one of"),
    (dict(target=T, tree="random"), "must be one of static, dynamic"),
    (dict(target=T, lookahead=0), "must be >= 1"),
    (dict(), "name a"),
    (dict(target=T, combine="we:0.5"), "applies to an ensemble"),
    (dict(ensemble=("a",), combine="we:0.5"), "at least 2 models"),
    (dict(ensemble=("a", "b")), "we:LAMBDA"),
    (dict(ensemble=("a", "b"), combine="avg:1"), "combine"),
    (dict(ensemble=("a", "b"), combine="we:0.5", draft="c"), "members draft for each other"),
    (dict(ensemble=("a", "b"), combine="we:0.5", heads="medusa"), "members draft for each other"),
    (dict(ensemble=("a", "b"), combine="we:0.5", attention="tidal"), "not to an ensemble"),
    (dict(ensemble=("a", "b"), combine="we:0.5", pipeline="async"), "no async variant"),
    (dict(target=T, heads="medusa", draft="d"), "two ways to draft"),
    (dict(target=T, heads="medusa", draft="self"), "two ways to draft"),
    (dict(target=T, heads="medusa", pipeline="async"), "each tree needs the hidden state"),
    (dict(target=T, heads="medusa", pipeline="ssd"), "each tree needs the hidden state"),
    (dict(ensemble=("a", "b"), combine="we:0.5", pipeline="ssd"), "no async variant"),
    (dict(target=T, pipeline="ssd"), "needs"),
    (dict(target=T, draft="self", pipeline="sync"), "drafts over its own KV cache"),
    (dict(target=T, pipeline="async"), "needs"),
    (dict(target=T, draft="ngram", pipeline="sync"), "costs microseconds"),
    (dict(target=T, draft="ngram", draft_attention="tidal"), "no model to attend"),
    (dict(target=T, heads="medusa", draft="ngram"), "two ways to draft"),
    (dict(target=T, backend="hf", draft="ngram"), "is ours only"),
    (dict(target=T, draft_attention="tidal"), "sets how a draft attends"),
    (dict(target=T, draft="self", attention="tidal"), "give one of them"),
    (dict(target=T, attention="quest:4"), "attention must be 'tidal'"),
    (dict(target=T, draft="d", draft_attention="tidal:0"), "positive integer"),
    (dict(target=T, backend="vllm"), "must be one of specray, hf, llamacpp"),
    (dict(target=T, backend="hf", heads="medusa"), "is ours only"),
    (dict(target=T, backend="hf", draft="d", pipeline="sync"), "is ours only"),
    (dict(target=T, backend="hf", draft="self"), "is ours only"),
    (dict(target=T, backend="hf", dtype="int4"), "dense target"),
    (dict(target="qwen2.5-coder-1.5b-linear", backend="hf"), "softmax base"),
    (dict(ensemble=("a", "b"), combine="we:0.5", backend="hf"), "decodes one target"),
    (dict(target=T, llamacpp="/opt/llama/bin"), "names llama.cpp's binaries"),
    (dict(target=T, backend="llamacpp", llamacpp="/nonexistent/bin"), "has no llama-completion"),
]


@pytest.mark.parametrize("fields, words", BAD)
def test_each_bad_combination_has_one_rule_in_each_front_ends_words(fields, words):
    with pytest.raises(ValueError, match=words) as flags:
        DecoderSpec(**fields, names=FLAGS)
    with pytest.raises(ValueError, match=words) as keys:
        DecoderSpec(**fields, names=CONFIG_KEYS)
    # the same rule fired; only the way options are named differs (--draft-attention X / draft_attention: X)
    def words_of(e):
        return str(e.value).replace("--", "").replace("-", "_").replace(" ", "").replace(":", "")

    assert words_of(flags) == words_of(keys)


def test_good_specs_pass_and_say_which_builder():
    assert DecoderSpec(target=T).kind == "local"
    assert DecoderSpec(target=T, draft="d", pipeline="async").kind == "ray-pipeline"
    assert DecoderSpec(target=T, heads="medusa", pipeline="sync").kind == "ray-pipeline"
    assert DecoderSpec(target=T, draft="d", pipeline="sync").kind == "ray-pipeline"  # one request (the CLI)
    assert DecoderSpec(target=T, draft="d", pipeline="sync", batch=object()).kind == "remote-drafter"  # Serve
    assert DecoderSpec(target=T, heads="medusa", pipeline="sync", batch=object()).kind == "remote-drafter"
    assert DecoderSpec(target=T, draft="d", pipeline="async", batch=object()).kind == "remote-drafter"
    assert DecoderSpec(target=T, draft="self", draft_attention="tidal:8").kind == "local"
    assert DecoderSpec(target=T, draft="ngram").kind == "local"
    for sparse in ({"attention": "tidal"}, {"draft_attention": "tidal:8"}):  # long contexts batch too
        assert DecoderSpec(target=T, draft="d", pipeline="async", batch=object(), **sparse).kind == "remote-drafter"
    assert DecoderSpec(ensemble=["a", "b"], combine="we:0.5").ensemble == ("a", "b")
    assert DecoderSpec(ensemble=("a", "b"), combine="we:0.5", pipeline="sync").kind == "ensemble"
    assert DecoderSpec(target=T, backend="hf", draft="d").kind == "hf"  # the peers: bench baselines


def test_llamacpp_backend_needs_its_binaries_and_gguf_files(tmp_path, monkeypatch):
    from cluster.bench_llamacpp import LLAMACPP_ENV

    monkeypatch.delenv(LLAMACPP_ENV, raising=False)
    with pytest.raises(ValueError, match="--llamacpp DIR"):
        DecoderSpec(target=T, backend="llamacpp")
    (tmp_path / "llama-completion").write_text("")
    dense = tmp_path / "model"  # a local model directory without a .gguf file
    dense.mkdir()
    with pytest.raises(ValueError, match="reads GGUF files: --target .* has none"):
        DecoderSpec(target=str(dense), backend="llamacpp", llamacpp=str(tmp_path))


def test_the_serve_args_and_the_cli_refuse_with_the_same_rule(capsys):
    from pydantic import ValidationError

    from cluster import cli
    from cluster.serve.config import ServeArgs

    with pytest.raises(ValidationError, match="heads run with pipeline: local"):
        ServeArgs(heads="medusa", pipeline="async")
    assert cli.main(["generate", "--target", T, "--heads", "medusa", "--pipeline", "async", "--prompt", "x"]) == 2
    assert "--heads run with --pipeline local" in capsys.readouterr().err
