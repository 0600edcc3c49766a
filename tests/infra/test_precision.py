"""`auto` precision: bf16 only where bf16 products are fast on the machine at hand (flags first, then a measurement)."""

from __future__ import annotations

import pytest
import torch

import infra.precision as precision


@pytest.fixture(autouse=True)
def _fresh_probe():
    precision.cpu_bf16_speedup.cache_clear()
    yield
    precision.cpu_bf16_speedup.cache_clear()


def test_without_bf16_instructions_auto_is_fp32_and_nothing_is_timed(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: False)
    monkeypatch.setattr(precision, "matmul_seconds", lambda *a, **k: pytest.fail("timed a product"))
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("bf16", "cpu") == "bf16"  # an explicit choice is kept


@pytest.mark.parametrize(("fp32_s", "bf16_s", "want"), [(1.0, 4.0, "fp32"),  # emulated: slower than fp32
                                                        (1.0, 0.9, "fp32"),  # barely faster: casts would eat it
                                                        (1.0, 0.45, "bf16"),  # Zen 4 (AVX512-BF16): ~2.2x
                                                        (1.0, 0.12, "bf16")])  # AMX: ~8x
def test_with_bf16_instructions_the_measured_speed_decides(monkeypatch, fp32_s, bf16_s, want):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: True)
    calls = []

    def timed(dtypes, **_):
        calls.append(dtypes)
        return [{torch.float32: fp32_s, torch.bfloat16: bf16_s}[d] for d in dtypes]

    monkeypatch.setattr(precision, "matmul_seconds", timed)
    assert precision.resolve("auto", "cpu") == want
    assert precision.resolve("auto", "cpu") == want
    assert calls == [(torch.float32, torch.bfloat16)]  # measured once per process


def test_the_real_probe_times_both_dtypes_and_decides_consistently():
    fp32_s, bf16_s = precision.matmul_seconds((torch.float32, torch.bfloat16), n=128, reps=2)
    assert 0 < fp32_s < 1 and 0 < bf16_s < 10
    speedup = precision.cpu_bf16_speedup()
    want = precision.cpu_bf16_flags() and speedup >= precision.BF16_MIN_SPEEDUP
    assert precision.native_bf16("cpu") is want
    assert precision.resolve("auto", "cpu") == ("bf16" if want else "fp32")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        precision.resolve("fp8")
