"""The orthonormal 2-D DCT and its inverse, as pure tensor functions.

A weight W (m x n, out x in) and its coefficients S are related by

    S = C_m W C_n^T          (forward, DCT-II on both axes)
    W = C_m^T S C_n          (inverse, DCT-III on both axes)

where ``C_k[f, i] = a_f cos(pi (2i + 1) f / (2k))``, ``a_0 = sqrt(1/k)``, ``a_f = sqrt(2/k)``.
``C_k`` is orthonormal, so the inverse is the transpose and energy is preserved (Parseval).

Here: the basis matrices (``dct_basis``), the FFT-based DCT and inverse along the last dimension
(``dct_lastdim`` / ``idct_lastdim``, Makhoul's algorithm, O(n log n) per row), and the full 2-D
transform ``dct2`` by either. Which one runs where is the cost model's choice (``compute/cost_model.py``,
through ``CoefficientSpace``). Nothing here knows about PEFT or nn.Module.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict

import torch

from . import fft_tables, triton_kernels

__all__ = ["dct_basis", "dct2", "dct_lastdim", "idct_lastdim", "scratch_buffer", "uses_scratch"]

# Scratch space of the CPU transforms, per thread: their intermediates (the reordered signal, its spectrum,
# the inverse FFT's output) are written into buffers kept from the last call of the same shape instead of
# fresh allocations. A fresh buffer of a few megabytes costs the CPU allocator a page fault per 4 KiB touched
# (the allocator returns large blocks to the system on free), which cost more than the FFT itself. At most
# this many bytes are kept per thread (least recently used first out); a larger buffer is not kept.
SCRATCH_BYTES = 64 << 20
_scratch = threading.local()


def scratch_buffer(role: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer for one intermediate (``role``), reused across calls on this thread: what is
    written into it is valid until the next call with the same role and shape."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = OrderedDict()
    key = (role, shape, dtype, device)
    buffer = buffers.get(key)
    if buffer is not None:
        buffers.move_to_end(key)
        return buffer
    buffer = torch.empty(shape, dtype=dtype, device=device)
    size = buffer.numel() * buffer.element_size()
    if size <= SCRATCH_BYTES:
        buffers[key] = buffer
        held = sum(b.numel() * b.element_size() for b in buffers.values())
        while held > SCRATCH_BYTES:
            _, dropped = buffers.popitem(last=False)
            held -= dropped.numel() * dropped.element_size()
    return buffer


def uses_scratch(x: torch.Tensor) -> bool:
    """Scratch buffers serve CPU tensors outside autograd (``out=`` ops record no graph) and outside
    ``torch.compile`` (which plans its own buffers)."""
    return (
        x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
    )


@functools.lru_cache(maxsize=128)
def _dct_basis_cached(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built in float64 on the CPU so every dtype and device gets the same correctly rounded values.
    f = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    basis = torch.cos(math.pi * (2 * i + 1) * f / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.to(device=device, dtype=dtype)


def dct_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``C_n`` (n x n), rows indexed by frequency.

    Cached per (n, dtype, device): treat the result as read-only.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"DCT size must be a positive integer, got {n!r}.")
    return _dct_basis_cached(n, dtype, torch.device(device) if device is not None else torch.device("cpu"))


def dct_lastdim(
    x: torch.Tensor, keep: int | None = None, transpose: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension through a real FFT; only the first ``keep`` outputs.

    Makhoul (1980): reorder to [x0, x2, x4, ..., x5, x3, x1]; with V the FFT of the reordered signal
    and W_k = exp(-i pi k / 2n) V_k, the unnormalised DCT-II is y_k = Re(W_k), and for a real signal
    y_{n-k} = -Im(W_k). A real FFT gives V_0 .. V_{n//2}, which is all that is needed: half the
    memory and time of a complex FFT. Four passes over the data besides the FFT itself.
    ``transpose=True`` (2-D input) returns the result transposed and contiguous, in the same passes.
    ``out``: a contiguous tensor of the result's shape to write it into (a scratch buffer), on the CPU.
    """
    n = x.shape[-1]
    keep = n if keep is None else keep
    if x.numel() == 0:  # no rows (an empty batch): the FFT libraries refuse a zero batch
        y = x.new_zeros(*x.shape[:-1], keep)
        return y.transpose(-1, -2).contiguous() if transpose else y
    if x.is_cuda and triton_kernels.usable(x):
        return triton_kernels.dct_lastdim(x, keep, transpose)
    half = n // 2 + 1
    reorder = fft_tables.reorder_index(n, x.device)
    twiddle = fft_tables.scaled_twiddle(n, False, x.dtype, x.device)
    if uses_scratch(x):
        v = torch.index_select(x, -1, reorder, out=scratch_buffer("dct.signal", tuple(x.shape), x.dtype, x.device))
        spectrum_shape = (*x.shape[:-1], half)
        w = scratch_buffer("dct.spectrum", spectrum_shape, twiddle.dtype, x.device)
        torch.fft.rfft(v, dim=-1, out=w).mul_(twiddle)
    else:
        v = x.index_select(-1, reorder)
        w = torch.fft.rfft(v, dim=-1) * twiddle
    if keep <= half:
        y = w.real[..., :keep]
        y = y.transpose(-1, -2) if transpose else y
        return y.contiguous() if out is None else out.copy_(y)
    flat = torch.view_as_real(w).flatten(-2)
    index = fft_tables.dct_output_index(n, keep, x.device)
    if transpose:
        y = torch.index_select(flat.transpose(-1, -2), -2, index, **({} if out is None else {"out": out}))
        y[..., half:, :].neg_()
    else:
        y = torch.index_select(flat, -1, index, **({} if out is None else {"out": out}))
        y[..., half:].neg_()
    return y


