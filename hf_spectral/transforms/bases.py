"""The two bases a spectral layer can use: the DCT, or a seeded random orthonormal basis.

The random orthonormal basis is the control of the "Training Transformers in Cosine
Coefficient Space" ablation: same parameter count, same index sets, no frequency structure.
Rows are basis vectors in both cases, so ``W = B_m^T S B_n`` and ``S = B_m W B_n^T``.
"""

from __future__ import annotations

import functools

import torch

from . import stable_random
from .dct import dct_basis

BASES = ("dct", "random_orthonormal")


@functools.lru_cache(maxsize=64)
def _random_orthonormal_cached(n: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gaussian = torch.from_numpy(stable_random.normal(seed, n * n, stream=n)).view(n, n)
    q, r = torch.linalg.qr(gaussian)
    # QR is unique once diag(R) > 0, so the basis does not depend on the LAPACK build
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T.contiguous().to(device=device, dtype=dtype)


def random_orthonormal_basis(
    n: int, seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """A seeded n x n orthonormal matrix (rows are basis vectors), the same on every machine."""
    return _random_orthonormal_cached(n, seed, dtype, torch.device(device) if device is not None else torch.device("cpu"))


def basis_matrix(
    basis: str, n: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The n x n matrix of ``basis`` ("dct" or "random_orthonormal"); read-only, cached."""
    if basis == "dct":
        return dct_basis(n, dtype, device)
    if basis == "random_orthonormal":
        return random_orthonormal_basis(n, seed, dtype, device)
    raise ValueError(f"basis must be one of {BASES}, got {basis!r}.")
