"""The orthonormal 2-D DCT and its inverse, as pure tensor functions.

A weight W (m x n, out x in) and its coefficients S are related by

    S = C_m W C_n^T          (forward, DCT-II on both axes)
    W = C_m^T S C_n          (inverse, DCT-III on both axes)

where ``C_k[f, i] = a_f cos(pi (2i + 1) f / (2k))``, ``a_0 = sqrt(1/k)``, ``a_f = sqrt(2/k)``.
``C_k`` is orthonormal, so the inverse is the transpose and energy is preserved (Parseval).

Three shapes of coefficient set are supported, each by its own pair of functions:

- full: a dense m x n coefficient matrix (``idct2`` / ``dct2``);
- block: the top-left p x q corner (``idct2_block`` / ``dct2_block``), which never builds
  the m x n coefficient matrix;
- scattered: K (row, column) positions given as flat indices ``row * n + col``
  (``idct2_scattered`` / ``dct2_scattered``).

The full transform has two implementations with identical results: two matrix products with
cached bases (``method="matmul"``) and an FFT-based one (``method="fft"``, Makhoul's algorithm,
O(mn log mn) instead of O(mn(m + n))). ``method="auto"`` takes the FFT for large sizes on CPU,
where it measured faster, and matmuls otherwise. Nothing here knows about PEFT or nn.Module.
"""

from __future__ import annotations

import functools
import math

import torch

from . import fft_tables, triton_kernels

__all__ = [
    "dct_basis",
    "dct",
    "idct",
    "dct2",
    "idct2",
    "dct2_block",
    "idct2_block",
    "dct2_scattered",
    "dct_lastdim",
    "idct_lastdim",
    "idct2_scattered",
    "scatter_coefficients",
    "FFT_MIN_SIZE",
]

# from this size up the FFT path beats two matmuls on a CPU (benchmarks/README.md)
FFT_MIN_SIZE = 512


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


def _use_fft(sizes: tuple[int, ...], method: str, device: torch.device) -> bool:
    if method not in ("auto", "matmul", "fft"):
        raise ValueError(f"method must be 'auto', 'matmul' or 'fft', got {method!r}.")
    if method == "auto":
        return device.type == "cpu" and max(sizes) >= FFT_MIN_SIZE
    return method == "fft"


