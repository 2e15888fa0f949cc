"""The transform agrees with scipy.fft to float precision and has exact gradients."""

import numpy as np
import pytest
import scipy.fft
import torch

from hf_spectral import dct as D

SHAPES = [(1, 1), (1, 7), (5, 1), (2, 3), (7, 13), (8, 8), (17, 3), (31, 64), (97, 53), (600, 513)]


def _rel_err(a: torch.Tensor, b: np.ndarray) -> float:
    b = torch.from_numpy(np.asarray(b)).to(a.dtype)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["matmul", "fft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_transform_matches_scipy(shape, method, dtype):
    weight = torch.randn(*shape, dtype=torch.float64)
    coeffs = scipy.fft.dctn(weight.numpy(), norm="ortho")
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert _rel_err(D.dct2(weight.to(dtype), method), coeffs) < tol


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 128, 513])
def test_1d_fft_transforms_match_scipy(n):
    x = torch.randn(4, n, dtype=torch.float64)
    assert _rel_err(D.dct_lastdim(x), scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)) < 1e-12
    assert _rel_err(D.idct_lastdim(x), scipy.fft.idct(x.numpy(), norm="ortho", axis=-1)) < 1e-12
    # only the first q coefficients kept (the rest zero), as the block layouts use them
    q = max(1, n // 3)
    padded = np.zeros((4, n))
    padded[:, :q] = x[:, :q].numpy()
    assert _rel_err(D.idct_lastdim(x[:, :q], n), scipy.fft.idct(padded, norm="ortho", axis=-1)) < 1e-12
    assert _rel_err(D.dct_lastdim(x, keep=q), scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)[:, :q]) < 1e-12


def test_basis_is_orthonormal_and_cached_per_dtype_and_device():
    for n in (1, 5, 64):
        basis = D.dct_basis(n, torch.float64)
        torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64))
    assert D.dct_basis(16, torch.float32) is D.dct_basis(16, torch.float32)
    assert D.dct_basis(16, torch.float64) is not D.dct_basis(16, torch.float32)
    assert D.dct_basis(16, torch.float64).dtype == torch.float64
    assert _rel_err(D.dct_basis(7, torch.float64), scipy.fft.dct(np.eye(7), norm="ortho", axis=0)) < 1e-12


def test_projection_is_the_best_approximation_on_the_index_set():
    # Parseval: keeping the DCT on a set gives the smallest error of any coefficients on that set.
    m, n, k = 10, 12, 30
    weight = torch.randn(m, n, dtype=torch.float64)
    indices = torch.randperm(m * n)[:k]
    c_m, c_n = D.dct_basis(m, torch.float64), D.dct_basis(n, torch.float64)

    def rebuild(values):
        return c_m.T @ torch.zeros(m * n, dtype=torch.float64).index_put((indices,), values).view(m, n) @ c_n

    projected = D.dct2(weight).reshape(-1)[indices]
    best = rebuild(projected)
    perturbed = rebuild(projected + 0.01 * torch.randn(k, dtype=torch.float64))
    assert (weight - best).norm() < (weight - perturbed).norm()
    dropped = D.dct2(weight).reshape(-1).clone()
    dropped[indices] = 0
    torch.testing.assert_close((weight - best).norm(), dropped.norm())


@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (6, 5)])
def test_gradcheck(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    for method in ("matmul", "fft"):
        assert torch.autograd.gradcheck(lambda t, method=method: D.dct2(t, method), (x,))
    assert torch.autograd.gradcheck(lambda t: D.idct_lastdim(t), (x,))


def test_bad_sizes_and_methods_are_errors():
    with pytest.raises(ValueError, match="positive integer"):
        D.dct_basis(0)
    with pytest.raises(ValueError, match="method must be"):
        D.dct2(torch.zeros(2, 2), method="wavelet")


@pytest.mark.parametrize("n", [7, 8, 33])
def test_scratch_buffers_never_leak_into_results(n):
    """The CPU transforms write their intermediates into reused buffers: a result must stay what it was when
    the next transform of the same shape runs, and equal the one computed with autograd (no scratch)."""
    first, second = torch.randn(5, n, dtype=torch.float64), torch.randn(5, n, dtype=torch.float64)
    for keep in sorted({1, n // 2 + 1, n}):
        for transpose in (False, True):
            kept = D.dct_lastdim(first, keep, transpose=transpose)
            kept_copy = kept.clone()
            D.dct_lastdim(second, keep, transpose=transpose)
            torch.testing.assert_close(kept, kept_copy, rtol=0, atol=0)
            with torch.enable_grad():
                reference = D.dct_lastdim(first.clone().requires_grad_(), keep, transpose=transpose)
            torch.testing.assert_close(kept, reference.detach(), rtol=0, atol=1e-12)
        coeffs = torch.randn(5, keep, dtype=torch.float64)
        inverse = D.idct_lastdim(coeffs, n)
        inverse_copy = inverse.clone()
        D.idct_lastdim(torch.randn(5, keep, dtype=torch.float64), n)
        torch.testing.assert_close(inverse, inverse_copy, rtol=0, atol=0)
        torch.testing.assert_close(inverse, torch.from_numpy(scipy.fft.idct(np.pad(coeffs.numpy(), ((0, 0), (0, n - keep))), norm="ortho")))


def test_scratch_space_stays_within_its_bound(monkeypatch):
    monkeypatch.setattr(D, "SCRATCH_BYTES", 64 * 100 * 8)  # room for a few of the buffers below
    monkeypatch.setattr(D._scratch, "buffers", None, raising=False)
    for n in range(40, 140, 10):
        D.dct_lastdim(torch.randn(64, n, dtype=torch.float64))
        held = sum(b.numel() * b.element_size() for b in D._scratch.buffers.values())
        assert 0 < held <= D.SCRATCH_BYTES
    D.dct_lastdim(torch.randn(64, 1000, dtype=torch.float64))  # one buffer over the bound is not kept
    assert all(key[1] != (64, 1000) for key in D._scratch.buffers)
