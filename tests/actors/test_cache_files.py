"""Cached files are trusted only when whole: a conversion step whose output was cut short (a
crash, a full disk) is redone, and every cache write is flushed before it is renamed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from actors import builtins
from actors.paths import CACHE_ENV, durable_replace, safetensors_whole


def test_a_safetensors_file_cut_short_is_not_whole(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(3, 4)}, str(path))
    assert safetensors_whole(path)
    data = path.read_bytes()
    for cut in (len(data) - 1, 100, 9, 0):
        path.write_bytes(data[:cut])
        assert not safetensors_whole(path), cut
    path.write_bytes(data + b"\0")  # longer than its header says: not what was written either
    assert not safetensors_whole(path)
    path.write_bytes(b"\xff" * 64)
    assert not safetensors_whole(path)
    assert not safetensors_whole(tmp_path / "missing.safetensors")


def test_durable_replace_moves_the_file_into_place(tmp_path):
    tmp, dest = tmp_path / "x.tmp", tmp_path / "x"
    dest.write_text("old")
    tmp.write_text("new")
    durable_replace(tmp, dest)
    assert dest.read_text() == "new" and not tmp.exists()


class Steps:
    """The three conversion steps of a built-in, writing small stand-in files (the real ones
    take minutes on the real GGUF); counts what ran."""

    def __init__(self, chunks):
        self.chunks, self.ran = chunks, []

    def join(self, b, out, progress):
        self.ran.append("join")
        (out / builtins.GGUF_NAME).write_bytes(b"".join(p.read_bytes() for p in self.chunks))

    def config(self, out):
        self.ran.append("config")
        (out / "config.json").write_text(json.dumps({"model_type": "qwen2"}))

    def dense(self, b, out, progress):
        self.ran.append("dense")
        save_file({"w": torch.zeros(64)}, str(out / "model.safetensors"))


@pytest.fixture
def steps(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    chunks = [tmp_path / f"part{i}" for i in range(3)]
    for i, p in enumerate(chunks):
        p.write_bytes(bytes([i]) * (100 + i))
    s = Steps(chunks)
    monkeypatch.setattr(builtins, "_chunk_paths", lambda b: chunks)
    monkeypatch.setattr(builtins, "_check_builtin_installed", lambda b: None)
    monkeypatch.setattr(builtins, "_join_gguf", s.join)
    monkeypatch.setattr(builtins, "_write_config_and_tokenizer", s.config)
    monkeypatch.setattr(builtins, "_convert_dense", s.dense)
    return s


def test_each_conversion_step_runs_once_and_is_then_trusted(steps):
    out = builtins.ensure_converted("qwen2.5-coder-0.5b", progress=False)
    assert steps.ran == ["join", "config", "dense"]
    assert builtins.ensure_converted("qwen2.5-coder-0.5b", progress=False) == out
    assert steps.ran == ["join", "config", "dense"]


@pytest.mark.parametrize("damage,redone", [
    ("model.gguf", ["join"]),  # shorter than its chunks
    ("config.json", ["config"]),  # JSON cut short
    ("model.safetensors", ["dense"]),  # shorter than its header says
])
def test_a_file_cut_short_is_redone_not_trusted(steps, damage, redone):
    out = builtins.ensure_converted("qwen2.5-coder-0.5b", progress=False)
    data = (out / damage).read_bytes()
    (out / damage).write_bytes(data[: len(data) // 2])
    steps.ran.clear()
    builtins.ensure_converted("qwen2.5-coder-0.5b", progress=False)
    assert steps.ran == redone


def test_sharded_weights_are_checked_shard_by_shard(steps):
    out = builtins.ensure_converted("qwen2.5-coder-0.5b", progress=False, dense=False)
    for i in (1, 2):
        save_file({f"w{i}": torch.zeros(32)}, str(out / f"model-0000{i}-of-00002.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}))
    builtins.ensure_converted("qwen2.5-coder-0.5b", progress=False)
    assert "dense" not in steps.ran
    shard = out / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    builtins.ensure_converted("qwen2.5-coder-0.5b", progress=False)
    assert steps.ran[-1] == "dense"
