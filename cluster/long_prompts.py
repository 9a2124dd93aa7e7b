"""Deterministic long-context prompts for `specray bench-long` (decoding at 4k and 16k tokens of context).

Two kinds, both cut by the model's own tokenizer to a token window just under the context
(`reserve` tokens are left for the chat template and the generated answer):
- needle: a haystack of seeded English-ish filler paragraphs and chunks of Python standard
  library source, with one fact ("The secret access code for the Lisbon vault is 7391-4826.")
  placed at a chosen depth, then the question. Retrieval checks that the long context is
  really attended to, not just paid for; `needle_found` scores the answer.
- code: real standard library source files (each under a `# file: NAME` header), then a
  request to summarize: the long-context case a code model meets in practice.

The standard library is read from this interpreter's own files, so the text is the same on
every run with the same Python, without shipping a corpus. The text is the user message;
callers apply the chat template.
"""

from __future__ import annotations

import bisect
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

# Below this much window there is no haystack worth the name: intro, needle and question
# alone are ~60 tokens, and the window's 64-token slack must still fit.
MIN_WINDOW = 384
RESERVE = 160  # tokens left out of the context for the chat template and the generated answer
SLACK = 64  # the text lands in [context - reserve - SLACK, context - reserve] tokens

CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Tbilisi", "Montevideo", "Reykjavik", "Kraków", "Valparaíso",
          "Osaka", "Marrakesh", "Tallinn", "Cusco", "Porto", "Dakar", "Quebec", "Bergen", "Seville", "Hobart")
NEEDLE_INTRO = ("Below is a long document: prose mixed with Python source code. "
                "Read it carefully; a question about it follows at the end.\n\n")
CODE_ASK = "\n\nSummarize what the code above does in two sentences."

# Filler vocabulary: plain words, no digits, so nothing in the haystack looks like a code.
_SUBJECTS = ("the committee", "a quiet engineer", "the old harbour", "every librarian", "the river", "our neighbour",
             "the northern garden", "a travelling musician", "the weather station", "the village school",
             "a patient gardener", "the evening train", "the museum guide", "a careful reviewer", "the baker")
_VERBS = ("described", "remembered", "repaired", "painted", "measured", "visited", "questioned", "collected",
          "ignored", "celebrated", "rearranged", "photographed", "translated", "carried", "studied")
_OBJECTS = ("the long wooden bridge", "a box of letters", "the morning schedule", "the copper lanterns",
            "an unfinished map", "the courtyard fountain", "a stack of blue notebooks", "the narrow staircase",
            "the spring festival", "a forgotten recipe", "the lighthouse lamp", "the orchard fence",
            "a pair of brass keys", "the market stalls", "the library catalogue")
_TAILS = ("before the rain began", "after a slow lunch", "with unusual care", "while the bells rang",
          "for the third time that week", "without saying a word", "as the fog lifted", "in the late afternoon",
          "under the old oak", "despite the cold wind", "near the edge of town", "once the crowd had left")


@dataclass(frozen=True)
class LongPrompt:
    name: str  # e.g. "needle-16384-d0.25" or "code-16384-0"
    kind: str  # "needle" | "code"
    text: str  # the user message (the caller applies the chat template)
    answer: str | None  # the needle's secret value for needle prompts, None for code prompts
    depth: float | None  # where the needle starts, as a fraction of the text's tokens, None for code


