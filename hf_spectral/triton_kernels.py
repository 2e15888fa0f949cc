"""Triton kernels around cuFFT for the FFT-based DCT (optional: used on CUDA when Triton imports).

The DCT through a real FFT (``dct.dct_lastdim``) is, in plain PyTorch, a gather, the FFT, a
complex twiddle product, and a gather with a sign flip on the way out: about eleven passes over
memory besides the FFT. On a GPU, where the matmuls around it take a fraction of a millisecond,
those passes dominate. The kernel here fuses the elementwise work after the FFT into one pass:

- ``dct_lastdim``: gather (torch) -> rfft (cuFFT) -> one kernel: twiddle, scale, real/imaginary
  selection, sign, truncation to ``keep`` outputs and, optionally, the transpose.

How much it gains on a GPU, and why there is no fused inverse, is measured in ``benchmarks/README.md``
(``benchmarks/transforms.py``).

Results equal the PyTorch implementation to float32 rounding (checked in ``tests/test_compute_paths.py``
on a GPU). Nothing here is needed on a CPU; without Triton every caller falls back to PyTorch.
"""

from __future__ import annotations

import os

import torch

from . import fft_tables

try:  # Triton is optional
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "usable", "dct_lastdim"]

# Set HF_SPECTRAL_DISABLE_TRITON=1 (or triton_kernels.enabled = False) to use plain PyTorch on CUDA too.
enabled = os.environ.get("HF_SPECTRAL_DISABLE_TRITON", "") in ("", "0")


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels apply: a 2-D float32 tensor on a CUDA device, outside autograd."""
    if not HAS_TRITON or not enabled or not x.is_cuda or x.dtype != torch.float32 or x.dim() != 2:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)  # the public transforms stay differentiable


if HAS_TRITON:

    @triton.jit
    def _dct_post_kernel(
        spec_ptr, tw_ptr, out_ptr, rows, n, half, keep, stride_out_r, stride_out_j,
        BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        # spec: rows x half complex (interleaved floats), tw: half complex twiddles (scaled)
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None].to(tl.int64)
        j = (tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J))[None, :].to(tl.int64)
        mask = (r < rows) & (j < keep)
        head = j < half
        k = tl.where(head, j, n - j)
        offset = r * (2 * half) + 2 * k
        vr = tl.load(spec_ptr + offset, mask=mask, other=0.0)
        vi = tl.load(spec_ptr + offset + 1, mask=mask, other=0.0)
        c = tl.load(tw_ptr + 2 * k, mask=mask, other=0.0)
        s = tl.load(tw_ptr + 2 * k + 1, mask=mask, other=0.0)
        y = tl.where(head, vr * c - vi * s, -(vr * s + vi * c))
        tl.store(out_ptr + r * stride_out_r + j * stride_out_j, y, mask=mask)


_BLOCK_R, _BLOCK_J = 32, 64


def dct_lastdim(x: torch.Tensor, keep: int, transpose: bool = False) -> torch.Tensor:
    """``dct.dct_lastdim`` for a 2-D float32 ``x`` with the twiddle pass fused (see module doc)."""
    rows, n = x.shape
    half = n // 2 + 1
    spec = torch.fft.rfft(x.index_select(-1, fft_tables.reorder_index(n, x.device)), dim=-1)
    twiddle = torch.view_as_real(fft_tables.scaled_twiddle(n, False, torch.float32, x.device))
    out = torch.empty((keep, rows) if transpose else (rows, keep), device=x.device, dtype=torch.float32)
    stride_r, stride_j = (1, rows) if transpose else (keep, 1)
    grid = (triton.cdiv(rows, _BLOCK_R), triton.cdiv(keep, _BLOCK_J))
    _dct_post_kernel[grid](
        torch.view_as_real(spec), twiddle, out, rows, n, half, keep, stride_r, stride_j,
        BLOCK_R=_BLOCK_R, BLOCK_J=_BLOCK_J,
    )
    return out

