"""Seeded randomness that no library upgrade can change.

Random index sets and random bases are recomputed from a seed when an adapter is loaded, so
the numbers must be the same on every machine and every torch/numpy release. torch's and
numpy's generators make no such promise, so they are built here from the splitmix64 hash:
pure 64-bit integer arithmetic, pinned by test vectors in ``tests/test_stable_random.py``.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # The splitmix64 finaliser: a bijection on 64-bit integers with good avalanche.
    z = z ^ (z >> np.uint64(30))
    z = z * _MUL1
    z = z ^ (z >> np.uint64(27))
    z = z * _MUL2
    return z ^ (z >> np.uint64(31))


def hash_keys(seed: int, count: int, stream: int = 0) -> np.ndarray:
    """``count`` pseudo-random 64-bit keys for (seed, stream), distinct within one call."""
    with np.errstate(over="ignore"):
        base = np.array([seed & 0xFFFFFFFFFFFFFFFF, stream & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
        offset = _splitmix64(_splitmix64(base[:1] * _GOLDEN + base[1:]) + _GOLDEN)
        counter = np.arange(count, dtype=np.uint64) * _GOLDEN + offset
        return _splitmix64(counter)


def uniform(seed: int, count: int, stream: int = 0) -> np.ndarray:
    """``count`` float64 numbers uniform on [0, 1)."""
    return (hash_keys(seed, count, stream) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(seed: int, count: int, stream: int = 0) -> np.ndarray:
    """``count`` standard normal float64 numbers (Box-Muller on two uniform streams)."""
    u1 = uniform(seed, count, 2 * stream + 1)
    u2 = uniform(seed, count, 2 * stream + 2)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def choose(seed: int, population: int, k: int, stream: int = 0) -> np.ndarray:
    """``k`` distinct integers from ``range(population)``, uniformly at random, sorted."""
    if not 0 <= k <= population:
        raise ValueError(f"cannot choose {k} of {population} items.")
    if k == population:
        return np.arange(population, dtype=np.int64)
    keys = hash_keys(seed, population, stream)
    # splitmix64 is a bijection, so the keys are distinct and the k smallest are well defined
    picked = np.argpartition(keys, k)[:k] if k > 0 else np.empty(0, dtype=np.int64)
    return np.sort(picked).astype(np.int64)