def needle_prompts(tokenizer, context: int, depths: Sequence[float] = (0.1, 0.5, 0.9), seed: int = 0,
                   reserve: int = RESERVE) -> list[LongPrompt]:
    """One needle-in-a-haystack prompt per depth. Each depth gets its own haystack, city and
    code (all from seed and depth), so prompts share no long prefix a cache could reuse."""
    hi = _window(context, reserve)
    depths = [float(d) for d in depths]
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"needle depths must lie in [0, 1], got {bad}")
    _need_fast(tokenizer)
    out = []
    for depth in depths:
        rng = random.Random(f"needle:{seed}:{depth!r}")  # str seeds hash stably (not PYTHONHASHSEED-dependent)
        city = rng.choice(CITIES)
        answer = f"{rng.randrange(1000, 10000)}-{rng.randrange(1000, 10000)}"
        needle = f"The secret access code for the {city} vault is {answer}."
        question = f"\n\nWhat is the secret access code for the {city} vault? Answer with the code only."
        pieces_seed = rng.getrandbits(64)
        around = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (NEEDLE_INTRO, question)]

        def build(need: int) -> str:
            hay, starts = _fill(tokenizer, _mixed_pieces(random.Random(pieces_seed)), need)
            # depth is the needle's place in the whole text (intro and question included), as a reader sees it
            k = round(depth * (around[0] + len(starts) + around[1])) - around[0]
            # a line of its own if one starts nearby; 0.5% of the haystack is far inside any depth tolerance
            at = _boundary(hay, starts, min(max(k, 0), len(starts)), near=max(8, len(starts) // 200))
            return NEEDLE_INTRO + hay[:at] + f"\n{needle}\n" + hay[at:] + question

        text = _fit(tokenizer, build, hi, fixed=NEEDLE_INTRO + needle + question)
        out.append(LongPrompt(f"needle-{context}-d{depth:g}", "needle", text, answer, depth))
    return out


def code_prompts(tokenizer, context: int, count: int = 1, seed: int = 0, reserve: int = RESERVE) -> list[LongPrompt]:
    """`count` prompts of standard library source then a request to summarize it; prompt i
    takes files i, i + count, ... of a seeded shuffle, so no two prompts share a file."""
    hi = _window(context, reserve)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    _need_fast(tokenizer)
    files = list(_stdlib_files())
    random.Random(f"code:{seed}").shuffle(files)
    out = []
    for i in range(count):
        mine = files[i::count]

        def build(need: int) -> str:
            pieces = (f"# file: {p.name}\n{_read(p)}\n" for p in mine)
            return _fill(tokenizer, pieces, need)[0] + CODE_ASK

        text = _fit(tokenizer, build, hi, fixed=CODE_ASK)
        out.append(LongPrompt(f"code-{context}-{i}", "code", text, None, None))
    return out


def long_prompts(tokenizer, context: int, needles: int = 3, codes: int = 1, seed: int = 0) -> list[LongPrompt]:
    """The benchmark's set: `needles` needle prompts at evenly spread depths (1 -> 0.5,
    3 -> 0.1, 0.5, 0.9), then `codes` code prompts."""
    if needles < 0 or codes < 0:
        raise ValueError(f"needles and codes must be >= 0, got {needles} and {codes}")
    _window(context, RESERVE)  # before any work, even when one kind is empty
    if needles == 1:
        depths = [0.5]
    else:  # ends kept off 0 and 1: a needle right after the intro or before the question is too easy
        depths = [round(0.1 + 0.8 * i / (needles - 1), 4) for i in range(needles)]
    out = needle_prompts(tokenizer, context, depths, seed) if needles else []
    return out + (code_prompts(tokenizer, context, codes, seed) if codes else [])


def needle_found(answer: str, generated_text: str) -> bool:
    """The exact secret appears in the generated text, ignoring whitespace ("7391 - 4826"
    counts) but not inside a longer number ("17391-4826" does not)."""
    want = re.sub(r"\s+", "", answer)
    if not want:
        return False
    got = re.sub(r"\s+", "", generated_text)
    return re.search(rf"(?<!\d){re.escape(want)}(?!\d)", got) is not None


# ---- building blocks ----

def _window(context: int, reserve: int) -> int:
    """The most tokens the text may have; checked before any tokenizing."""
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0, got {reserve}")
    if context - reserve < MIN_WINDOW:
        raise ValueError(f"context {context} leaves {context - reserve} tokens after reserve {reserve}; "
                         f"need at least {MIN_WINDOW} for a haystack")
    return context - reserve


def _need_fast(tokenizer) -> None:
    # Cutting by token offsets keeps the text exactly as written (decoding ids back can
    # change it: unknown characters, normalization); only fast tokenizers give offsets.
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("long prompts need a fast (Rust) tokenizer: they cut text by token offsets")


def _starts(tokenizer, text: str) -> list[int]:
    """Character offset where each token of `text` starts."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [s for s, _ in enc["offset_mapping"]]


def _fill(tokenizer, pieces: Iterator[str], need: int) -> tuple[str, list[int]]:
    """Join pieces until they hold `need` tokens, cut at exactly `need` tokens. Each piece is
    tokenized once (and capped in characters first, so a huge file costs no more than the
    window), then the joined text once more for the exact cut: linear in the window."""
    parts, have = [], 0
    for piece in pieces:
        piece = piece[:(need - have + 64) * 8]  # > 8 characters a token is rare; short counts just take more pieces
        parts.append(piece)
        have += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if have >= need:
            break
    else:
        raise ValueError(f"ran out of text before {need} tokens")
    text = "".join(parts)
    starts = _starts(tokenizer, text)
    # end on a line or word boundary a few tokens back (the window's slack absorbs them), not mid-word
    cut = _boundary(text, starts, need, near=24, ahead=False) if len(starts) > need else len(text)
    text = text[:cut].rstrip()
    return text, starts[:bisect.bisect_left(starts, len(text))]


def _boundary(text: str, starts: list[int], k: int, near: int, ahead: bool = True) -> int:
    """A character position within `near` tokens of token k (only before it unless `ahead`):
    the nearest line start if there is one, else the nearest word start, else token k itself."""
    if k >= len(starts):
        return len(text)
    c = starts[k]
    for sep in ("\n", " "):
        cands = [text.rfind(sep, 0, c) + 1] + ([text.find(sep, c) + 1] if ahead else [])
        cands = [p for p in cands if 0 < p <= len(text) and abs(bisect.bisect_left(starts, p) - k) <= near]
        if cands:
            return min(cands, key=lambda p: abs(p - c))
    return c


def _fit(tokenizer, build, hi: int, fixed: str) -> str:
    """Build with a haystack of (hi - fixed parts) tokens and check the whole text; pieces
    joined or cut mid-word can tokenize a little differently, so adjust the haystack by the
    difference and rebuild (once, in practice)."""
    need = hi - len(tokenizer(fixed, add_special_tokens=False)["input_ids"]) - 8  # 8: the joins' own tokens
    for _ in range(4):
        text = build(need)
        n = len(tokenizer(text)["input_ids"])
        if hi - SLACK <= n <= hi:
            return text
        need += hi - SLACK // 4 - n  # aim a little under hi
    raise RuntimeError(f"could not fit the text into [{hi - SLACK}, {hi}] tokens (last: {n})")


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    """Public top-level standard library modules of a useful size, sorted by name."""
    root = Path(os.path.dirname(os.__file__))
    return tuple(p for p in sorted(root.glob("*.py")) if not p.name.startswith("_") and p.stat().st_size > 8000)


@lru_cache(maxsize=64)
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences) + "\n\n"


def _code_chunk(rng: random.Random) -> str:
    """15 to 40 consecutive lines from a seeded standard library file, headed by its name."""
    path = rng.choice(_stdlib_files())
    lines = _read(path).splitlines()
    n = rng.randint(15, 40)
    at = rng.randrange(max(1, len(lines) - n))
    return f"# file: {path.name}\n" + "\n".join(lines[at:at + n]) + "\n\n"


def _mixed_pieces(rng: random.Random) -> Iterator[str]:
    """Endless haystack: prose and code in turn, about as many characters of each, so even a
    short window (or any stretch around a needle) holds both."""
    while True:
        yield "".join(_paragraph(rng) for _ in range(rng.randint(2, 4)))
        yield _code_chunk(rng)