def idct_lastdim(coeffs: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """The inverse of :func:`dct_lastdim`: DCT-III along the last dimension through an inverse real FFT.

    ``coeffs`` may hold only the first q <= n coefficients (the rest are zero). With y = coeffs / a,
    V_k = exp(i pi k / 2n) (y_k - i y_{n-k}) (y_n = 0) is the half spectrum of the reordered signal.
    It is computed as conj(X) with X = conj(exp(i pi k / 2n) / a_k) (y_k + i y_{n-k}), and irfft(conj(X))
    is irfft(X) reversed, which the final gather undoes together with the reordering.
    """
    q = coeffs.shape[-1]
    n = q if n is None else n
    if coeffs.numel() == 0:  # no rows (an empty batch): the FFT libraries refuse a zero batch
        return coeffs.new_zeros(*coeffs.shape[:-1], n)
    half = n // 2 + 1
    tw = fft_tables.scaled_twiddle(n, True, coeffs.dtype, coeffs.device)
    scratch = uses_scratch(coeffs)
    if q <= n - half + 1:  # no y_{n-k} term is non-zero: a real-times-complex product
        spectrum = coeffs * tw[:q]
        if q < half:
            spectrum = torch.nn.functional.pad(torch.view_as_real(spectrum), (0, 0, 0, half - q))
            spectrum = torch.view_as_complex(spectrum)
    else:
        if q < n:
            coeffs = torch.nn.functional.pad(coeffs, (0, n - q))
        index = fft_tables.idct_input_index(n, coeffs.device)
        if scratch:
            shape = (*coeffs.shape[:-1], 2 * half)
            pairs = torch.index_select(coeffs, -1, index, out=scratch_buffer("idct.pairs", shape, coeffs.dtype, coeffs.device))
            spectrum = torch.view_as_complex(pairs.view(*pairs.shape[:-1], half, 2)).mul_(tw)
        else:
            pairs = coeffs.index_select(-1, index)
            spectrum = torch.view_as_complex(pairs.view(*pairs.shape[:-1], half, 2)) * tw
    if scratch:
        shape = (*spectrum.shape[:-1], n)
        u = torch.fft.irfft(spectrum, n=n, dim=-1, out=scratch_buffer("idct.signal", shape, coeffs.dtype, coeffs.device))
    else:
        u = torch.fft.irfft(spectrum, n=n, dim=-1)
    return u.index_select(-1, fft_tables.idct_output_index(n, coeffs.device))


def dct2(weight: torch.Tensor, method: str = "matmul") -> torch.Tensor:
    """Coefficients ``S = C_m W C_n^T`` of an m x n matrix (``scipy.fft.dctn(W, norm="ortho")``), by two matmuls
    with cached bases or by FFTs (identical results to rounding)."""
    if method not in ("matmul", "fft"):
        raise ValueError(f"method must be 'matmul' or 'fft', got {method!r}.")
    m, n = weight.shape[-2:]
    if method == "fft":
        return dct_lastdim(dct_lastdim(weight).transpose(-1, -2)).transpose(-1, -2)
    return dct_basis(m, weight.dtype, weight.device) @ weight @ dct_basis(n, weight.dtype, weight.device).T
