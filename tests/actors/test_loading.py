from __future__ import annotations

import pytest

from actors import loading


def test_resolve_refuses_unknown_names_and_lists_builtins():
    with pytest.raises(loading.ModelNotFoundError) as e:
        loading.resolve("no-such-model")
    assert all(name in str(e.value) for name in loading.BUILTINS)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(loading.ModelNotFoundError, match="config.json"):
        loading.resolve(str(tmp_path))


def test_tiny_model_loads_through_the_common_path(tiny_dir):
    m = loading.load(tiny_dir("gemma3"), progress=False)
    assert m.vocab_size == 64 and m.context_length == 512
    assert m.tokenizer.decode(m.tokenizer("abc")["input_ids"]) == "abc"


def test_vocab_check(tiny_dir):
    a = loading.load(tiny_dir("llama"), progress=False)
    b = loading.load(tiny_dir("llama", vocab_size=80), progress=False)
    loading.check_same_vocab(a.tokenizer, a.tokenizer, 64, 64, ("a", "a"))
    with pytest.raises(ValueError, match="vocabulary"):
        loading.check_same_vocab(a.tokenizer, b.tokenizer, 64, 80, ("a", "b"))
    with pytest.raises(ValueError, match="tokenizers"):
        loading.check_same_vocab(a.tokenizer, b.tokenizer, 64, 64, ("a", "b"))
