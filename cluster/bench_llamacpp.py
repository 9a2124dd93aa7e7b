"""llama.cpp on the very same GGUF files: bench methods `llamacpp` and `llamacpp-spec`.

llama.cpp is the peer on CPUs: it computes on the quantized blocks and has its own
speculative decoding. These methods run its binaries, built from the `vendor/llama.cpp`
folder of the `llama-cpp-python` source package (how: BENCHMARKS.md), found in
`--llamacpp DIR` or `$SPECRAY_LLAMACPP_BIN`:
- `llamacpp`: `llama-completion`, the target alone, greedy (`--temp 0`);
- `llamacpp-spec`: `llama-speculative-simple` with the draft GGUF (`-md`, `--spec-type
  draft-simple --spec-draft-n-max 8`, the settings the issue measured).
Each gets the prompt as the same text our tokenizer encoded (chat template applied, special
tokens parsed), the same thread count, and a fresh process per prompt. Time is llama.cpp's
own measure of prompt processing plus generation (model loading excluded), as ours is.
Outputs come back as text, so `identical_to_target` compares text with our `ar`'s.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

LLAMACPP_ENV = "SPECRAY_LLAMACPP_BIN"
METHODS = ("llamacpp", "llamacpp-spec")
BINARIES = {"llamacpp": "llama-completion", "llamacpp-spec": "llama-speculative-simple"}


@dataclass
class LlamaRun:
    text: str
    tokens: int
    seconds: float


def find_binaries(bin_dir: str | None, methods: list[str]) -> Path:
    """The directory holding the binaries these methods need; a clear error naming what is missing."""
    where = bin_dir or os.environ.get(LLAMACPP_ENV)
    if not where:
        raise ValueError(f"{', '.join(methods)} runs llama.cpp's binaries: pass --llamacpp DIR (its build's bin "
                         f"folder) or set {LLAMACPP_ENV}; BENCHMARKS.md says how it was built")
    path = Path(where).expanduser()
    missing = [BINARIES[m] for m in methods if not (path / BINARIES[m]).is_file()]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}; build llama.cpp's targets {', '.join(missing)}")
    return path


class LlamaCpp:
    def __init__(self, bin_dir: Path, target_gguf: Path, draft_gguf: Path | None, threads: int, draft_max: int = 8):
        self.bin, self.target, self.draft = bin_dir, target_gguf, draft_gguf
        self.threads, self.draft_max = threads, draft_max

    def flags(self, method: str, max_new: int) -> list[str]:
        common = ["-m", str(self.target), "-n", str(max_new), "-t", str(self.threads), "--temp", "0",
                  "-c", "4096"]
        if method == "llamacpp":
            return common + ["-no-cnv", "--no-display-prompt", "--no-warmup"]
        return common + ["-md", str(self.draft), "-td", str(self.threads), "--spec-type", "draft-simple",
                         "--spec-draft-n-max", str(self.draft_max)]

    def run(self, method: str, prompt_text: str, max_new: int) -> LlamaRun:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(prompt_text)
        try:
            proc = subprocess.run([str(self.bin / BINARIES[method]), *self.flags(method, max_new), "-f", f.name],
                                  capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
        finally:
            os.unlink(f.name)
        if proc.returncode != 0:
            raise RuntimeError(f"{BINARIES[method]} failed ({proc.returncode}): {proc.stderr[-1500:]}")
        return parse(method, proc.stdout, proc.stderr, prompt_text)


def parse(method: str, stdout: str, stderr: str, prompt_text: str) -> LlamaRun:
    if method == "llamacpp":
        prompt = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", stderr)
        gen = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", stderr)
        if not (prompt and gen):
            raise RuntimeError(f"llama-completion printed no timings: {stderr[-800:]}")
        seconds = (float(prompt.group(1)) + float(gen.group(1))) / 1e3
        return LlamaRun(stdout, int(gen.group(2)) + 1, seconds)  # + the token the prompt pass gave
    enc = re.search(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds", stderr + stdout)
    dec = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", stderr + stdout)
    if not (enc and dec):
        raise RuntimeError(f"llama-speculative-simple printed no timings: {stderr[-800:]}")
    text = stdout.split(prompt_text, 1)[-1] if prompt_text in stdout else stdout
    return LlamaRun(text, int(dec.group(1)), float(enc.group(2)) + float(dec.group(2)))


def same_text(ours: str, theirs: str) -> bool:
    """llama.cpp may stop a few tokens later (speculation overshoots -n): equal up to the shorter."""
    a, b = ours.strip(), theirs.strip()
    n = min(len(a), len(b))
    return n > 0 and a[:n] == b[:n]
