"""Kernel choice by measurement: only kernels the device runs, cached per CPU, reused."""

from __future__ import annotations

import json

import pytest
import torch

from actors import hardware, kernels, loading
from actors.model import Transformer


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    return tmp_path


def tiny_model(tiny_dir, dtype: str = "float32") -> Transformer:
    return loading.load(tiny_dir("qwen2"), dtype, progress=False).build()


@pytest.mark.parametrize("native", ["0", "1"])
def test_onednn_bf16_is_a_candidate_only_with_native_bf16(monkeypatch, native):
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, native)
    bf16 = kernels.candidates(torch.bfloat16, "cpu")
    assert ("onednn" in bf16) is (native == "1" and "onednn" in kernels.candidates(torch.float32, "cpu"))
    assert "aten" in bf16 and kernels.candidates(torch.float32, "cuda") == ["aten"]


@pytest.mark.parametrize("native", ["0", "1"])
def test_tune_gives_every_linear_a_valid_kernel_and_caches_it(tiny_dir, cache, monkeypatch, native):
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, native)
    model = tiny_model(tiny_dir, "bfloat16")
    chosen = model.tune_kernels(threads=1)
    allowed = set(kernels.candidates(torch.bfloat16, "cpu"))
    assert set(chosen) == {kernels.shape_class(lin.weight) for lin in model.linears()}
    for shape, ks in chosen.items():
        assert len(ks) == kernels.MAX_ROWS and set(ks) <= allowed, (shape, ks)
    for lin in model.linears():
        assert lin.kernels == tuple(kernels.KERNELS[k] for k in chosen[kernels.shape_class(lin.weight)])
    files = list((cache / "kernels").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["choices"] == chosen

    # the second model on this CPU reads the cache: nothing is timed again
    def no_timing(*a, **k):
        raise AssertionError("re-timed a cached shape")

    monkeypatch.setattr(kernels, "_choose", no_timing)
    assert tiny_model(tiny_dir, "bfloat16").tune_kernels(threads=1) == chosen


def test_cache_is_keyed_by_what_changes_the_choice(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the suite may run with it set (the AVX2 run)
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, "1")
    caps = hardware.probe("cpu")
    base = kernels.cache_file(caps, 2)
    assert kernels.cache_file(caps, 1) != base
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, "0")
    assert kernels.cache_file(hardware.probe("cpu"), 2) != base
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, "1")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert kernels.cache_file(caps, 2) != base


def test_a_kernel_that_fails_or_is_wrong_is_never_chosen(tiny_dir, cache, monkeypatch):
    def broken(x, w, b):
        raise RuntimeError("could not create a primitive descriptor")

    def fast_but_wrong(x, w, b):
        return torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)

    monkeypatch.setitem(kernels.KERNELS, "broken", broken)
    monkeypatch.setitem(kernels.KERNELS, "wrong", fast_but_wrong)
    monkeypatch.setattr(kernels, "candidates", lambda dtype, device, caps=None: ["broken", "wrong", "aten"])
    chosen = tiny_model(tiny_dir).tune_kernels(threads=1)
    assert all(set(ks) == {"aten"} for ks in chosen.values()), chosen


def test_stale_or_foreign_cache_entries_are_ignored(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"choices": {"64x64 float32": ["nope"] * 16, "8x8 float32": ["aten"] * 3,
                                            "4x4 float32": ["aten"] * 16}}))
    assert kernels.read_cache(path) == {"4x4 float32": ["aten"] * 16}
    path.write_text("{not json")
    assert kernels.read_cache(path) == {}


def test_summary_names_row_ranges():
    ks = ["onednn"] + ["mkl_col"] + ["onednn"] * 14
    assert kernels.summarize({"a": ks}) == {"a": "1: onednn, 2: mkl_col, 3-16: onednn"}
    assert kernels.summarize({"b": ["aten"] * 16}) == {"b": "1-16: aten"}
