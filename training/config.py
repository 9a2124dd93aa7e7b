"""The settings of `specray train-heads` and `specray linearize`, checked when they are made.

Apart from the stages so that a bad flag fails here, before a model loads or a work
directory is made (the CLI turns the ValueError into exit status 2), and so that every
stage can take the one settings object without importing the command that runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from actors import linear_attention as lin
from actors.heads import KINDS, check_width

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


@dataclass
class TrainConfig:
    target: str
    out: Path
    work: Path
    kind: str = "medusa"
    heads: int = 4
    tokens: int = 300_000  # prefilled tokens, answers first, then standard-library code
    seed: int = 0
    hot_vocab: int = 16384
    chunk: int = 512
    answer_tokens: int = 256  # longest generated answer
    answer_batch: int = 16
    questions: Path = DEFAULT_QUESTIONS
    epochs: int = 2
    batch: int = 512  # positions per step
    lr: float = 1e-3
    width: int = 512  # amphista: the auto-embedding block's width

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"train-heads --kind {self.kind!r}: one of {', '.join(KINDS)}")
        for name in ("heads", "tokens", "hot_vocab", "chunk", "answer_tokens", "answer_batch", "epochs", "batch",
                     "width"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"train-heads --{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check_width(self.kind, self.width)  # before the target loads
        if self.chunk < 2 + self.heads:
            raise ValueError(f"--chunk {self.chunk} is too short for {self.heads} heads")
        self.out, self.work, self.questions = Path(self.out), Path(self.work), Path(self.questions)


@dataclass
class LinearizeConfig:
    model: str
    out: Path
    work: Path
    tokens: int = 32768
    seq: int = 1024
    epochs: int = 3
    lr: float = 3e-3
    group: int = 64
    features: int = 64
    conv: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "seq", "epochs", "group", "features", "conv"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"linearize --{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"linearize --lr must be a positive number, got {self.lr}")
        if self.seq < 2:
            raise ValueError(f"linearize --seq must be at least 2, got {self.seq}")
        if self.tokens < self.seq:
            raise ValueError(f"linearize --tokens {self.tokens} is less than one --seq {self.seq} chunk")
        self.out, self.work = Path(self.out), Path(self.work)

    def linear_config(self) -> lin.LinearConfig:
        return lin.LinearConfig(group=self.group, features=self.features, conv=self.conv)
