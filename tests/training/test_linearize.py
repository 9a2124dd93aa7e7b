"""`specray linearize` on a tiny model: every stage, the output loads, training helps, resume, flag errors."""

from __future__ import annotations

import json

import pytest

import training.linear_text as linear_text
import training.linear_transfer as linear_transfer
from actors import loading
from cluster import cli

CODE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 6
PROSE = "The quick brown fox jumps over the lazy dog, and then it rests in the sun. " * 5


@pytest.fixture
def small_text(monkeypatch, tmp_path):
    """A few short stdlib-like files and topics instead of the real ones: quick to tokenize."""
    files = []
    for i in range(20):
        f = tmp_path / "lib" / f"mod{i}.py"
        f.parent.mkdir(exist_ok=True)
        f.write_text(f"# module {i}\n" + CODE)
        files.append(f)
    monkeypatch.setattr(linear_text, "stdlib_files", lambda seed: files)
    monkeypatch.setattr(linear_text, "stdlib_root", lambda: tmp_path / "lib")
    import pydoc_data.topics

    monkeypatch.setattr(pydoc_data.topics, "topics", {f"topic{i}": f"topic {i}. " + PROSE for i in range(20)})


def run(model, out, work, *extra):
    return cli.main(["linearize", "--model", model, "--out", str(out), "--work", str(work), "--tokens", "384",
                     "--seq", "32", "--group", "8", "--features", "8", "--epochs", "2", "--lr", "1e-2", *extra])


def test_linearize_end_to_end_and_resume(tiny_dir, tmp_path, small_text, monkeypatch, capsys):
    model = tiny_dir("qwen2")
    out, work = tmp_path / "out", tmp_path / "work"
    assert run(model, out, work) == 0
    assert "held-out mse" in capsys.readouterr().out

    meta = json.loads((out / "linear.json").read_text())
    assert meta["base"] == model and meta["group"] == 8 and meta["features"] == 8 and meta["seq"] == 32
    init, final = meta["heldout_initial"]["mse"], meta["heldout_final"]["mse"]
    assert len(final) == 2 and all(f < i for f, i in zip(final, init))  # training lowered every layer's loss
    chunks = json.loads((work / "chunks.json").read_text())
    assert chunks["train_code_chunks"] and chunks["train_prose_chunks"]
    held = meta["heldout_docs"]
    assert held["code"] == ["mod0.py", "mod10.py"] and len(held["prose"]) == 2  # every 10th file / topic
    built = loading.load(str(out)).build()
    assert built.config.linear is not None and built.config.linear.group == 8
    from safetensors.torch import load_file

    state = load_file(str(out / "linear.safetensors"))
    assert set(state) == set(built.linear_params()) and all(t.dtype.itemsize == 2 for t in state.values())

    # a rerun resumes: nothing captured again, nothing retrained
    shards = sorted(work.glob("cap-*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a resumed run must not load the model"))
    monkeypatch.setattr(linear_transfer, "layer_loss", _no_training(linear_transfer.layer_loss))
    assert run(model, tmp_path / "out2", work) == 0
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps
    again = json.loads((tmp_path / "out2" / "linear.json").read_text())
    assert again["heldout_final"] == meta["heldout_final"]


def _no_training(layer_loss):
    def check(*args, **kw):
        import torch

        assert not torch.is_grad_enabled(), "a resumed run retrained"
        return layer_loss(*args, **kw)
    return check


@pytest.mark.parametrize("flag, value, words", [("--seq", "0", "--seq"), ("--lr", "-1", "--lr"),
                                                ("--group", "0", "--group"), ("--tokens", "8", "--tokens")])
def test_bad_flags_fail_before_loading(tiny_dir, tmp_path, monkeypatch, capsys, flag, value, words):
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("loaded before checking flags"))
    args = ["linearize", "--model", tiny_dir("qwen2"), "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"),
            "--seq", "32", flag, value]
    assert cli.main(args) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_bad_model_names_the_problem(tmp_path, capsys):
    assert cli.main(["linearize", "--model", "no-such-model", "--out", str(tmp_path / "o"),
                     "--work", str(tmp_path / "w")]) == 2
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.parametrize("native", ["0", "1"])
def test_linearize_runs_whether_or_not_the_cpu_has_native_bf16(tiny_dir, tmp_path, small_text, monkeypatch, native):
    """The probe picks the capture forward's dtype (bf16 only where native): both branches train and load."""
    from actors import loading

    monkeypatch.setenv("SPECRAY_NATIVE_BF16", native)
    assert run(tiny_dir("qwen2"), tmp_path / "out", tmp_path / "work") == 0
    assert loading.load(str(tmp_path / "out"), "float32", progress=False).build().config.linear is not None
