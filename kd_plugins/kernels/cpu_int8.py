"""Native CPU passes for the int8 linear layers: activation statistics, codes, weight requantization, epilogue.

The eager PyTorch form of a W8A8 call walks its operands many times (``abs``, ``amax``, a scaled copy, ``round``, a
cast, then ``float()`` and two multiplies on the int32 product). Here each step is one OpenMP-parallel pass in C
(``csrc/int8_cpu.c``) with the same float operations in the same order, so every result is **bit for bit** the eager
one (tested): the kernels change the speed, never the numbers.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``; ``-O3 -march=native
-ffp-contract=off -fopenmp``) into ``$KD_PLUGINS_CACHE/kernels`` (default ``~/.cache/kd_plugins/kernels``), named by
a hash of the source, the flags and the CPU's feature flags, written atomically, and loaded with :mod:`ctypes`. It
links the OpenMP runtime torch has already loaded, so ``torch.set_num_threads`` applies. Without a compiler (or
with ``KD_PLUGINS_CPU_KERNELS=0``) :func:`available` is ``False`` and callers keep the eager path; the reason is in
:func:`unavailable_reason`.

Every function takes contiguous CPU tensors of the documented dtypes and raises ``ValueError`` otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = [
    "available",
    "disabled",
    "unavailable_reason",
    "col_absmax",
    "row_absmax",
    "quantize_rows",
    "requantize_weight",
    "scale_int32",
    "workspace",
    "worth",
    "usable",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "int8_cpu.c"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}

_f32 = ctypes.POINTER(ctypes.c_float)
_i8 = ctypes.POINTER(ctypes.c_int8)
_i32 = ctypes.POINTER(ctypes.c_int32)
_i64 = ctypes.c_int64
_int = ctypes.c_int
_SIGNATURES = {
    "kd_col_absmax": [_f32, _i64, _i64, _f32, _int],
    "kd_row_absmax": [_f32, _i64, _i64, _f32, _f32, _int],
    "kd_quantize_rows": [_f32, _i64, _i64, _f32, _f32, _i8, _int],
    "kd_requantize_weight": [_i8, _i64, _i64, _f32, _i8, _f32, _int],
    "kd_scale_int32": [_i32, _i64, _i64, _f32, _f32, _f32, _f32, _f32, _i64, _f32, _i64, _int],
}


#: Operands with fewer elements stay on the eager path: there a ctypes call's fixed cost (a few microseconds)
#: exceeds what one pass saves (measured: a 1-row decode call per layer was about 6% slower native than eager).
MIN_ELEMENTS = 8192


def worth(numel: int) -> bool:
    """Whether an operand of ``numel`` elements should use the native kernels (:data:`MIN_ELEMENTS`)."""
    return numel >= MIN_ELEMENTS


def usable(operand: torch.Tensor, *others: torch.Tensor) -> bool:
    """The one gate of the callers: every tensor on CPU, ``operand`` large enough (:func:`worth`), the kernels
    :func:`available`. Dtype and layout are the caller's to check or convert."""
    return (
        operand.device.type == "cpu"
        and all(t.device.type == "cpu" for t in others)
        and worth(operand.numel())
        and available()
    )


#: Temporaries larger than this are allocated per call instead of kept in the workspace.
WORKSPACE_MAX_BYTES = 64 << 20


class _Workspace(threading.local):
    buffers: dict | None = None


_WORKSPACE = _Workspace()


