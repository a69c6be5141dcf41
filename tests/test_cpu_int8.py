"""Native CPU passes of the int8 layers (kd_plugins.kernels.cpu_int8): bit for bit the eager PyTorch steps, integer
reference of the epilogue, bad input, and the eager fallback when the kernels cannot be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from kd_plugins.kernels import cpu_int8
from kd_plugins.quant import QuantizedLinear, dynamic
from kd_plugins.quant._core import QMAX, absmax, quantize_activations

pytestmark = pytest.mark.skipif(not cpu_int8.available(), reason=f"no native kernels: {cpu_int8.unavailable_reason()}")


def _mkl_on_intel() -> bool:
    """torch's BLAS is MKL (x86 wheels) on an Intel CPU: the outlier product then matches addmm_ bit for bit. On
    other x86 CPUs (AMD EPYC measured) MKL dispatches other kernels that round otherwise: float rounding only."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        return "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


MKL = _mkl_on_intel()
SHAPES = [(1, 1), (3, 7), (70, 64), (300, 577), (129, 2050)]


def activations(m: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, k // 3] *= 40.0  # an outlier channel
    if m > 2:
        x[1] = 0.0  # an all-zero row
    return x


@pytest.mark.parametrize("m,k", SHAPES)
def test_statistics_and_codes_equal_the_eager_steps_bit_for_bit(m, k):
    x = activations(m, k)
    assert torch.equal(cpu_int8.col_absmax(x), absmax(x, 0))
    assert torch.equal(cpu_int8.row_absmax(x), absmax(x, 1))
    plan = dynamic.plan_call(x, 0.35, 8.0, block=m)
    keep = torch.ones(k)
    keep[plan.outliers] = 0.0
    t = cpu_int8.row_absmax(x, keep)
    assert torch.equal(t, dynamic._row_absmax_masked(x, plan.outliers))
    r = dynamic.row_factors(t, 0.35)
    q_eager, _ = dynamic.quantize_rows_dynamic(x, r, plan.inv)
    assert torch.equal(cpu_int8.quantize_rows(x, QMAX / r, plan.inv), q_eager)
    # per-token codes through quantize_activations (native) vs the eager formula written out
    rt = absmax(x, 1).clamp_min(1e-30)
    q_ref = (x * (QMAX / rt)[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    q, rs, _ = quantize_activations(x, "per_token", None, None)
    assert torch.equal(q, q_ref) and torch.equal(rs, rt / QMAX)


@pytest.mark.parametrize("n,k", [(1, 1), (40, 64), (577, 300)])
def test_weight_requantization_equals_the_eager_step(n, k):
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g)
    col = torch.rand(k, generator=g) * 3
    col[0] = 0.0  # an outlier column: g_j = 0
    q_eager, s_eager = dynamic.requantize_weight(w, scale, col)
    q, m = cpu_int8.requantize_weight(w, col)
    assert torch.equal(q, q_eager) and torch.equal(scale * (m / QMAX), s_eager)
    assert q.abs().max() <= 127
    zero, mz = cpu_int8.requantize_weight(torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))
    assert (zero == 0).all() and torch.equal(mz, torch.full((3,), 1e-30))


def test_epilogue_equals_the_eager_rescale_and_the_integer_reference():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (50, 33), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (33, 21), dtype=torch.int8, generator=g)
    acc = torch._int_mm(a, b)
    rs, cs, bias = torch.rand(50, generator=g), torch.rand(21, generator=g), torch.randn(21, generator=g)
    eager = acc.float().mul_(rs[:, None]).mul_(cs[None, :]).add_(bias)
    assert torch.equal(cpu_int8.scale_int32(acc, rs, cs, bias), eager)
    assert torch.equal(cpu_int8.scale_int32(acc, rs, cs), acc.float().mul_(rs[:, None]).mul_(cs[None, :]))
    ref = (a.long() @ b.long()).double() * rs.double()[:, None] * cs.double() + bias.double()
    assert torch.allclose(eager.double(), ref, rtol=1e-6, atol=1e-5)
    # written into a row slice of a wider buffer, with the extra low-rank product of the outlier columns
    out = torch.full((60, 21), 7.0)
    for r in (1, 3):
        xo, wo = torch.randn(50, r, generator=g) * 30, torch.randn(r, 21, generator=g)
        y = cpu_int8.scale_int32(acc, rs, cs, bias, out=out[5:55], extra=(xo, wo))
        assert y.data_ptr() == out[5:55].data_ptr() and (out[:5] == 7).all() and (out[55:] == 7).all()
        ref = eager.clone().addmm_(xo, wo)
        if MKL:  # rounded as MKL's addmm_ rounds it
            assert torch.equal(y, ref)
        assert torch.allclose(y, ref, rtol=1e-6, atol=1e-3)


