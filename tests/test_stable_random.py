"""Pinned test vectors: random index sets and bases are recomputed from a seed at load time,
so these numbers must never change. If one of these fails, saved adapters with
layout="random" or basis="random_orthonormal" would silently load different coefficients."""

import numpy as np
import torch

from hf_spectral import bases, layouts, stable_random


def test_hash_keys_are_pinned():
    assert stable_random.hash_keys(0, 3).tolist() == [5197578548964807871, 12035550249420947055, 12935080325729570654]
    assert stable_random.hash_keys(12345, 2, stream=7).tolist() == [7477468842840344708, 16291080352350306553]


def test_random_index_sets_are_pinned():
    assert layouts.random_indices(64, 48, 10, seed=0).tolist() == [282, 463, 592, 774, 951, 1671, 1678, 2115, 2328, 2730]
    assert layouts.random_indices(768, 768, 5, seed=777).tolist() == [38267, 108370, 314617, 345973, 534241]


def test_normals_and_random_basis_are_pinned():
    np.testing.assert_allclose(
        stable_random.normal(3, 4), [-0.75707597579, 0.088206795871, 0.85625504227, -0.642625092683], atol=1e-11
    )
    first_row = bases.random_orthonormal_basis(5, 0, torch.float64)[0]
    np.testing.assert_allclose(first_row.numpy(), [-0.926042068, -0.2589037012, -0.2360710798, 0.0102590289, 0.139929123], atol=1e-9)


def test_choose_is_uniform_distinct_and_seed_dependent():
    picks = stable_random.choose(5, 10_000, 2_000)
    assert len(set(picks.tolist())) == 2_000 and picks.min() >= 0 and picks.max() < 10_000
    assert np.all(np.diff(picks) > 0)
    # roughly uniform: each tenth of the range gets about 200
    counts = np.bincount(picks // 1_000, minlength=10)
    assert counts.min() > 150 and counts.max() < 250
    assert not np.array_equal(picks, stable_random.choose(6, 10_000, 2_000))
    assert stable_random.choose(1, 7, 7).tolist() == list(range(7))


def test_normal_has_unit_variance():
    sample = stable_random.normal(0, 200_000)
    assert abs(sample.mean()) < 0.01 and abs(sample.std() - 1) < 0.01


def test_random_basis_is_orthonormal_and_seeded():
    basis = bases.random_orthonormal_basis(17, 3, torch.float64)
    torch.testing.assert_close(basis @ basis.T, torch.eye(17, dtype=torch.float64))
    assert not torch.allclose(basis, bases.random_orthonormal_basis(17, 4, torch.float64))
