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

__all__ = [
    "dct_basis",
    "dct",
    "idct",
    "dct2",
    "idct2",
    "dct2_block",
    "idct2_block",
    "dct2_scattered",
    "idct2_scattered",
    "scatter_coefficients",
    "FFT_MIN_SIZE",
]

# On a 2-core CPU the FFT path beat two matmuls from n = 512 up (3.3x at n = 4096).
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


def _orthonormal_scale(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return scale.to(device=device, dtype=dtype)


def _twiddle(n: int, sign: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # exp(sign * i * pi * k / (2n)) in the complex dtype that matches a real ``dtype``.
    k = torch.arange(n, dtype=torch.float64)
    tw = torch.polar(torch.ones(n, dtype=torch.float64), sign * math.pi * k / (2 * n))
    return tw.to(device=device, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)


def _dct_fft_lastdim(x: torch.Tensor) -> torch.Tensor:
    # Makhoul (1980): reorder to [x0, x2, x4, ..., x5, x3, x1]; then the unnormalised DCT-II is
    # y_k = Re(exp(-i pi k / 2n) V_k) with V the FFT of the reordered signal.
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(v, dim=-1)
    return (spectrum * _twiddle(n, -1.0, x.dtype, x.device)).real * _orthonormal_scale(n, x.dtype, x.device)


def _idct_fft_lastdim(coeffs: torch.Tensor) -> torch.Tensor:
    # The inverse of _dct_fft_lastdim. For a real signal V_{n-k} = conj(V_k), which gives
    # V_k = exp(i pi k / 2n) (y_k - i y_{n-k}) with y_n = 0; then v = ifft(V), and undo the reordering.
    n = coeffs.shape[-1]
    y = coeffs / _orthonormal_scale(n, coeffs.dtype, coeffs.device)
    y_mirror = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], dim=-1)
    spectrum = torch.complex(y, -y_mirror) * _twiddle(n, 1.0, coeffs.dtype, coeffs.device)
    v = torch.fft.ifft(spectrum, dim=-1).real
    return v.index_select(-1, _unreorder_index(n, coeffs.device))


@functools.lru_cache(maxsize=128)
def _unreorder_index(n: int, device: torch.device) -> torch.Tensor:
    # position i of the signal sits at v[i // 2] (even i) or v[n - 1 - i // 2] (odd i)
    i = torch.arange(n)
    return torch.where(i % 2 == 0, i // 2, n - 1 - i // 2).to(device)


def dct(x: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension (``scipy.fft.dct(x, norm="ortho")``)."""
    n = x.shape[-1]
    if _use_fft((n,), method, x.device):
        return _dct_fft_lastdim(x)
    return x @ dct_basis(n, x.dtype, x.device).T


def idct(x: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Orthonormal DCT-III along the last dimension, the inverse of :func:`dct`."""
    n = x.shape[-1]
    if _use_fft((n,), method, x.device):
        return _idct_fft_lastdim(x)
    return x @ dct_basis(n, x.dtype, x.device)


def dct2(weight: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Coefficients ``S = C_m W C_n^T`` of an m x n matrix (``scipy.fft.dctn(W, norm="ortho")``)."""
    m, n = weight.shape[-2:]
    if _use_fft((m, n), method, weight.device):
        return _dct_fft_lastdim(_dct_fft_lastdim(weight).transpose(-1, -2)).transpose(-1, -2)
    return dct_basis(m, weight.dtype, weight.device) @ weight @ dct_basis(n, weight.dtype, weight.device).T


def idct2(coeffs: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """The matrix ``W = C_m^T S C_n`` of an m x n coefficient matrix (``scipy.fft.idctn(S, norm="ortho")``)."""
    m, n = coeffs.shape[-2:]
    if _use_fft((m, n), method, coeffs.device):
        return _idct_fft_lastdim(_idct_fft_lastdim(coeffs).transpose(-1, -2)).transpose(-1, -2)
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
