"""The capability probe and the dtypes it resolves, forced both ways and for real.

`SPECRAY_NATIVE_BF16=0|1` forces the probe; `ONEDNN_MAX_CPU_ISA=AVX2` makes oneDNN itself
behave as on an AVX2-only CPU (Zen 3): no bf16 inner product, the crash new users hit."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from actors import hardware, native


@pytest.mark.parametrize("forced,expected", [("0", "float32"), ("1", "bfloat16")])
def test_auto_follows_the_probe_without_native_kernels(monkeypatch, forced, expected):
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, forced)
    monkeypatch.setenv(native.ISA_ENV, "none")  # as on a machine without a C compiler
    caps = hardware.probe("cpu")
    assert caps.forced and caps.native_bf16 is (forced == "1")
    assert hardware.resolve_dtype("auto") == hardware.resolve_dtype("auto", has_gguf=True) == expected
    assert hardware.resolve_dtype("float32") == "float32"  # explicit choices stay


@pytest.mark.skipif(not native.available(), reason="no C compiler")
@pytest.mark.parametrize("forced", ["0", "1"])
def test_auto_picks_the_cheapest_form_where_native_kernels_run(monkeypatch, forced):
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, forced)
    assert hardware.resolve_dtype("auto") == "int8"
    assert hardware.resolve_dtype("auto", has_gguf=True) == "gguf"  # the file's own quantization


@pytest.mark.parametrize("isa", ["best", "none"])
def test_file_keeps_a_gguf_files_blocks_where_the_kernels_run_else_float32(monkeypatch, isa):
    if isa == "none":
        monkeypatch.setenv(native.ISA_ENV, "none")  # as on a machine without a C compiler
    gguf = "gguf" if native.available() else "float32"
    assert hardware.resolve_dtype("file", has_gguf=True) == gguf
    assert hardware.resolve_dtype("file") == "float32"  # dense weights stay dense: never int8 behind one's back
    monkeypatch.setattr(hardware, "probe", lambda device="cpu": hardware.Capabilities(
        "cuda:0", "a GPU", "sm_90", True, False))
    assert hardware.resolve_dtype("file", "cuda:0", has_gguf=True) == "float32"


def test_quantized_names_on_a_gpu_load_dense(monkeypatch):
    monkeypatch.setattr(hardware, "probe", lambda device="cpu": hardware.Capabilities(
        "cuda:0", "a GPU", "sm_90", True, False))
    hardware._warn_once.cache_clear()
    assert hardware.resolve_dtype("gguf", "cuda:0") == "bfloat16"
    assert hardware.resolve_dtype("auto", "cuda:0") == "bfloat16"


def test_explicit_bf16_without_native_support_warns_once(monkeypatch, caplog):
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, "0")
    hardware._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="actors.hardware"):
        assert hardware.resolve_dtype("bfloat16") == "bfloat16"
        assert hardware.resolve_dtype("bfloat16") == "bfloat16"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no native bf16" in lines[0] and "\n" not in lines[0]


def test_bad_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="draft_dtype must be one of file, auto, float32"):
        hardware.check_dtype_name("bf16", "draft_dtype")
    monkeypatch.setenv(hardware.FORCE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=hardware.FORCE_BF16_ENV):
        hardware.probe("cpu")


AVX2_CHILD = textwrap.dedent("""
    import json, torch
    from actors import hardware, native
    from actors.model import Transformer
    from actors import loading
    caps = hardware.probe("cpu")
    try:  # what actors/model.py used to do with every bf16 linear
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 64).bfloat16(), torch.ones(8, 64).bfloat16(),
                                           None, "none", [], "")
        raw = "ok"
    except RuntimeError as e:
        raw = str(e).splitlines()[0]
    hf = loading.load(TINY, "bfloat16").hf_model
    m = Transformer.from_hf(hf)
    chosen = m.tune_kernels()
    logits = m(torch.tensor([3, 4, 5, 6]), m.new_cache(8))
    print(json.dumps({"caps": caps.to_dict(), "raw": raw, "auto": hardware.resolve_dtype("auto"),
                      "chosen": chosen, "finite": bool(torch.isfinite(logits).all())}))
""")


def test_a_cpu_without_bf16_runs_bf16_models(tiny_dir, tmp_path):
    """For real: oneDNN capped at AVX2 refuses a bf16 inner product; the probe sees it, auto
    picks fp32, and an explicit bf16 model still runs, on kernels that work there."""
    import json

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "SPECRAY_CACHE": str(tmp_path), native.ISA_ENV: "none"}
    env.pop(hardware.FORCE_BF16_ENV, None)
    code = f"TINY = {tiny_dir('qwen2')!r}\n" + AVX2_CHILD
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["caps"]["native_bf16"] is False and out["caps"]["forced"] is False
    assert "could not create a primitive descriptor" in out["raw"]  # the bug this probe prevents
    assert out["auto"] == "float32"  # (native GGUF kernels switched off in this child)
    assert out["finite"]
    for shape, ks in out["chosen"].items():
        assert shape.endswith("bfloat16") and "onednn" not in ks, (shape, ks)
    assert "no native bf16" in proc.stderr  # the one-line warning
