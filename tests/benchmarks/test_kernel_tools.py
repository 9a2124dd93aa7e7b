"""Smoke tests of benchmarks/step_profile.py and benchmarks/kernel_ab.py on a tiny GGUF
model: they run and report what they say. Timings are not checked (they belong in the
benchmarks, not in a test)."""

from __future__ import annotations

import json

import pytest

from actors import native

import tiny

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernels")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny.make_tiny_gguf(tmp_path_factory.mktemp("kt") / "q4k", "qwen2", "Q4_K", "Q6_K", hidden_size=256,
                               intermediate_size=512)


def test_step_profile_reports_the_three_layer_forms(tiny_gguf, tmp_path):
    from benchmarks.step_profile import main

    out = tmp_path / "profile"
    main(["--model", str(tiny_gguf), "--context", "12", "--steps", "2", "--rounds", "1", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").is_file()
    torch_form, fused_form = report["forms"]["torch layers"], report["forms"]["fused layers"]
    # the fused form makes the native layer calls and leaves almost no ATen work; the torch form the reverse
    assert {"rmsnorm", "rope_store", "attend_rows", "swiglu"} <= set(fused_form["calls_ms"])
    assert not {"rmsnorm", "swiglu"} & set(torch_form["calls_ms"])
    assert any(k.startswith("product Q4_K") for k in torch_form["calls_ms"])
    assert torch_form["aten_calls_per_step"] > 3 * fused_form["aten_calls_per_step"]  # 411 vs 114 here
    stack_form = report["forms"]["fused stack"]  # one call for every layer; the lm_head apart
    assert {k for k in stack_form["calls_ms"] if not k.startswith("product")} == {
        "layer stack (products and layer ops, one call)", "rmsnorm",  # the final norm
        "in the stack: products", "in the stack: layer ops"}  # timed in C
    inside = stack_form["calls_ms"]["in the stack: products"] + stack_form["calls_ms"]["in the stack: layer ops"]
    assert 0 < inside <= stack_form["calls_ms"]["layer stack (products and layer ops, one call)"]


def test_kernel_ab_finds_a_library_equal_to_itself(tiny_gguf, tmp_path, capsys):
    import shutil

    from benchmarks.kernel_ab import main

    path = native.library(native.variant())._name
    copy = shutil.copy(path, tmp_path / "copy.so")
    main(["--libs", f"{path},{copy}", "--model", str(tiny_gguf), "--reps", "2", "--rows", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("bitwise equal to it: True" in line for line in lines[1:])
