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
    assert _rel_err(D.idct2(torch.from_numpy(coeffs).to(dtype), method), weight.numpy()) < tol


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 128])
@pytest.mark.parametrize("method", ["matmul", "fft"])
def test_1d_transforms_match_scipy(n, method):
    x = torch.randn(4, n, dtype=torch.float64)
    assert _rel_err(D.dct(x, method), scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)) < 1e-12
    assert _rel_err(D.idct(x, method), scipy.fft.idct(x.numpy(), norm="ortho", axis=-1)) < 1e-12


def test_auto_method_takes_fft_for_large_cpu_sizes_and_agrees():
    weight = torch.randn(D.FFT_MIN_SIZE, 3, dtype=torch.float64)
    assert D._use_fft(weight.shape, "auto", weight.device)
    assert not D._use_fft((D.FFT_MIN_SIZE - 1, 3), "auto", weight.device)
    torch.testing.assert_close(D.dct2(weight, "auto"), D.dct2(weight, "matmul"))


def test_basis_is_orthonormal_and_cached_per_dtype_and_device():
    for n in (1, 5, 64):
        basis = D.dct_basis(n, torch.float64)
        torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64))
    assert D.dct_basis(16, torch.float32) is D.dct_basis(16, torch.float32)
    assert D.dct_basis(16, torch.float64) is not D.dct_basis(16, torch.float32)
    assert D.dct_basis(16, torch.float64).dtype == torch.float64


@pytest.mark.parametrize("shape,block", [((9, 14), (3, 5)), ((8, 8), (8, 8)), ((1, 6), (1, 2))])
def test_block_transform_is_the_corner_of_the_full_one(shape, block):
    weight = torch.randn(*shape, dtype=torch.float64)
    full = scipy.fft.dctn(weight.numpy(), norm="ortho")
    p, q = block
    assert _rel_err(D.dct2_block(weight, p, q), full[:p, :q]) < 1e-12
    padded = np.zeros(shape)
    padded[:p, :q] = full[:p, :q]
    assert _rel_err(D.idct2_block(torch.from_numpy(full[:p, :q]), *shape), scipy.fft.idctn(padded, norm="ortho")) < 1e-12


def test_block_larger_than_matrix_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        D.idct2_block(torch.zeros(4, 4), 3, 8)


@pytest.mark.parametrize("method", ["matmul", "fft"])
def test_scattered_transform_matches_scipy(method):
    m, n, k = 13, 22, 40
    indices = torch.randperm(m * n)[:k]
    values = torch.randn(k, dtype=torch.float64)
    dense = np.zeros(m * n)
    dense[indices.numpy()] = values.numpy()
    expected = scipy.fft.idctn(dense.reshape(m, n), norm="ortho")
    assert _rel_err(D.idct2_scattered(values, indices, m, n, method), expected) < 1e-12
    weight = torch.randn(m, n, dtype=torch.float64)
    full = scipy.fft.dctn(weight.numpy(), norm="ortho").reshape(-1)
    assert _rel_err(D.dct2_scattered(weight, indices, method), full[indices.numpy()]) < 1e-12


def test_projection_is_the_best_approximation_on_the_index_set():
    # Parseval: keeping the DCT on a set gives the smallest error of any coefficients on that set.
    m, n, k = 10, 12, 30
    weight = torch.randn(m, n, dtype=torch.float64)
    indices = torch.randperm(m * n)[:k]
    best = D.idct2_scattered(D.dct2_scattered(weight, indices), indices, m, n)
    perturbed = D.idct2_scattered(D.dct2_scattered(weight, indices) + 0.01 * torch.randn(k, dtype=torch.float64), indices, m, n)
    assert (weight - best).norm() < (weight - perturbed).norm()
    dropped = D.dct2(weight).reshape(-1).clone()
    dropped[indices] = 0
    torch.testing.assert_close((weight - best).norm(), dropped.norm())


@pytest.mark.parametrize("method", ["matmul", "fft"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (6, 5)])
def test_gradcheck_full(method, shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: D.idct2(t, method), (x,))
    assert torch.autograd.gradcheck(lambda t: D.dct2(t, method), (x,))


def test_gradcheck_block_and_scattered():
    block = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: D.idct2_block(b, 5, 7), (block,))
    values = torch.randn(9, dtype=torch.float64, requires_grad=True)
    indices = torch.randperm(35)[:9]
    for method in ("matmul", "fft"):
        assert torch.autograd.gradcheck(lambda v, method=method: D.idct2_scattered(v, indices, 5, 7, method), (values,))


def test_bad_sizes_and_methods_are_errors():
    with pytest.raises(ValueError, match="positive integer"):
        D.dct_basis(0)
    with pytest.raises(ValueError, match="method must be"):
        D.dct2(torch.zeros(2, 2), method="wavelet")