def dct_lastdim(x: torch.Tensor, keep: int | None = None, transpose: bool = False) -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension through a real FFT; only the first ``keep`` outputs.

    Makhoul (1980): reorder to [x0, x2, x4, ..., x5, x3, x1]; with V the FFT of the reordered signal
    and W_k = exp(-i pi k / 2n) V_k, the unnormalised DCT-II is y_k = Re(W_k), and for a real signal
    y_{n-k} = -Im(W_k). A real FFT gives V_0 .. V_{n//2}, which is all that is needed: half the
    memory and time of a complex FFT. Four passes over the data besides the FFT itself.
    ``transpose=True`` (2-D input) returns the result transposed and contiguous, in the same passes.
    """
    n = x.shape[-1]
    keep = n if keep is None else keep
    if x.is_cuda and triton_kernels.usable(x):
        return triton_kernels.dct_lastdim(x, keep, transpose)
    half = n // 2 + 1
    v = x.index_select(-1, fft_tables.reorder_index(n, x.device))
    w = torch.fft.rfft(v, dim=-1) * fft_tables.scaled_twiddle(n, False, x.dtype, x.device)
    if keep <= half:
        y = w.real[..., :keep]
        return y.transpose(-1, -2).contiguous() if transpose else y.contiguous()
    flat = torch.view_as_real(w).flatten(-2)
    index = fft_tables.dct_output_index(n, keep, x.device)
    if transpose:
        y = flat.transpose(-1, -2).index_select(-2, index)
        y[..., half:, :].neg_()
    else:
        y = flat.index_select(-1, index)
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
    half = n // 2 + 1
    tw = fft_tables.scaled_twiddle(n, True, coeffs.dtype, coeffs.device)
    if q <= n - half + 1:  # no y_{n-k} term is non-zero: a real-times-complex product
        spectrum = coeffs * tw[:q]
        if q < half:
            spectrum = torch.nn.functional.pad(torch.view_as_real(spectrum), (0, 0, 0, half - q))
            spectrum = torch.view_as_complex(spectrum)
    else:
        if q < n:
            coeffs = torch.nn.functional.pad(coeffs, (0, n - q))
        pairs = coeffs.index_select(-1, fft_tables.idct_input_index(n, coeffs.device))
        spectrum = torch.view_as_complex(pairs.view(*pairs.shape[:-1], half, 2)) * tw
    u = torch.fft.irfft(spectrum, n=n, dim=-1)
    return u.index_select(-1, fft_tables.idct_output_index(n, coeffs.device))


def dct(x: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension (``scipy.fft.dct(x, norm="ortho")``)."""
    n = x.shape[-1]
    if _use_fft((n,), method, x.device):
        return dct_lastdim(x)
    return x @ dct_basis(n, x.dtype, x.device).T


def idct(x: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Orthonormal DCT-III along the last dimension, the inverse of :func:`dct`."""
    n = x.shape[-1]
    if _use_fft((n,), method, x.device):
        return idct_lastdim(x)
    return x @ dct_basis(n, x.dtype, x.device)


def dct2(weight: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Coefficients ``S = C_m W C_n^T`` of an m x n matrix (``scipy.fft.dctn(W, norm="ortho")``)."""
    m, n = weight.shape[-2:]
    if _use_fft((m, n), method, weight.device):
        return dct_lastdim(dct_lastdim(weight).transpose(-1, -2)).transpose(-1, -2)
    return dct_basis(m, weight.dtype, weight.device) @ weight @ dct_basis(n, weight.dtype, weight.device).T


def idct2(coeffs: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """The matrix ``W = C_m^T S C_n`` of an m x n coefficient matrix (``scipy.fft.idctn(S, norm="ortho")``)."""
    m, n = coeffs.shape[-2:]
    if _use_fft((m, n), method, coeffs.device):
        return idct_lastdim(idct_lastdim(coeffs).transpose(-1, -2)).transpose(-1, -2)
    return dct_basis(m, coeffs.dtype, coeffs.device).T @ coeffs @ dct_basis(n, coeffs.dtype, coeffs.device)


def idct2_block(block: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The m x n matrix whose coefficients are ``block`` (p x q) in the top-left corner and zero elsewhere."""
    p, q = block.shape[-2:]
    if p > m or q > n:
        raise ValueError(f"A {p} x {q} coefficient block does not fit an {m} x {n} matrix.")
    cm = dct_basis(m, block.dtype, block.device)[:p]
    cn = dct_basis(n, block.dtype, block.device)[:q]
    return cm.T @ block @ cn


def dct2_block(weight: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """The top-left p x q corner of ``dct2(weight)``, computed without the full transform."""
    m, n = weight.shape[-2:]
    if p > m or q > n:
        raise ValueError(f"A {p} x {q} coefficient block does not fit an {m} x {n} matrix.")
    cm = dct_basis(m, weight.dtype, weight.device)[:p]
    cn = dct_basis(n, weight.dtype, weight.device)[:q]
    return cm @ weight @ cn.T


def scatter_coefficients(values: torch.Tensor, indices: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """A dense m x n coefficient matrix with ``values`` at the flat ``indices`` and zeros elsewhere."""
    dense = values.new_zeros(m * n)
    dense = dense.index_put((indices,), values)  # out of place, so autograd flows to values
    return dense.view(m, n)


def idct2_scattered(
    values: torch.Tensor, indices: torch.Tensor, m: int, n: int, method: str = "auto"
) -> torch.Tensor:
    """The m x n matrix whose coefficients are ``values`` at flat ``indices`` (row * n + col)."""
    return idct2(scatter_coefficients(values, indices, m, n), method=method)


def dct2_scattered(weight: torch.Tensor, indices: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """The coefficients of ``weight`` at flat ``indices``: the L2-best approximation on that set."""
    return dct2(weight, method=method).reshape(-1)[indices]
