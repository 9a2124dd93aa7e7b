"""`specray train-heads` on a tiny target: every stage, determinism, resume, accuracy report."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import training.heads_features as heads_features
import training.heads_fit as heads_fit
from actors.head_kinds import load_heads
from actors.heads import HeadsConfig
from cluster import cli


@pytest.fixture
def questions(tmp_path):
    rows = [{"question_id": 1, "category": "writing", "turns": ["write a poem about the sea"]},
            {"question_id": 2, "category": "coding", "turns": ["a benchmark category: never trained on"]},
            {"question_id": 3, "category": "qa", "turns": ["what is the sun?"]}]
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def train(target, out, work, questions, *extra):
    return cli.main(["train-heads", "--target", target, "--out", str(out), "--work", str(work), "--tokens", "3000",
                     "--heads", "3", "--hot-vocab", "40", "--questions", str(questions), *extra])


KEYS = {"medusa": {"weight", "bias", "hot_ids"},
        "amphista": {"stage1.weight", "stage1.bias", "stage2.weight", "stage2.bias", "to_block.weight",
                     "from_block.weight", "block.position", "block.norm1.weight", "block.norm1.bias",
                     "block.norm2.weight", "block.norm2.bias", "block.qkv.weight", "block.qkv.bias",
                     "block.out.weight", "block.out.bias", "block.up.weight", "block.up.bias",
                     "block.down.weight", "block.down.bias", "head_weight", "head_bias", "hot_ids"}}
ZERO_START = {"medusa": "weight", "amphista": "stage1.weight"}  # a residual writer that starts at zero


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_training_is_deterministic_and_reports_accuracy(tiny_dir, tmp_path, questions, capsys, kind):
    target = tiny_dir("qwen2")
    assert train(target, tmp_path / "a", tmp_path / "wa", questions, "--kind", kind) == 0
    printed = capsys.readouterr().out
    assert "head 2: top-1" in printed and "top-5" in printed
    assert train(target, tmp_path / "b", tmp_path / "wb", questions, "--kind", kind) == 0
    a, b = load_file(str(tmp_path / "a" / "heads.safetensors")), load_file(str(tmp_path / "b" / "heads.safetensors"))
    assert a.keys() == KEYS[kind]
    assert all(torch.equal(a[k], b[k]) for k in a) and a[ZERO_START[kind]].dtype == torch.bfloat16
    assert a[ZERO_START[kind]].abs().sum() > 0  # training moved the heads off their zero start
    cfg = HeadsConfig.read(tmp_path / "a")
    assert cfg.kind == kind
    assert cfg.n_heads == 3 and cfg.hot_vocab == 40 and len(cfg.accuracy["rank_accuracy"]) == 3
    assert all(0 <= t1 <= t5 <= 1 for t1, t5 in zip(cfg.accuracy["top1"], cfg.accuracy["top5"]))
    assert set(cfg.accuracy["stage_seconds"]) == {"load", "answers", "features", f"train-{kind}", f"evaluate-{kind}"}
    answered = [json.loads(line)["question_id"]
                for line in (tmp_path / "wa" / "answers.jsonl").read_text().splitlines()]
    assert sorted(answered) == [1, 3]  # the benchmarks' categories are never generated, let alone trained on


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_an_interrupted_run_resumes_to_the_same_heads(tiny_dir, tmp_path, questions, monkeypatch, kind):
    target = tiny_dir("qwen2")
    assert train(target, tmp_path / "whole", tmp_path / "w1", questions, "--kind", kind) == 0
    monkeypatch.setattr(heads_fit, "CHECKPOINT_EVERY", 2)
    save = heads_fit.save_state

    def save_then_stop(path, named, opt, step):
        save(path, named, opt, step)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(heads_fit, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(target, tmp_path / "resumed", tmp_path / "w2", questions, "--kind", kind)
    monkeypatch.setattr(heads_fit, "save_state", save)
    assert train(target, tmp_path / "resumed", tmp_path / "w2", questions, "--kind", kind) == 0
    whole = load_file(str(tmp_path / "whole" / "heads.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "heads.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_trained_heads_beat_untrained_ones(tiny_dir, tmp_path, questions, kind):
    """Self-distillation has to teach something: on held-out text, the trained heads' loss
    against the target's own distributions is below that of the zero start (where every
    head repeats the target's next-token guess)."""
    from actors import loading
    from actors.head_kinds import make_heads

    target = tiny_dir("qwen2")
    assert train(target, tmp_path / "h", tmp_path / "w", questions, "--epochs", "4", "--kind", kind) == 0
    heldout = heads_features.load_shards(sorted((tmp_path / "w").glob("feat-heldout-*.safetensors")))
    model = loading.load(target, "float32", progress=False).build()
    trained = load_heads(tmp_path / "h", model)
    zero = make_heads(trained.cfg, trained.hot_ids, trained.hot_head)  # the fresh start training began from
    if kind == "amphista":
        chunks = json.loads((tmp_path / "w" / "chunks.json").read_text())
        heads_features.attach_tokens(heldout, chunks["heldout"], model)

    def heldout_loss(heads):
        hot_index = torch.full((heads.cfg.vocab_size,), -1, dtype=torch.long)
        hot_index[heads.hot_ids] = torch.arange(heads.hot_ids.numel())
        pos, ends = heads_fit._positions(heldout["lengths"])
        with torch.no_grad():
            return float(heads_fit._loss(heads, heldout, hot_index, pos, ends, bf16=False))

    assert heldout_loss(trained) < heldout_loss(zero) - 0.01


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
@pytest.mark.parametrize("native", ["0", "1"])
def test_training_runs_whether_or_not_the_cpu_has_native_bf16(tiny_dir, tmp_path, questions, monkeypatch, native,
                                                               kind):
    """The probe decides the features' dtype and the bf16 product: both branches train."""
    monkeypatch.setenv("SPECRAY_NATIVE_BF16", native)
    assert train(tiny_dir("qwen2"), tmp_path / "h", tmp_path / "w", questions, "--kind", kind) == 0
    assert sum(HeadsConfig.read(tmp_path / "h").accuracy["top5"]) > 0  # (a tiny random target: top-1 may be 0)
    assert load_file(str(tmp_path / "h" / "heads.safetensors"))[ZERO_START[kind]].abs().sum() > 0


def test_a_bad_amphista_width_is_refused_before_the_target_loads(tmp_path, questions, capsys):
    assert train(str(tmp_path / "no-such-model"), tmp_path / "h", tmp_path / "w", questions, "--kind", "amphista",
                 "--width", "100") == 2
    assert "width 100 must be a multiple of 64" in capsys.readouterr().err


def test_answers_cut_short_by_a_crash_are_cut_off_and_redone(tmp_path):
    from training.heads_data import read_answers

    path = tmp_path / "answers.jsonl"
    whole = [{"question_id": i, "prompt_ids": [1, 2], "answer_ids": [3]} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in whole)
    path.write_text(text + '{"question_id": 3, "prompt_')  # the crash came mid-line
    assert read_answers(path) == whole
    assert path.read_text() == text  # the next append starts on a line of its own
    path.write_text(text[:-1])  # the last line whole but its newline lost: redo it too
    assert read_answers(path) == whole[:2] and path.read_text() == text[:text.rindex("{")]
    assert read_answers(tmp_path / "none.jsonl") == []
