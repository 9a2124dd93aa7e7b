from __future__ import annotations

import re
import time

import pytest

from actors.builtins import builtin_dir
from cluster.long_prompts import CODE_ASK, code_prompts, long_prompts, needle_found, needle_prompts

from tiny import char_tokenizer

# One token per character: cheap at 16k, and every cut shows in the token count exactly.
TOK = char_tokenizer(128)
CTX = 4096


def n_tokens(text: str, tok=TOK) -> int:
    return len(tok(text)["input_ids"])


def needle_depth(p, tok=TOK) -> float:
    """Where the needle sentence starts, as a fraction of the text's tokens."""
    at = p.text.index("The secret access code for the")
    enc = tok(p.text, return_offsets_mapping=True)
    first = next(i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= at)
    return first / len(enc["input_ids"])


def in_window(text: str, context: int, reserve: int = 160, tok=TOK) -> bool:
    return context - reserve - 64 <= n_tokens(text, tok) <= context - reserve


@pytest.mark.parametrize("context", [CTX, 16384])
def test_every_prompt_fits_the_token_window(context):
    prompts = long_prompts(TOK, context, needles=3, codes=2)
    assert [p.kind for p in prompts] == ["needle"] * 3 + ["code"] * 2
    for p in prompts:
        assert in_window(p.text, context), (p.name, n_tokens(p.text))


def test_reserve_moves_the_window():
    (p,) = needle_prompts(TOK, CTX, depths=(0.5,), reserve=1000)
    assert in_window(p.text, CTX, reserve=1000)


def test_same_arguments_same_text_other_seed_other_text():
    a = long_prompts(TOK, CTX, needles=2, codes=1, seed=3)
    b = long_prompts(TOK, CTX, needles=2, codes=1, seed=3)
    c = long_prompts(TOK, CTX, needles=2, codes=1, seed=4)
    assert a == b
    assert all(x.text != y.text for x, y in zip(a, c))
    assert a[0].answer != c[0].answer


def test_long_prompts_spreads_depths_and_names():
    prompts = long_prompts(TOK, CTX, needles=3, codes=1)
    assert [p.depth for p in prompts] == [0.1, 0.5, 0.9, None]
    assert [p.name for p in prompts] == ["needle-4096-d0.1", "needle-4096-d0.5", "needle-4096-d0.9", "code-4096-0"]
    assert [p.depth for p in long_prompts(TOK, CTX, needles=1, codes=0)] == [0.5]


def test_needle_appears_once_and_the_question_asks_for_it():
    prompts = needle_prompts(TOK, CTX, depths=(0.1, 0.5, 0.9))
    assert len({p.answer for p in prompts}) == 3  # each needle its own secret
    for p in prompts:
        city = p.text.split("The secret access code for the ", 1)[1].split(" vault", 1)[0]
        assert p.text.count(f"The secret access code for the {city} vault is {p.answer}.") == 1
        assert p.text.count(p.answer) == 1 and p.text.count("The secret access code") == 1
        assert p.text.endswith(f"What is the secret access code for the {city} vault? Answer with the code only.")
        assert needle_found(p.answer, f"The code is {p.answer}.")


@pytest.mark.parametrize("context", [CTX, 16384])
def test_needle_sits_at_the_requested_depth(context):
    depths = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    got = [needle_depth(p) for p in needle_prompts(TOK, context, depths=depths)]
    for want, d in zip(depths, got):
        assert abs(d - want) <= 0.05, (want, d)
    assert got == sorted(got)


def test_haystack_mixes_prose_and_stdlib_code():
    for p in needle_prompts(TOK, CTX, depths=(0.1, 0.5, 0.9)):
        prose = sum(len(line) for line in p.text.splitlines() if re.fullmatch(r"([A-Z][a-z ]+\. ?)+", line))
        assert 0.15 <= prose / len(p.text) <= 0.85, (p.name, prose / len(p.text))
        assert p.text.count("# file: ") >= 1 and re.search(r"^\s*(def|class|import|from|return) ", p.text, re.M)


def test_code_prompts_are_stdlib_files_then_the_request():
    prompts = code_prompts(TOK, CTX, count=2, seed=1)
    assert [p.name for p in prompts] == ["code-4096-0", "code-4096-1"]
    heads = []
    for p in prompts:
        assert p.kind == "code" and p.answer is None and p.depth is None
        assert p.text.startswith("# file: ") and p.text.endswith(CODE_ASK)
        heads.append({line for line in p.text.splitlines() if line.startswith("# file: ")})
    assert prompts[0].text != prompts[1].text and not heads[0] & heads[1]


def test_needle_found():
    assert needle_found("7391-4826", "The code is 7391-4826.")
    assert needle_found("7391-4826", "7391 -\n4826")
    assert not needle_found("7391-4826", "The code is 7391-4827.")
    assert not needle_found("7391-4826", "The code is 17391-4826.")
    assert not needle_found("7391-4826", "")


class Untouchable:
    """A tokenizer that fails the test if used: bad arguments must be refused before any work."""

    is_fast = True

    def __call__(self, *a, **kw):
        raise AssertionError("tokenized before validating arguments")


@pytest.mark.parametrize("call", [
    lambda t: needle_prompts(t, 500),  # 340 tokens after the reserve: no room for a haystack
    lambda t: needle_prompts(t, CTX, reserve=CTX - 100),
    lambda t: needle_prompts(t, CTX, reserve=-1),
    lambda t: needle_prompts(t, CTX, depths=(0.5, 1.5)),
    lambda t: needle_prompts(t, CTX, depths=(-0.1,)),
    lambda t: code_prompts(t, CTX, count=0),
    lambda t: code_prompts(t, 200),
    lambda t: long_prompts(t, CTX, needles=-1),
    lambda t: long_prompts(t, 300, needles=0, codes=0),
])
def test_bad_arguments_raise_before_any_work(call):
    with pytest.raises(ValueError):
        call(Untouchable())


@pytest.mark.skipif(not (builtin_dir("qwen2.5-coder-0.5b") / "tokenizer.json").is_file(),
                    reason="built-in Qwen2.5-Coder tokenizer not installed")
def test_real_qwen_tokenizer_at_16k():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_dir("qwen2.5-coder-0.5b"))
    start = time.perf_counter()
    prompts = long_prompts(tok, 16384)
    assert time.perf_counter() - start < 10  # about 0.3 s on 2 cores: tokenized in pieces, not in a loop
    for p in prompts:
        assert in_window(p.text, 16384, tok=tok), (p.name, n_tokens(p.text, tok))
        if p.depth is not None:
            assert abs(needle_depth(p, tok) - p.depth) <= 0.05
