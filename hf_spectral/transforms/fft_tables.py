"""Tables the FFT-based DCT reads: Makhoul's reordering, twiddle factors and output gathers.

A leaf module (it imports nothing of the package), so that the PyTorch transforms in ``dct`` and the
fused CUDA kernels in ``triton_kernels`` share one copy of each table. Every table is built once per
(size, dtype, device) in float64 on the CPU and then converted, so all devices see the same values.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=256)
def orthonormal_scale(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """a_k of the orthonormal DCT-II: sqrt(1/n) for k = 0, sqrt(2/n) otherwise."""
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return scale.to(device=device, dtype=dtype)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@functools.lru_cache(maxsize=256)
def scaled_twiddle(n: int, inverse: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Forward: exp(-i pi k / 2n) * a_k for k = 0 .. n // 2 (the half spectrum of a real signal).
    Inverse: conj(exp(i pi k / 2n) / a_k) (see ``dct.idct_lastdim``). In the complex dtype of ``dtype``."""
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    scale = orthonormal_scale(n, torch.float64, torch.device("cpu"))[: n // 2 + 1]
    twiddle = twiddle / scale if inverse else twiddle * scale
    return twiddle.to(device=device, dtype=_complex_dtype(dtype))


@functools.lru_cache(maxsize=256)
def reorder_index(n: int, device: torch.device) -> torch.Tensor:
    """Makhoul's reordering [x0, x2, x4, ..., x5, x3, x1], as a gather index."""
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)]).to(device)


def _unreorder_index(n: int) -> torch.Tensor:
    # position i of the signal sits at v[i // 2] (even i) or v[n - 1 - i // 2] (odd i)
    i = torch.arange(n)
    return torch.where(i % 2 == 0, i // 2, n - 1 - i // 2)


@functools.lru_cache(maxsize=256)
def dct_output_index(n: int, keep: int, device: torch.device) -> torch.Tensor:
    """Output j of the DCT sits at Re(W_j) (j <= n // 2) or at -Im(W_{n-j}), in view_as_real's flat layout."""
    j = torch.arange(keep)
    return torch.where(j <= n // 2, 2 * j, 2 * (n - j) + 1).to(device)


@functools.lru_cache(maxsize=256)
def idct_input_index(n: int, device: torch.device) -> torch.Tensor:
    """(y_k, y_{n-k}) for k = 0 .. n // 2, interleaved; k = 0 reads y_0 twice (the irfft ignores the
    imaginary part of the zero-frequency bin)."""
    k = torch.arange(n // 2 + 1)
    return torch.stack([k, torch.where(k == 0, 0, n - k)], dim=-1).reshape(-1).to(device)


@functools.lru_cache(maxsize=256)
def idct_output_index(n: int, device: torch.device) -> torch.Tensor:
    """irfft(conj(X)) is irfft(X) reversed circularly: that reversal folded into the un-reordering."""
    return (-_unreorder_index(n)).remainder(n).to(device)
