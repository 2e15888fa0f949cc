"""Index sets: the right size, distinct, in range, and each one picks what it promises."""

import math

import pytest
import torch

from hf_spectral import dct, layouts

SHAPES = [(1, 1), (1, 9), (7, 1), (7, 13), (32, 32), (96, 32), (29, 31)]


@pytest.mark.parametrize("layout", [layout for layout in layouts.LAYOUTS if layout not in layouts.BLOCK_LAYOUTS])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_layout_gives_distinct_sorted_in_range_indices(layout, shape):
    m, n = shape
    coefficients = torch.randn(m, n)
    for k in {1, max(1, m * n // 3), m * n}:
        indices = layouts.select_indices(layout, m, n, k, seed=1, coefficients=coefficients)
        layouts.validate_indices(indices, m, n)
        assert indices.dtype == torch.int64
        assert torch.all(indices[1:] > indices[:-1])
        assert indices.numel() == k


def test_lowfreq_is_a_block_not_an_index_set():
    with pytest.raises(ValueError, match="lowfreq_block"):
        layouts.select_indices("lowfreq", 8, 8, 16)


@pytest.mark.parametrize("m,n,k", [(128, 128, 8192), (128, 512, 32768), (384, 128, 24576), (768, 3072, 1000)])
def test_lowfreq_block_follows_the_layer_aspect_ratio(m, n, k):
    p, q = layouts.lowfreq_block(m, n, k)
    assert p * q <= k and p * q >= 0.98 * k
    assert abs(math.log((p / q) / (m / n))) < math.log(1.6)


def test_lowfreq_block_of_a_thin_layer_fills_what_fits():
    assert layouts.lowfreq_block(1, 100, 50) == (1, 50)
    assert layouts.lowfreq_block(100, 1, 50) == (50, 1)
    assert layouts.lowfreq_block(7, 13, 91) == (7, 13)


def test_triangle_takes_the_lowest_frequencies_first():
    m, n, k = 20, 10, 37
    indices = layouts.triangle_indices(m, n, k)
    rows, cols = indices // n, indices % n
    kept = (rows / m + cols / n).max()
    everything = torch.arange(m * n)
    dropped = everything[~torch.isin(everything, indices)]
    assert kept <= (dropped // n / m + dropped % n / n).min()


def test_energy_keeps_the_largest_coefficients():
    weight = torch.randn(16, 24)
    coefficients = dct.dct2(weight)
    indices = layouts.energy_indices(coefficients, 50)
    kept = coefficients.reshape(-1)[indices].abs()
    mask = torch.ones(16 * 24, dtype=torch.bool)
    mask[indices] = False
    assert kept.min() >= coefficients.reshape(-1)[mask].abs().max()


def test_banded_splits_the_budget_over_rings_with_an_energy_share():
    m, n, k, rings = 40, 40, 400, 4
    coefficients = torch.randn(m, n)
    indices = layouts.banded_indices(coefficients, k, seed=0, rings=rings, energy_share=0.5)
    assert indices.numel() == k
    rows, cols = (indices // n).double() / m, (indices % n).double() / n
    ring = ((rows**2 + cols**2).sqrt() / math.sqrt(2) * rings).long().clamp(max=rings - 1)
    assert torch.bincount(ring, minlength=rings).tolist() == [100, 100, 100, 100]
    # all-energy and all-random versions differ; the all-energy one is the top of each ring
    assert not torch.equal(
        layouts.banded_indices(coefficients, k, 0, rings, 1.0), layouts.banded_indices(coefficients, k, 0, rings, 0.0)
    )


def test_banded_spills_a_full_ring_budget_to_other_rings():
    indices = layouts.banded_indices(torch.randn(4, 4), 15, seed=0, rings=4)
    assert indices.numel() == 15


def test_random_layout_depends_on_seed_only():
    a = layouts.select_indices("random", 30, 40, 100, seed=3)
    assert torch.equal(a, layouts.select_indices("random", 30, 40, 100, seed=3))
    assert not torch.equal(a, layouts.select_indices("random", 30, 40, 100, seed=4))


def test_data_layouts_need_coefficients():
    for layout in layouts.DATA_DEPENDENT_LAYOUTS:
        with pytest.raises(ValueError, match="existing weight"):
            layouts.select_indices(layout, 4, 4, 3)


def test_bad_layout_and_budget_are_errors_that_name_the_value():
    with pytest.raises(ValueError, match="'zigzag'"):
        layouts.select_indices("zigzag", 4, 4, 3)
    with pytest.raises(ValueError, match="k=17 is outside 1..16"):
        layouts.select_indices("random", 4, 4, 17)


@pytest.mark.parametrize(
    "n_coefficients,fraction,message",
    [
        (10, 0.5, "either n_coefficients"),
        (0, None, "positive integer"),
        (-3, None, "positive integer"),
        (2.5, None, "positive integer"),
        (None, 0.0, r"outside \(0, 1\]"),
        (None, 1.5, r"outside \(0, 1\]"),
        (13, None, "more than its 12 coefficients"),
    ],
)
def test_budget_errors(n_coefficients, fraction, message):
    with pytest.raises(ValueError, match=message):
        layouts.resolve_budget(3, 4, n_coefficients, fraction, name="h.0.attn")


def test_budget_resolution():
    assert layouts.resolve_budget(3, 4, 12, None) == 12
    assert layouts.resolve_budget(100, 100, None, 0.5) == 5000
    assert layouts.resolve_budget(3, 3, None, 0.01) == 1


def test_validate_indices_rejects_out_of_range_and_duplicates():
    with pytest.raises(ValueError, match="outside 0..11"):
        layouts.validate_indices(torch.tensor([0, 12]), 3, 4, name="fc")
    with pytest.raises(ValueError, match="duplicates"):
        layouts.validate_indices(torch.tensor([1, 1, 2]), 3, 4, name="fc")
    with pytest.raises(ValueError, match="1-D integer"):
        layouts.validate_indices(torch.tensor([1.0]), 3, 4)


# -- grid: a random p x q grid of frequencies, run as a rank-p/q product --------------------------------


@pytest.mark.parametrize("m, n, k", [(576, 576, 1000), (1536, 576, 1000), (7, 13, 91), (1, 100, 50), (40, 24, 100)])
def test_grid_keeps_lowfreqs_block_size_at_frequencies_spread_over_the_spectrum(m, n, k):
    rows, cols = layouts.grid_frequencies(m, n, k, seed=0)
    assert (len(rows), len(cols)) == layouts.lowfreq_block(m, n, k)
    for chosen, size in ((rows, m), (cols, n)):
        assert list(chosen) == sorted(set(chosen)) and 0 <= chosen[0] and chosen[-1] < size
    if len(rows) < m // 2:  # not the corner lowfreq takes: some chosen frequency lies in the upper half
        assert rows[-1] >= m // 2
    assert layouts.grid_frequencies(m, n, k, seed=1) != (rows, cols) or len(rows) == m and len(cols) == n


def test_grid_frequencies_are_pinned():
    # recomputed from the seed when an adapter is loaded: a change here would change saved adapters
    assert layouts.grid_frequencies(40, 24, 100, seed=3) == (
        (2, 10, 13, 15, 16, 22, 24, 30, 33, 34, 39), (0, 3, 8, 9, 10, 12, 18, 19, 20)
    )


@pytest.mark.parametrize("basis", ["dct", "random_orthonormal"])
def test_grid_matrix_is_the_inverse_transform_of_the_coefficients_at_the_grid(basis):
    from hf_spectral.transforms.bases import basis_matrix
    from hf_spectral.transforms.coefficient_space import make_space

    m, n = 40, 24
    space = make_space(m, n, 100, layout="grid", basis=basis, seed=3)
    assert not space.fft_ok
    values = torch.randn(space.k, dtype=torch.float64)
    full = torch.zeros(m, n, dtype=torch.float64)
    rows, cols = space.grid
    full[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = values.view(space.block)
    b_m, b_n = basis_matrix(basis, m, 3, torch.float64, "cpu"), basis_matrix(basis, n, 3, torch.float64, "cpu")
    expected = b_m.T @ full @ b_n
    if basis == "dct":
        import scipy.fft

        torch.testing.assert_close(expected, torch.from_numpy(scipy.fft.idctn(full.numpy(), norm="ortho")))
    torch.testing.assert_close(space.to_matrix(values), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(space.from_matrix(expected), values, rtol=0, atol=1e-12)


# -- sparse grid: K random cells of r random frequency rows x r random columns ----------------------------


@pytest.mark.parametrize("m, n, k, rank", [(576, 576, 1000, 64), (1536, 576, 1000, 128), (7, 13, 40, 7), (40, 24, 100, 12)])
def test_sparse_grid_puts_k_positions_on_r_rows_and_r_columns_spread_over_the_spectrum(m, n, k, rank):
    indices = layouts.select_indices("sparse_grid", m, n, k, seed=0, grid_rank=rank)
    layouts.validate_indices(indices, m, n)
    assert indices.numel() == k and torch.all(indices[1:] > indices[:-1])
    rows, cols = layouts.sparse_grid_frequencies(m, n, k, seed=0, rank=rank)
    assert (len(rows), len(cols)) == (min(rank, m), min(rank, n))
    assert set((indices // n).tolist()) <= set(rows) and set((indices % n).tolist()) <= set(cols)
    if len(rows) < m // 2:  # not a corner: frequencies from the upper half are among them
        assert rows[-1] >= m // 2 and cols[-1] >= n // 2 or len(cols) == n
    assert not torch.equal(layouts.select_indices("sparse_grid", m, n, k, seed=1, grid_rank=rank), indices)


@pytest.mark.parametrize("m, n, k", [(576, 576, 1000), (1536, 576, 1000), (8, 4096, 1000), (4096, 8, 1000), (21, 34, 90), (3, 3, 9), (1, 50, 7)])
def test_sparse_grid_by_default_has_about_4k_cells_of_rank_2_sqrt_k(m, n, k):
    p, q = layouts.sparse_grid_shape(m, n, k)
    r = math.ceil(2 * math.sqrt(k))
    assert k <= p * q <= m * n and p <= m and q <= n
    if m >= r and n >= r:  # room for the square grid: r x r
        assert (p, q) == (r, r)
    else:  # a thin layer: its thin side whole, the other widened to about 4K cells
        assert min(p, q) == min(m, n) and p * q >= min(4 * k, m * n) or max(p, q) == max(m, n)
    assert layouts.sparse_grid_shape(576, 576, 1000) == (64, 64)  # the default budget: LoRA r=64's step shape
    assert layouts.select_indices("sparse_grid", m, n, k, seed=0).numel() == k


def test_sparse_grid_positions_are_pinned():
    # recomputed from the seed when an adapter is loaded: a change here would change saved adapters
    assert layouts.sparse_grid_frequencies(40, 24, 6, seed=3, rank=5) == ((2, 8, 9, 15, 27), (5, 8, 12, 13, 22))
    assert layouts.sparse_grid_indices(40, 24, 6, seed=3, rank=5).tolist() == [53, 61, 224, 228, 229, 670]


def test_sparse_grid_budget_over_its_cells_is_an_error_that_names_the_fix():
    with pytest.raises(ValueError, match=r"grid_rank=8 has 8 x 8 = 64 cells .* budget of 100 .* at least 10, leave it None"):
        layouts.select_indices("sparse_grid", 40, 24, 100, grid_rank=8)


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "64"])  # None is the default
def test_a_bad_grid_rank_is_an_error_that_names_the_value(rank):
    from hf_spectral import SpectralConfig

    with pytest.raises(ValueError, match=f"grid_rank={rank!r} must be a positive integer"):
        SpectralConfig(n_coefficients=10, layout="sparse_grid", grid_rank=rank)


def test_a_sparse_grid_space_runs_the_factored_path_on_its_rows_and_columns():
    from hf_spectral.compute import cost_model
    from hf_spectral.transforms.coefficient_space import make_space

    space = make_space(576, 576, 1000, layout="sparse_grid", seed=0)  # grid_rank None: 64 x 64
    assert space.factorable and space.fft_ok and space.support_shape() == (64, 64)
    values = torch.randn(space.k, dtype=torch.float64)
    rows, cols = (torch.tensor(chosen) for chosen in space.grid)
    coefficients = space.all_coefficients(space.to_matrix(values))  # the m x n coefficients of the weight
    block = space.support_block(values)
    torch.testing.assert_close(coefficients[rows[:, None], cols[None, :]], block)
    coefficients[rows[:, None], cols[None, :]] = 0.0
    assert coefficients.abs().max() < 1e-12  # and none off it
    # at LoRA-like ranks the factored path is the cheapest, at every token count
    for tokens in (128, 512, 2048):
        assert cost_model.choose_path(space, "delta", tokens, "cpu", coefficient_grad=True, input_grad=True) == "factored"
