"""Index sets: which K of a layer's m x n coefficients are kept ("layouts").

Every function returns a sorted int64 tensor of distinct flat indices ``row * n + col``,
row = output frequency, col = input frequency. Pure functions of shapes, seeds and (for
``energy`` and ``banded``) the coefficients of an existing weight.

===========  ==================================================================  ===========
layout       which coefficients                                                  needs data
===========  ==================================================================  ===========
lowfreq      the top-left p x q block, p/q close to m/n and p*q <= K; the        no
             update has rank <= min(p, q), and the forward can skip building W
grid         every coefficient of p frequency rows x q frequency columns drawn   no
             at random (seeded; p x q as lowfreq's): spread over the spectrum
             like ``random``, and a rank <= min(p, q) product the forward runs
             with fixed basis rows, as LoRA runs its factors
triangle     the K lowest frequencies by i/m + j/n (JPEG's zigzag order)         no
random       K positions uniformly at random (seeded); can host full rank        no
sparse_grid  K positions at random inside r frequency rows x r frequency         no
             columns drawn at random (seeded; r = ``grid_rank``, by default
             about 2 sqrt(K), so 4K cells): spread over the spectrum like
             ``random``, rank <= r, and a forward that runs as LoRA at rank r
             does (the ``factored`` compute path)
energy       the K largest |DCT(W0)| of the existing weight                      yes
banded       L rings by distance from DC, an equal share of K per ring; within   yes
             a ring a fraction by energy and the rest at random (sDCTFT)
gradient     the K largest |DCT(G)| of the loss gradient G of the frozen weight  calibration
             on calibration batches (``hf_spectral.init_gradient_layout``): the
             coefficients where a first step would move the most (as LoRA-GA)
===========  ==================================================================  ===========

``lowfreq`` and ``grid`` keep a block of p x q coefficients (:func:`lowfreq_block`, :func:`grid_frequencies`),
not scattered positions. Sets that need data are saved with the adapter; the others are recomputed from shape and seed. A
``gradient`` set is chosen by an explicit step after ``get_peft_model`` (``CALIBRATED_LAYOUTS``), so it
is not in ``LAYOUTS``, the layouts a layer computes when it is created.
Layers hold them as int32 where m * n fits, and save them in the smaller of two forms (``index_codec``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import stable_random

LAYOUTS = ("lowfreq", "grid", "sparse_grid", "triangle", "random", "energy", "banded")
DATA_DEPENDENT_LAYOUTS = ("energy", "banded")
# a p x q block of coefficients rather than scattered positions
BLOCK_LAYOUTS = ("lowfreq", "grid")
# chosen from calibration data after the adapter is created; until then the layer refuses to run
CALIBRATED_LAYOUTS = ("gradient",)
ALL_LAYOUTS = LAYOUTS + CALIBRATED_LAYOUTS
# index sets that cannot be recomputed from the config and the weight: saved with the adapter
SAVED_LAYOUTS = DATA_DEPENDENT_LAYOUTS + CALIBRATED_LAYOUTS


def check_budget(n_coefficients: int | None, coefficient_fraction: float | None, where: str = "") -> None:
    """Raise unless exactly one budget is given and it has a valid form (its range per layer aside)."""
    if n_coefficients is not None and coefficient_fraction is not None:
        raise ValueError(
            f"Give either n_coefficients ({n_coefficients}) or coefficient_fraction ({coefficient_fraction}), "
            "not both."
        )
    if coefficient_fraction is not None:
        if isinstance(coefficient_fraction, bool) or not 0.0 < coefficient_fraction <= 1.0:
            raise ValueError(
                f"coefficient_fraction={coefficient_fraction!r}{where} is outside (0, 1]: "
                "use e.g. 0.5 to keep half of each layer's coefficients."
            )
    elif n_coefficients is None:
        raise ValueError("A budget is needed: n_coefficients or coefficient_fraction.")
    elif isinstance(n_coefficients, bool) or not isinstance(n_coefficients, int) or n_coefficients <= 0:
        raise ValueError(f"n_coefficients={n_coefficients!r}{where} must be a positive integer, e.g. 1000.")


def resolve_budget(m: int, n: int, n_coefficients: int | None, coefficient_fraction: float | None, name: str = "") -> int:
    """K for an m x n layer from either an absolute count or a fraction of m * n."""
    where = f" for layer {name!r} ({m} x {n})" if name else f" for a {m} x {n} layer"
    check_budget(n_coefficients, coefficient_fraction, where)
    if coefficient_fraction is not None:
        return max(1, round(coefficient_fraction * m * n))
    if n_coefficients > m * n:
        raise ValueError(
            f"n_coefficients={n_coefficients}{where} is more than its {m * n} coefficients (allowed: 1 to "
            f"{m * n}): lower it, use coefficient_fraction, or give this layer its own budget with budget_pattern."
        )
    return n_coefficients


def lowfreq_block(m: int, n: int, k: int) -> tuple[int, int]:
    """The block p x q with p*q <= k, as large as possible, whose aspect ratio is close to m/n."""
    target = math.sqrt(k * m / n)
    candidates = []
    for p in range(1, min(m, k) + 1):
        q = min(n, k // p)
        candidates.append((p * q, abs(math.log(p / target)), p, q))
    # stay within a factor 1.5 of the ideal aspect ratio where some block does (thin layers may not)
    close = [c for c in candidates if c[1] <= math.log(1.5)]
    candidates = close or candidates
    # among blocks within 1% of the largest, the one closest to the layer's aspect ratio
    largest = max(c[0] for c in candidates)
    best = min((c for c in candidates if c[0] >= 0.99 * largest), key=lambda c: (c[1], -c[0]))
    return best[2], best[3]


def grid_frequencies(m: int, n: int, k: int, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``grid`` layout's p output and q input frequencies (sorted), p x q as :func:`lowfreq_block`."""
    p, q = lowfreq_block(m, n, k)
    rows = np.sort(stable_random.choose(seed, m, p, stream=_GRID_ROWS))
    cols = np.sort(stable_random.choose(seed, n, q, stream=_GRID_COLS))
    return tuple(int(r) for r in rows), tuple(int(c) for c in cols)


