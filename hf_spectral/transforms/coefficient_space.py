"""The coefficient space of one adapter of one layer: its basis, its index set, and the maps between
its K coefficients and the m x n matrix they stand for.

A spectral weight is ``W = B_m^T S B_n`` with B an orthonormal basis (the DCT, or a seeded random
orthonormal basis) and S zero outside an index set Omega of K positions. Omega is either a p x q block
(coefficients in row-major p x q order) or K scattered flat positions ``row * n + col`` (every other
layout; coefficients in the order of the positions). A block is the top-left corner (``lowfreq``), or the
crossing of p chosen frequency rows and q chosen columns (``grid``): either way ``W = R_m^T S_pq R_n`` with
R the block's p (q) basis rows, which :meth:`CoefficientSpace.block_rows` gives.

This module is the only one that turns coefficients into matrices and back (the transforms themselves
live in ``dct`` and ``bases``). The layer, its compute paths, the optimiser, the adapter-file reader and
the CLI all go through a :class:`CoefficientSpace`, built by :func:`make_space`, the one function that
computes an index set from a layout.

Because the basis is orthonormal, ``from_matrix`` is both the adjoint of ``to_matrix`` (it maps a weight
gradient to the coefficients' gradient) and the L2 projection onto the space (the best K-coefficient
approximation of a weight), and ``||W||^2 = ||S||^2`` (Parseval): the error of keeping S on Omega is
``||W||^2 - ||S_Omega||^2``, with no second pass over the weight.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from ..compute import cost_model
from .bases import basis_matrix
from .dct import dct2, dct_lastdim, idct_lastdim, scratch_buffer, uses_scratch
from .index_codec import in_memory
from .layouts import (
    CALIBRATED_LAYOUTS,
    DATA_DEPENDENT_LAYOUTS,
    grid_frequencies,
    lowfreq_block,
    select_indices,
    sparse_grid_frequencies,
    validate_indices,
)

__all__ = ["CoefficientSpace", "make_space", "TRANSFORMS", "group_key", "group_to_matrix", "group_from_matrix"]

# how the transforms run: the cheaper of the two by the cost model, or one forced (for tests)
TRANSFORMS = ("auto", "fft", "matmul")


class CoefficientSpace:
    """Basis, index set and transforms of one adapter of one m x n layer.

    Args:
        m, n: the weight's shape (out x in).
        basis: ``"dct"`` or ``"random_orthonormal"``; ``seed`` seeds the random basis.
        block: (p, q) for a block, else None.
        indices: the K sorted flat positions (a 1-D integer tensor) when ``block`` is None.
        grid: the (output frequencies, input frequencies) the coefficients sit on, two sorted tuples of ints: a
            block's p and q (None for the top-left block, frequencies 0..p-1 and 0..q-1), or the rows and columns
            that hold a sparse grid's scattered positions (None for other scattered positions).

    ``transform`` ("auto", "fft" or "matmul") chooses how the DCT runs; other bases, and grids (whose rows
    an FFT would compute all of), always use matmuls.
    """

    def __init__(
        self,
        m: int,
        n: int,
        basis: str = "dct",
        seed: int = 0,
        block: Optional[tuple[int, int]] = None,
        indices: Optional[torch.Tensor] = None,
        grid: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None,
    ):
        if (block is None) == (indices is None):
            raise ValueError("A coefficient space has either a block (p, q) or scattered indices, not both or neither.")
        if grid is not None and block is not None and tuple(map(len, grid)) != tuple(block):
            raise ValueError(f"A grid of {tuple(map(len, grid))} frequencies does not match the block {block}.")
        self.m, self.n, self.basis, self.seed, self.block = m, n, basis, seed, block
        self.indices, self.grid = indices, grid
        # FFTs give every frequency in order: they serve the DCT on scattered positions (a sparse grid's too) or a
        # top-left block, not a block of chosen frequencies
        self.fft_ok = basis == "dct" and (grid is None or block is None)
        self.k = block[0] * block[1] if block is not None else int(indices.numel())
        self.transform = "auto"
        self._sparse = {}
        self._grid_rows = {}
        self._support_cache = None
        self._support_cells = {}

    def __repr__(self) -> str:
        where = f"{'grid' if self.grid else 'block'} {self.block[0]}x{self.block[1]}" if self.block else f"{self.k} scattered positions"
        return f"CoefficientSpace({self.m}x{self.n}, {self.basis}, {where})"

    # -- the bases, and transforms of activations along the last dimension ---------------------------

    def basis_rows(self, side: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The size x size basis of ``side`` ("out": m, "in": n), rows are basis vectors (cached, read-only)."""
        return basis_matrix(self.basis, self.size(side), self.seed, dtype, device)

    def block_rows(self, side: str, keep: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The ``keep`` basis rows a block's coefficients of ``side`` stand for: the first ``keep``, or the grid's."""
        rows = self.basis_rows(side, dtype, device)
        if self.grid is None or keep == self.size(side):
            return rows[:keep]
        chosen = self.grid[0 if side == "out" else 1]
        if keep != len(chosen):
            raise ValueError(f"this grid keeps {len(chosen)} {side} frequencies, not {keep}.")
        key = (side, dtype, device)
        if key not in self._grid_rows:
            self._grid_rows[key] = rows.index_select(0, torch.tensor(chosen, device=device))
        return self._grid_rows[key]

    def size(self, side: str) -> int:
        return self.m if side == "out" else self.n

    # -- the support: the frequency rows and columns the coefficients sit on -----------------------------

    @property
    def factorable(self) -> bool:
        """Whether the coefficients sit on known frequency rows and columns (a block, or a sparse grid), so that
        the ``factored`` path can run them as a product through those rows and columns."""
        return self.block is not None or self.grid is not None

    def support_shape(self) -> tuple[int, int]:
        """How many output and input frequencies the coefficients sit on (p x q for a block)."""
        if self.block is not None:
            return self.block
        rows, cols, _ = self._support()
        return len(rows), len(cols)

    def support_block(self, values: torch.Tensor) -> torch.Tensor:
        """The coefficients as the p' x q' matrix over their support's rows and columns (zero where none is kept):
        ``W = B_m[rows]^T S' B_n[cols]``. Differentiable; a block is its values, reshaped."""
        if self.block is not None:
            return values.view(*self.block)
        rows, cols, cells = self._support()
        if values.device not in self._support_cells:
            self._support_cells[values.device] = cells.to(values.device)
        cells = self._support_cells[values.device]
        return values.new_zeros(len(rows) * len(cols)).scatter(0, cells, values).view(len(rows), len(cols))

    def support_rows(self, side: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The basis rows of the support's frequencies on ``side`` (p' x m or q' x n, cached, read-only)."""
        if self.block is not None:
            return self.block_rows(side, self.block[0 if side == "out" else 1], dtype, device)
        key = ("support", side, dtype, device)
        if key not in self._grid_rows:
            chosen = self._support()[0 if side == "out" else 1]
            rows = self.basis_rows(side, dtype, device)
            self._grid_rows[key] = rows.index_select(0, torch.as_tensor(chosen, device=device))
        return self._grid_rows[key]

    def _support(self) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """Scattered positions: the rows and columns they sit on (the grid's, else their distinct ones), and each
        position's flat cell in the rows x columns block (computed once, on the CPU)."""
        if self._support_cache is None:
            flat = self.indices.detach().cpu().numpy().astype(np.int64)
            if self.grid is not None:
                rows, cols = (np.asarray(chosen, dtype=np.int64) for chosen in self.grid)
                row_of = np.minimum(np.searchsorted(rows, flat // self.n), len(rows) - 1)
                col_of = np.minimum(np.searchsorted(cols, flat % self.n), len(cols) - 1)
                if not (np.array_equal(rows[row_of], flat // self.n) and np.array_equal(cols[col_of], flat % self.n)):
                    raise ValueError("coefficient indices fall outside the sparse grid's rows and columns.")
            else:
                rows, row_of = np.unique(flat // self.n, return_inverse=True)
                cols, col_of = np.unique(flat % self.n, return_inverse=True)
            cells = torch.from_numpy(row_of * len(cols) + col_of)
            self._support_cache = (rows, cols, cells)
            self._support_cells = {cells.device: cells}
        return self._support_cache

    def analyse(
        self, x: torch.Tensor, side: str, keep: int, method: str, transpose: bool = False, scratch: bool = False
    ) -> torch.Tensor:
        """The first ``keep`` coefficients of ``x``'s rows in the basis of ``side``.

        ``scratch=True``: on the CPU, outside autograd, the result may be written into a scratch buffer
        (``dct.scratch_buffer``) that the next such call overwrites; for a result used once, right away.
        """
        if method == "fft":
            out = None
            if scratch and x.dim() == 2 and uses_scratch(x):
                out = scratch_buffer(f"analyse.{side}", (keep, x.shape[0]) if transpose else (x.shape[0], keep), x.dtype, x.device)
            return dct_lastdim(x, keep, transpose=transpose, out=out)
        out = x @ self.block_rows(side, keep, x.dtype, x.device).T
        return out.T.contiguous() if transpose else out

    def synthesise(self, c: torch.Tensor, side: str, method: str) -> torch.Tensor:
        """Rows of length m or n from their first ``c.shape[-1]`` coefficients (the rest zero)."""
        if method == "fft":
            return idct_lastdim(c, self.size(side))
        return c @ self.block_rows(side, c.shape[-1], c.dtype, c.device)

    # -- coefficients <-> matrix ----------------------------------------------------------------------

    def to_matrix(self, values: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
        """The m x n matrix ``B_m^T S B_n`` of the K coefficients ``values`` (not differentiable; the compute
        paths' ``matrix`` is)."""
        m, n = self.m, self.n
        method = method or self.weight_method(values.device)
        if not self.fft_ok:
            method = "matmul"
        if self.block is not None:
            p, q = self.block
            s = values.view(p, q)
            if method == "fft":  # rows first (p x n), then columns (n x m), transposed back
                return self.synthesise(self.synthesise(s, "in", "fft").T, "out", "fft").T
            b_m, b_n = self.block_rows("out", p, s.dtype, s.device), self.block_rows("in", q, s.dtype, s.device)
            if m * p * q + m * q * n <= p * q * n + p * n * m:
                return (b_m.T @ s) @ b_n
            return b_m.T @ (s @ b_n)
        full = values.new_zeros(m * n).index_put_((self.indices,), values).view(m, n)
        if method == "fft":
            return self.synthesise(self.synthesise(full, "in", "fft").T, "out", "fft").T
        return self.basis_rows("out", full.dtype, full.device).T @ full @ self.basis_rows("in", full.dtype, full.device)

    def from_matrix(self, matrix: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
        """The K coefficients of an m x n matrix on the index set: the adjoint of :meth:`to_matrix` (a weight
        gradient to the coefficients' gradient) and the best approximation of a weight on the set."""
        method = method or self.weight_method(matrix.device)
        if not self.fft_ok:
            method = "matmul"
        if self.block is not None:
            p, q = self.block
            if method == "fft":
                return self.analyse(self.analyse(matrix, "in", q, "fft").T, "out", p, "fft").T.reshape(-1)
            b_m = self.block_rows("out", p, matrix.dtype, matrix.device)
            b_n = self.block_rows("in", q, matrix.dtype, matrix.device)
            return (b_m @ matrix @ b_n.T).reshape(-1)
        return self.all_coefficients(matrix, method).reshape(-1)[self.indices]

    def all_coefficients(self, matrix: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
        """Every coefficient of an m x n matrix in this space's basis (m x n), ignoring the index set."""
        method = method or self.weight_method(matrix.device)
        if self.basis == "dct":
            return dct2(matrix, method=method)
        b_m, b_n = self.basis_rows("out", matrix.dtype, matrix.device), self.basis_rows("in", matrix.dtype, matrix.device)
        return b_m @ matrix @ b_n.T

    # -- which implementation: matmuls or FFTs ---------------------------------------------------------

    def weight_method(self, device: torch.device) -> str:
        """fft or matmul for ``to_matrix`` / ``from_matrix``, whichever the cost model finds cheaper."""
        if not self.fft_ok:
            return "matmul"
        if self.transform != "auto":
            return self.transform
        costs = cost_model.costs_for(device.type)
        fft, matmul = cost_model.weight_cost(self, costs, "fft"), cost_model.weight_cost(self, costs, "matmul")
        return "fft" if fft < matmul else "matmul"  # explicit, not min(key=...): torch.compile traces this

    def activation_method(self, side: str, keep: int, device: torch.device, rows: int) -> str:
        """fft or matmul for a float32 transform of ``rows`` activations, whichever is cheaper."""
        if not self.fft_ok:
            return "matmul"
        if self.transform != "auto":
            return self.transform
        costs = cost_model.costs_for(device.type)
        size = self.size(side)
        fft = cost_model.transform_cost(costs, rows, size, keep, "fft")
        return "fft" if fft < cost_model.transform_cost(costs, rows, size, keep, "matmul") else "matmul"

    # -- scattered positions as sparse matrices (built once per device) -------------------------------

    def sparse_pattern(self, device: torch.device, transposed: bool = False):
        """(crow, col, order) of S as an m x n CSR matrix (or of S^T as n x m), built once per device.

        ``order`` maps CSR positions to coefficient positions (csr_values = values[order]); it is None when
        the flat indices are already sorted, as every layout makes them. Built only by the paths that use
        them (sampled and spectral, scattered layouts): about 8 bytes per coefficient each.
        """
        key = (device.type, device.index, transposed)
        if key not in self._sparse:
            flat = self.indices.to("cpu", torch.int64)
            rows, cols, size = (flat % self.n, flat // self.n, self.n) if transposed else (flat // self.n, flat % self.n, self.m)
            order = torch.argsort(rows * max(self.m, self.n) + cols)
            if bool((order == torch.arange(order.numel())).all()):
                order = None
            crow = torch.zeros(size + 1, dtype=torch.int64)
            crow[1:] = torch.bincount(rows, minlength=size).cumsum(0)
            col = cols if order is None else cols[order]
            self._sparse[key] = (crow.to(device), col.contiguous().to(device), None if order is None else order.to(device))
        return self._sparse[key]

    def sparse_matrix(self, values: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        crow, col, order = self.sparse_pattern(values.device, transposed)
        shape = (self.n, self.m) if transposed else (self.m, self.n)
        return _csr(crow, col, values if order is None else values[order], shape)

    def sparse_product(self, values: torch.Tensor, dense: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """``S @ dense`` (m x T; ``S^T @ dense``, n x T, if ``transposed``) for S of the coefficients ``values``.

        On the CPU, outside autograd, the result is written into a scratch buffer (``dct.scratch_buffer``)
        that the next such product overwrites: for a result used once, right away.
        """
        matrix = self.sparse_matrix(values, transposed)
        if not uses_scratch(dense):
            return matrix @ dense
        rows = self.n if transposed else self.m
        out = scratch_buffer(f"sparse_product.{transposed}", (rows, dense.shape[1]), dense.dtype, dense.device)
        return torch.mm(matrix, dense, out=out)

    def sampled_product(self, a_t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The K entries ``(a_t @ b)[row_k, col_k]`` of an (m x T) @ (T x n) product, without forming it.

        Fastest with ``a_t`` row-major and ``b`` column-major (the transpose of a contiguous n x T).
        """
        crow, col, order = self.sparse_pattern(a_t.device)
        pattern = _csr(crow, col, a_t.new_zeros(col.numel()), (self.m, self.n))
        sampled = torch.sparse.sampled_addmm(pattern, a_t, b, beta=0.0).values()
        return sampled if order is None else torch.empty_like(sampled).index_put_((order,), sampled)


# -- several spaces of one shape at once: one batched transform instead of one per layer ----------------


def group_key(space: CoefficientSpace, method: str) -> tuple:
    """Spaces with equal keys share one batched map: the same shape, basis (and seed of a random basis),
    block and grid (or scattered positions, which may differ) and transform method."""
    method = method if space.fft_ok else "matmul"
    return (space.m, space.n, space.basis, 0 if space.basis == "dct" else space.seed, space.block, space.grid, method)


def group_to_matrix(spaces: list[CoefficientSpace], values: list[torch.Tensor], method: str) -> torch.Tensor:
    """``to_matrix`` of several spaces with one :func:`group_key`, batched: an L x m x n tensor."""
    first = spaces[0]
    m, n, count = first.m, first.n, len(spaces)
    method = method if first.fft_ok else "matmul"
    if first.block is not None:
        p, q = first.block
        s = torch.stack([v.view(p, q) for v in values])
        if method == "fft":
            return first.synthesise(first.synthesise(s, "in", "fft").transpose(-1, -2), "out", "fft").transpose(-1, -2)
        b_m, b_n = first.block_rows("out", p, s.dtype, s.device), first.block_rows("in", q, s.dtype, s.device)
        return (b_m.T @ s) @ b_n
    full = values[0].new_zeros(count * m * n).index_put_((_group_positions(spaces),), torch.cat(values)).view(count, m, n)
    if method == "fft":
        return first.synthesise(first.synthesise(full, "in", "fft").transpose(-1, -2), "out", "fft").transpose(-1, -2)
    return first.basis_rows("out", full.dtype, full.device).T @ full @ first.basis_rows("in", full.dtype, full.device)


def group_from_matrix(spaces: list[CoefficientSpace], matrices: torch.Tensor, method: str) -> list[torch.Tensor]:
    """``from_matrix`` of an L x m x n tensor for several spaces with one :func:`group_key`: L coefficient vectors."""
    first = spaces[0]
    method = method if first.fft_ok else "matmul"
    if first.block is not None:
        p, q = first.block
        if method == "fft":
            s = first.analyse(first.analyse(matrices, "in", q, "fft").transpose(-1, -2), "out", p, "fft").transpose(-1, -2)
        else:
            b_m = first.block_rows("out", p, matrices.dtype, matrices.device)
            b_n = first.block_rows("in", q, matrices.dtype, matrices.device)
            s = b_m @ matrices @ b_n.T
        return list(s.reshape(len(spaces), p * q).unbind(0))
    if method == "fft":
        m, n = first.m, first.n
        full = first.analyse(first.analyse(matrices, "in", n, "fft").transpose(-1, -2), "out", m, "fft").transpose(-1, -2)
    else:
        b_m = first.basis_rows("out", matrices.dtype, matrices.device)
        b_n = first.basis_rows("in", matrices.dtype, matrices.device)
        full = b_m @ matrices @ b_n.T
    picked = full.reshape(-1).index_select(0, _group_positions(spaces))
    return list(picked.split([space.k for space in spaces]))


def _group_positions(spaces: list[CoefficientSpace]) -> torch.Tensor:
    """The scattered positions of every space, as flat positions in an L x m x n tensor."""
    size = spaces[0].m * spaces[0].n
    return torch.cat([space.indices.to(torch.int64) + layer * size for layer, space in enumerate(spaces)])


def _csr(crow, col, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the two kernels used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def make_space(
    m: int,
    n: int,
    k: int,
    *,
    layout: str,
    basis: str = "dct",
    seed: int = 0,
    weight: Optional[torch.Tensor] = None,
    indices: Optional[torch.Tensor] = None,
    gradient: Optional[torch.Tensor] = None,
    rings: int = 4,
    energy_share: float = 0.5,
    grid_rank: Optional[int] = None,
    name: str = "",
) -> CoefficientSpace:
    """The coefficient space of an m x n layer with budget ``k`` under ``layout``: the one place an index
    set is computed.

    ``weight`` (out x in, in the transform dtype) is read by the layouts that rank the existing weight's
    coefficients (``energy``, ``banded``). ``indices`` are index sets read from a saved adapter (positions,
    as ``index_codec.decode`` gives them): they are validated and used as they are (a data-dependent set
    cannot be recomputed from the config). ``gradient`` (out x in, the loss gradient of the weight) is read by
    the ``gradient`` layout, which keeps its K largest coefficients in the layer's basis. Index sets are held
    as int32 positions where the layer's m * n fits (``index_codec.memory_dtype``). ``lowfreq`` and ``grid`` keep
    the largest block that fits ``k`` (possibly fewer than ``k`` coefficients).
    """
    if layout == "lowfreq":
        return CoefficientSpace(m, n, basis, seed, block=lowfreq_block(m, n, k))
    if layout == "grid":
        grid = grid_frequencies(m, n, k, seed)
        return CoefficientSpace(m, n, basis, seed, block=tuple(map(len, grid)), grid=grid)
    # a sparse grid's positions sit on rows and columns recomputed from the seed, which its factored path reads
    grid = sparse_grid_frequencies(m, n, k, seed, grid_rank) if layout == "sparse_grid" else None
    if indices is not None:
        validate_indices(indices, m, n, name=name)
        return CoefficientSpace(m, n, basis, seed, indices=in_memory(indices, m, n), grid=grid)
    coefficients = None
    if layout in CALIBRATED_LAYOUTS:
        if gradient is None:
            raise ValueError(
                f"layout={layout!r} keeps the largest coefficients of the weight's loss gradient of {name or 'the layer'!r}, "
                "and none was given: call hf_spectral.init_gradient_layout(model, batches) after get_peft_model."
            )
        if tuple(gradient.shape) != (m, n):
            raise ValueError(f"a gradient of shape {tuple(gradient.shape)} was given for an {m} x {n} layer {name!r}.")
        everything = CoefficientSpace(m, n, basis, seed, block=(m, n))
        coefficients = everything.all_coefficients(gradient)
        weight = gradient  # where the index set lives (its device)
    elif layout in DATA_DEPENDENT_LAYOUTS:
        if weight is None:
            raise ValueError(
                f"layout={layout!r} reads the existing weight of {name or 'the layer'!r}, but that layer has none (it "
                "is on the meta device, or a replace-mode adapter released it). Load the model with its weights, or "
                "use layout='random'/'lowfreq'/'triangle' with init_weights='random'."
            )
        # the full analysis in the layer's own basis (a throwaway space over every position)
        everything = CoefficientSpace(m, n, basis, seed, block=(m, n))
        coefficients = everything.all_coefficients(weight)
    chosen = select_indices(
        layout, m, n, k, seed=seed, coefficients=coefficients, rings=rings, energy_share=energy_share, grid_rank=grid_rank
    )
    device = weight.device if weight is not None else torch.device("cpu")
    return CoefficientSpace(m, n, basis, seed, indices=in_memory(chosen, m, n).to(device), grid=grid)