def test_bad_input_is_named():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="contiguous 2-D CPU torch.float32"):
        cpu_int8.col_absmax(x.t())
    with pytest.raises(ValueError, match="contiguous 2-D CPU torch.float32"):
        cpu_int8.col_absmax(x.double())
    with pytest.raises(ValueError, match="mult must have 4 entries"):
        cpu_int8.quantize_rows(x, torch.ones(3))
    with pytest.raises(ValueError, match="int8"):
        cpu_int8.requantize_weight(x, torch.ones(6))
    with pytest.raises(ValueError, match="out must be float32"):
        cpu_int8.scale_int32(torch.zeros(2, 3, dtype=torch.int32), torch.ones(2), torch.ones(3), out=torch.zeros(3, 2))
    # empty operands: zero maxima of the right length, no kernel call
    assert torch.equal(cpu_int8.col_absmax(torch.zeros(0, 5)), torch.zeros(5))
    assert cpu_int8.row_absmax(torch.zeros(0, 5)).shape == (0,)
    assert torch.equal(cpu_int8.row_absmax(torch.zeros(3, 0)), torch.zeros(3))


def _layers() -> tuple[nn.Linear, dict[str, QuantizedLinear]]:
    torch.manual_seed(0)
    lin = nn.Linear(64, 160)  # large enough for every step to take the native path (cpu_int8.MIN_ELEMENTS)
    return lin, {
        "dynamic": QuantizedLinear.from_float(lin, method="crossquant_dynamic_int8", alpha=0.35, fallback_rows=0),
        "dynamic_no_outliers": QuantizedLinear.from_float(
            lin, method="crossquant_dynamic_int8", alpha=0.35, fallback_rows=0, outlier_threshold=0
        ),
        "per_token": QuantizedLinear.from_float(lin, method="per_token"),
    }


def test_layers_give_the_eager_outputs_and_fall_back_without_the_kernels(monkeypatch):
    """The layers' outputs with the native kernels equal the eager path's (bit for bit; with outlier columns where
    torch's BLAS is MKL), and a process where the kernels cannot be built runs the eager path unchanged."""
    _, layers = _layers()
    x = torch.randn(3, 100, 64)
    x[..., 5] *= 40.0
    with torch.no_grad():
        native = {name: q(x) for name, q in layers.items()}
        dynamic.clear_shared_call()
        monkeypatch.setitem(cpu_int8._STATE, "lib", None)
        monkeypatch.setitem(cpu_int8._STATE, "reason", "test: kernels unavailable")
        assert not cpu_int8.available() and "test" in cpu_int8.unavailable_reason()
        eager = {name: q(x) for name, q in layers.items()}
    assert torch.equal(native["dynamic_no_outliers"], eager["dynamic_no_outliers"])
    assert torch.equal(native["per_token"], eager["per_token"])
    assert torch.allclose(native["dynamic"], eager["dynamic"], rtol=1e-6, atol=1e-5)
    if MKL:
        assert torch.equal(native["dynamic"], eager["dynamic"])
    dynamic.clear_shared_call()


def test_disabled_block_runs_the_eager_steps():
    _, layers = _layers()
    x = torch.randn(200, 64)
    with torch.no_grad():
        native = layers["per_token"](x)
        with cpu_int8.disabled():
            assert not cpu_int8.available()
            eager = layers["per_token"](x)
        assert cpu_int8.available()
    assert torch.equal(native, eager)


def test_the_kernels_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_PLUGINS_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_int8, "_STATE", {})
    assert not cpu_int8.available() and "KD_PLUGINS_CPU_KERNELS=0" in cpu_int8.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_int8.col_absmax(torch.ones(2, 2))
    # a broken compiler is a reason, not a crash; the cache directory is where the library is built
    monkeypatch.setenv("KD_PLUGINS_CPU_KERNELS", "1")
    monkeypatch.setenv("KD_PLUGINS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(cpu_int8, "_STATE", {})
    assert not cpu_int8.available() and "false failed" in cpu_int8.unavailable_reason()
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written


def test_every_step_of_a_large_call_takes_the_native_path(monkeypatch):
    """The layer test above is only meaningful if its calls reach the kernels: count them."""
    _, layers = _layers()
    calls = []
    for name in ("col_absmax", "row_absmax", "quantize_rows", "requantize_weight", "scale_int32"):
        real = getattr(cpu_int8, name)
        monkeypatch.setattr(cpu_int8, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    dynamic.clear_shared_call()
    with torch.no_grad():
        layers["dynamic"](torch.randn(300, 64))
    assert set(calls) == {"col_absmax", "row_absmax", "quantize_rows", "requantize_weight", "scale_int32"}
    calls.clear()
    with torch.no_grad():
        layers["per_token"](torch.randn(1, 64))  # a decode-sized call stays eager
    assert calls == []
    dynamic.clear_shared_call()