# the grids' own random streams, apart from those of random (0) and banded (1 + ring)
_GRID_ROWS, _GRID_COLS = 1001, 1002
_SPARSE_GRID_ROWS, _SPARSE_GRID_COLS, _SPARSE_GRID_CELLS = 1011, 1012, 1013


def sparse_grid_shape(m: int, n: int, k: int, rank: int | None = None) -> tuple[int, int]:
    """The ``sparse_grid`` layout's p frequency rows x q columns for budget ``k``.

    ``rank`` given: min(rank, m) x min(rank, n), which must hold the K cells. ``rank=None``: about 4K cells,
    r x r with r = ceil(2 sqrt(K)), the thin side of a thin layer taken whole and the other side widened to fit;
    so the rank bound grows as sqrt(K), as LoRA's parameters do with its rank.
    """
    if rank is not None:
        p, q = min(rank, m), min(rank, n)
        if k > p * q:
            raise ValueError(
                f"layout='sparse_grid' with grid_rank={rank} has {p} x {q} = {p * q} cells for an {m} x {n} layer, "
                f"fewer than its budget of {k} coefficients: raise grid_rank to at least {math.isqrt(k - 1) + 1}, "
                "leave it None (about 4K cells), or lower the budget."
            )
        return p, q
    r, cells = math.ceil(2 * math.sqrt(k)), min(4 * k, m * n)
    if m <= n:
        p = min(r, m)
        return p, min(n, max(r, -(-cells // p)))
    q = min(r, n)
    return min(m, max(r, -(-cells // q))), q


def sparse_grid_frequencies(m: int, n: int, k: int, seed: int, rank: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``sparse_grid`` layout's output and input frequencies (sorted), as many as :func:`sparse_grid_shape`."""
    p, q = sparse_grid_shape(m, n, k, rank)
    rows = np.sort(stable_random.choose(seed, m, p, stream=_SPARSE_GRID_ROWS))
    cols = np.sort(stable_random.choose(seed, n, q, stream=_SPARSE_GRID_COLS))
    return tuple(int(r) for r in rows), tuple(int(c) for c in cols)


def sparse_grid_indices(m: int, n: int, k: int, seed: int, rank: int | None = None) -> torch.Tensor:
    """K positions drawn at random among the cells of :func:`sparse_grid_frequencies`' rows x columns (the
    ``sparse_grid`` layout)."""
    rows, cols = (np.asarray(chosen, dtype=np.int64) for chosen in sparse_grid_frequencies(m, n, k, seed, rank))
    p, q = len(rows), len(cols)
    cells = stable_random.choose(seed, p * q, k, stream=_SPARSE_GRID_CELLS)
    return torch.from_numpy(np.sort(rows[cells // q] * n + cols[cells % q]).astype(np.int64))


def _frequency_grid(m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(m, dtype=np.float64)[:, None] / m
    cols = np.arange(n, dtype=np.float64)[None, :] / n
    return rows, cols


def triangle_indices(m: int, n: int, k: int) -> torch.Tensor:
    rows, cols = _frequency_grid(m, n)
    order = np.argsort((rows + cols).reshape(-1), kind="stable")  # ties by row, then column
    return torch.from_numpy(np.sort(order[:k]).astype(np.int64))


def random_indices(m: int, n: int, k: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(stable_random.choose(seed, m * n, k))


def energy_indices(coefficients: torch.Tensor, k: int) -> torch.Tensor:
    magnitude = coefficients.detach().abs().reshape(-1).float().cpu()
    return torch.sort(torch.topk(magnitude, k, sorted=False).indices).values.to(torch.int64)


def banded_indices(
    coefficients: torch.Tensor, k: int, seed: int, rings: int = 4, energy_share: float = 0.5
) -> torch.Tensor:
    m, n = coefficients.shape
    rows, cols = _frequency_grid(m, n)
    radius = np.sqrt(rows**2 + cols**2).reshape(-1) / math.sqrt(2.0)
    ring_of = np.minimum((radius * rings).astype(np.int64), rings - 1)
    members = [np.flatnonzero(ring_of == r) for r in range(rings)]
    # equal share per ring (so low frequencies are denser), spilling what a small ring cannot hold
    budgets = [0] * rings
    left = k
    for r in range(rings):
        want = -(-left // (rings - r))  # ceil
        budgets[r] = min(want, len(members[r]))
        left -= budgets[r]
    for r in reversed(range(rings)):  # anything still left goes to rings with room, high to low
        extra = min(left, len(members[r]) - budgets[r])
        budgets[r] += extra
        left -= extra
    magnitude = coefficients.detach().abs().reshape(-1).float().cpu().numpy()
    chosen = []
    for r, (ring, budget) in enumerate(zip(members, budgets, strict=True)):
        if budget == 0:
            continue
        by_energy = round(energy_share * budget)
        top = ring[np.argsort(-magnitude[ring], kind="stable")[:by_energy]]
        rest = np.setdiff1d(ring, top, assume_unique=True)
        picked = rest[stable_random.choose(seed, len(rest), budget - by_energy, stream=r + 1)]
        chosen.extend([top, picked])
    return torch.from_numpy(np.sort(np.concatenate(chosen)).astype(np.int64))


def select_indices(
    layout: str,
    m: int,
    n: int,
    k: int,
    *,
    seed: int = 0,
    coefficients: torch.Tensor | None = None,
    rings: int = 4,
    energy_share: float = 0.5,
    grid_rank: int | None = None,
) -> torch.Tensor:
    """The index set of ``layout`` for an m x n layer with budget ``k``.

    ``coefficients`` (the DCT of the existing weight) is required by ``energy`` and ``banded``; for
    ``gradient`` it is the DCT of the loss gradient of the weight, and the K largest are kept.
    ``lowfreq`` keeps a block, not scattered positions: :func:`lowfreq_block` gives its shape.
    """
    if layout not in ALL_LAYOUTS:
        raise ValueError(f"layout must be one of {ALL_LAYOUTS}, got {layout!r}.")
    if layout in BLOCK_LAYOUTS:
        raise ValueError(
            f"layout={layout!r} keeps a p x q block, not scattered positions: use lowfreq_block or grid_frequencies."
        )
    if not 1 <= k <= m * n:
        raise ValueError(f"budget k={k} is outside 1..{m * n} for an {m} x {n} layer.")
    if layout == "triangle":
        return triangle_indices(m, n, k)
    if layout == "random":
        return random_indices(m, n, k, seed)
    if layout == "sparse_grid":
        return sparse_grid_indices(m, n, k, seed, grid_rank)
    if coefficients is None:
        what = "the weight's gradient" if layout in CALIBRATED_LAYOUTS else "an existing weight"
        raise ValueError(f"layout={layout!r} ranks coefficients of {what}, and none was given.")
    if tuple(coefficients.shape) != (m, n):
        raise ValueError(f"coefficients of shape {tuple(coefficients.shape)} given for an {m} x {n} layer.")
    if layout in ("energy", "gradient"):  # the same rule on another matrix: the K largest magnitudes
        return energy_indices(coefficients, k)
    return banded_indices(coefficients, k, seed, rings=rings, energy_share=energy_share)


def validate_indices(indices: torch.Tensor, m: int, n: int, name: str = "") -> None:
    """Raise if ``indices`` are not distinct flat positions of an m x n matrix."""
    where = f" of layer {name!r}" if name else ""
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise ValueError(f"coefficient indices{where} must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}.")
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= m * n:
        raise ValueError(
            f"coefficient indices{where} run from {low} to {high}, outside 0..{m * n - 1} for its {m} x {n} "
            "weight: the adapter file is corrupt or was made for a different model."
        )
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError(
            f"coefficient indices{where} contain duplicates ({indices.numel() - torch.unique(indices).numel()} "
            "repeated): the adapter file is corrupt."
        )