def workspace(tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable CPU buffer of ``shape`` for temporaries that never leave one layer call (one per ``tag`` and
    thread; its contents are overwritten by the next request with the same tag).

    Why: a fresh multi-megabyte temporary per layer call is, depending on the allocator's state, new pages from the
    OS every time; measured on SmolLM2-135M at 4 x 512 tokens with several models in one process, up to 400k page
    faults (0.3-0.6 s of system time) per forward came from the per-call weight requantization and GEMM results.
    """
    if _WORKSPACE.buffers is None:
        _WORKSPACE.buffers = {}
    n = 1
    for d in shape:
        n *= int(d)
    if n * torch.empty((), dtype=dtype).element_size() > WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)  # not kept: a rare huge temporary (e.g. a quantized lm_head)
    buf = _WORKSPACE.buffers.get(tag)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        _WORKSPACE.buffers[tag] = buf
    return buf[:n].view(shape)


def _cache_dir() -> Path:
    root = os.environ.get("KD_PLUGINS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kd_plugins")
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` code must not be loaded on a CPU with fewer features)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent loader sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    if "lib" in _STATE:
        return _STATE["lib"]
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]
        lib, reason = None, None
        if os.environ.get("KD_PLUGINS_CPU_KERNELS", "1") == "0":
            reason = "disabled by KD_PLUGINS_CPU_KERNELS=0"
        elif not _SOURCE.is_file():
            reason = f"kernel source {_SOURCE} is missing from the installation"
        else:
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if cc is None:
                reason = "no C compiler found (set $CC or install gcc)"
            else:
                key = hashlib.sha256(
                    _SOURCE.read_bytes() + " ".join([cc, *_FLAGS, _cpu_flags(), torch.__version__]).encode()
                ).hexdigest()[:16]
                path = _cache_dir() / f"int8_cpu-{key}.so"
                try:
                    if not path.is_file():
                        _compile(cc, path)
                    lib = ctypes.CDLL(str(path))
                    for name, args in _SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.argtypes, fn.restype = args, None
                except (OSError, RuntimeError, AttributeError) as e:
                    lib, reason = None, f"could not build or load {path.name}: {e}"
        if reason:
            logger.info("kd_plugins native int8 CPU kernels unavailable (%s); using the eager PyTorch path", reason)
        _STATE["lib"], _STATE["reason"] = lib, reason
        return lib


class _Switch(threading.local):
    off: int = 0


_SWITCH = _Switch()


@contextlib.contextmanager
def disabled():
    """Within this block (on this thread) :func:`available` is ``False``, so the int8 layers run their eager PyTorch
    steps: the same results, for comparisons and debugging."""
    _SWITCH.off += 1
    try:
        yield
    finally:
        _SWITCH.off -= 1


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call) and not :func:`disabled`."""
    return not _SWITCH.off and _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` when the kernels are loaded)."""
    _load()
    return _STATE.get("reason")


def _lib() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native int8 CPU kernels unavailable: {_STATE.get('reason')}")
    return lib


def _check(t: torch.Tensor, dtype: torch.dtype, dims: int, name: str) -> None:
    if t.dtype != dtype or t.dim() != dims or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dims}-D CPU {dtype} tensor, got {t.dtype} {tuple(t.shape)} on {t.device}"
            f"{'' if t.is_contiguous() else ' (not contiguous)'}"
        )


def _ptr(t: torch.Tensor | None, kind):
    return None if t is None else ctypes.cast(t.data_ptr(), kind)


def _vec(t: torch.Tensor | None, n: int, name: str) -> None:
    if t is not None:
        _check(t, torch.float32, 1, name)
        if t.numel() != n:
            raise ValueError(f"{name} must have {n} entries, got {t.numel()}")


def col_absmax(x: torch.Tensor) -> torch.Tensor:
    """``max_i |x_ij|`` of a float32 ``[M, K]`` tensor (``x.abs().amax(0)``; zeros when ``M == 0``)."""
    _check(x, torch.float32, 2, "x")
    m, k = x.shape
    c = torch.zeros(k, dtype=torch.float32)
    if m and k:
        _lib().kd_col_absmax(_ptr(x, _f32), m, k, _ptr(c, _f32), torch.get_num_threads())
    return c


def row_absmax(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``max_j |x_ij| keep_j`` of a float32 ``[M, K]`` tensor (``keep`` float32 ``[K]``, 1 or 0 per column; ``None``:
    every column)."""
    _check(x, torch.float32, 2, "x")
    m, k = x.shape
    _vec(keep, k, "keep")
    t = torch.zeros(m, dtype=torch.float32)
    if m and k:
        _lib().kd_row_absmax(_ptr(x, _f32), m, k, _ptr(keep, _f32), _ptr(t, _f32), torch.get_num_threads())
    return t


def quantize_rows(x: torch.Tensor, mult: torch.Tensor, inv: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes ``round((x_ij inv_j) mult_i)`` (``inv`` ``None``: ``round(x_ij mult_i)``), rounding half to even.

    No clamp: the caller's ``mult`` must keep every value within ``[-127.5, 127.5)`` (per-token and CrossQuant row
    factors do; see :mod:`kd_plugins.quant.dynamic`).
    """
    _check(x, torch.float32, 2, "x")
    m, k = x.shape
    _vec(mult, m, "mult")
    _vec(inv, k, "inv")
    q = torch.empty(m, k, dtype=torch.int8)
    if m and k:
        _lib().kd_quantize_rows(
            _ptr(x, _f32), m, k, _ptr(inv, _f32), _ptr(mult, _f32), _ptr(q, _i8), torch.get_num_threads()
        )
    return q


def requantize_weight(
    w_int8: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 form of ``w_int8 diag(g)``: codes ``round(w_kj g_j (127 / m_k))`` and ``m_k = max(max_j |w_kj
    g_j|, 1e-30)`` (float32 ``[N]``), as :func:`kd_plugins.quant.dynamic.requantize_weight` computes them. The codes
    are written into ``out`` (contiguous int8 ``[N, K]``) when given."""
    _check(w_int8, torch.int8, 2, "w_int8")
    n, k = w_int8.shape
    _vec(g, k, "g")
    if out is None:
        q = torch.empty(n, k, dtype=torch.int8)
    else:
        _check(out, torch.int8, 2, "out")
        if tuple(out.shape) != (n, k):
            raise ValueError(f"out must be [{n}, {k}], got {tuple(out.shape)}")
        q = out
    mx = torch.full((n,), 1e-30, dtype=torch.float32)
    if n and k:
        _lib().kd_requantize_weight(
            _ptr(w_int8, _i8), n, k, _ptr(g, _f32), _ptr(q, _i8), _ptr(mx, _f32), torch.get_num_threads()
        )
    return q, mx


def scale_int32(
    acc: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(float(acc) * row_scale[:, None]) * col_scale[None, :] (+ bias)`` of an int32 ``[M, N]`` GEMM result, in one
    pass; written into ``out`` (float32 ``[M, N]`` with unit column stride, e.g. a row slice of a larger output) when
    given.

    ``extra = (a, b)`` (float32 ``[M, R]`` and ``[R, N]``, small ``R``) adds the float product ``a @ b`` in the same
    pass (dynamic CrossQuant's outlier columns), rounded as MKL's ``addmm_`` rounds it on x86 (one column: a fused
    multiply-add into the result; several: their fused multiply-add sum, then added), so it is bit for bit the eager
    ``addmm_`` where torch's BLAS is MKL on an Intel CPU (tested) and equal to float rounding elsewhere (MKL
    dispatches other kernels on AMD CPUs).
    """
    _check(acc, torch.int32, 2, "acc")
    m, n = acc.shape
    _vec(row_scale, m, "row_scale")
    _vec(col_scale, n, "col_scale")
    _vec(bias, n, "bias")
    xo = wo = None
    r = 0
    if extra is not None and extra[0].shape[1]:
        xo, wo = extra
        _check(xo, torch.float32, 2, "extra[0]")
        _check(wo, torch.float32, 2, "extra[1]")
        r = xo.shape[1]
        if xo.shape[0] != m or tuple(wo.shape) != (r, n):
            raise ValueError(f"extra must be [{m}, R] and [R, {n}], got {tuple(xo.shape)} and {tuple(wo.shape)}")
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    elif out.dtype != torch.float32 or tuple(out.shape) != (m, n) or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be float32 [{m}, {n}] with unit column stride, got {out.dtype} {tuple(out.shape)}")
    if m and n:
        _lib().kd_scale_int32(
            _ptr(acc, _i32),
            m,
            n,
            _ptr(row_scale, _f32),
            _ptr(col_scale, _f32),
            _ptr(bias, _f32),
            _ptr(xo, _f32),
            _ptr(wo, _f32),
            r,
            _ptr(out, _f32),
            out.stride(0),
            torch.get_num_threads(),
        )
    return out
