"""How an index set is held: in memory in the narrowest integer dtype, on disk in the fewest bytes.

An index set is K sorted, distinct flat positions ``row * n + col`` of an m x n layer (``layouts``).

In memory (:func:`in_memory`): int32 when ``m * n < 2**31`` (every layer of today's models), else int64;
4 bytes per kept coefficient instead of 8.

On disk (:func:`encode`, the ``<layer>.spectral_indices`` tensor of an adapter), the smaller of:

==========  ===============================  ====================================================
encoding    tensor                           bytes
==========  ===============================  ====================================================
positions   1-D int32 (int64 if m*n >= 2^31)  4 * K (8 * K)
bitmap      1-D uint8                        ceil(m * n / 8): bit ``p`` of the layer (``p`` = row
                                             * n + col) is bit ``p % 8``, least significant first,
                                             of byte ``p // 8``; a set bit is a kept coefficient
==========  ===============================  ====================================================

So positions win while K < m*n / 32 (about 3 % of a layer's coefficients, a small-K delta adapter), the
bitmap above that (a replace-mode model at any useful fraction); at equal size, positions. The dtype
alone tells them apart: uint8 is a bitmap of the layer's m x n positions, int32 or int64 are positions
(what versions before 0.3 wrote, as int64, and still load). A sorted delta code is not used: it would
beat both only for K between about m*n/128 and m*n/32, and would need a third tag.

:func:`decode` is the one reader: every path that reads a saved index set (``PeftModel.from_pretrained``
and ``load_adapter`` through ``SpectralModel._remap_adapter_state_dict_for_load``, the checks of
``loading.check_adapter``, and ``ecosystem.adapter_files``) calls it, and gets positions in memory dtype.
This module imports nothing of the package.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "BITMAP_DTYPE", "POSITION_DTYPES", "bitmap_bytes", "decode", "encode", "encoded_bytes", "encoding_of",
    "in_memory", "memory_dtype", "position_bytes",
]

BITMAP_DTYPE = torch.uint8
POSITION_DTYPES = (torch.int32, torch.int64)
_INT32_LIMIT = 2**31


def memory_dtype(m: int, n: int) -> torch.dtype:
    """int32 when every flat position of an m x n layer fits it, else int64."""
    return torch.int32 if m * n < _INT32_LIMIT else torch.int64


def in_memory(positions: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Positions in the memory dtype of an m x n layer, on their device (no copy if already so)."""
    return positions.to(memory_dtype(m, n))


def position_bytes(k: int, m: int, n: int) -> int:
    return k * memory_dtype(m, n).itemsize


def bitmap_bytes(m: int, n: int) -> int:
    return math.ceil(m * n / 8)


def encoding_of(k: int, m: int, n: int) -> str:
    """``"positions"`` or ``"bitmap"``: the smaller on disk for K of an m x n layer's positions."""
    return "bitmap" if bitmap_bytes(m, n) < position_bytes(k, m, n) else "positions"


def encoded_bytes(k: int, m: int, n: int) -> int:
    """Bytes on disk of an index set of K positions of an m x n layer (the tensor's data, no header)."""
    return min(bitmap_bytes(m, n), position_bytes(k, m, n))


def encode(positions: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The form an index set is saved in: a uint8 bitmap or int32/int64 positions, whichever is smaller (CPU).

    Positions that are not strictly increasing (never made by a layout) stay positions: a bitmap would
    reorder them, and the coefficients are stored in the order of their positions.
    """
    flat = positions.detach().reshape(-1).cpu()
    k = flat.numel()
    increasing = k < 2 or bool((flat[1:] > flat[:-1]).all())
    if encoding_of(k, m, n) == "positions" or not increasing:
        return in_memory(flat, m, n).contiguous()
    mask = np.zeros(m * n, dtype=bool)
    mask[flat.to(torch.int64).numpy()] = True
    return torch.from_numpy(np.packbits(mask, bitorder="little"))


def decode(stored: torch.Tensor, m: int, n: int, k: int | None = None, name: str = "") -> torch.Tensor:
    """Positions (memory dtype, on ``stored``'s device) of a saved index set of an m x n layer.

    ``k``: the number of coefficients the layer keeps; a bitmap with another number of set bits raises.
    Positions are returned as they are (``layouts.validate_indices`` checks their range and uniqueness).
    """
    where = f"layer {name!r}" if name else f"a {m} x {n} layer"
    if stored.dtype in POSITION_DTYPES:
        if stored.numel() and (int(stored.min()) < 0 or int(stored.max()) >= m * n):
            return stored  # out of range: left as saved (not wrapped into int32), so the range check names them
        return in_memory(stored, m, n)
    if stored.dtype != BITMAP_DTYPE or stored.dim() != 1:
        raise ValueError(
            f"The saved index set of {where} is a {stored.dtype} tensor of shape {list(stored.shape)}; allowed: a 1-D "
            "uint8 bitmap or 1-D int32/int64 positions. The adapter file is damaged: save the adapter again."
        )
    expected = bitmap_bytes(m, n)
    if stored.numel() != expected:
        raise ValueError(
            f"The saved index-set bitmap of {where} has {stored.numel()} bytes; its {m} x {n} weight needs "
            f"{expected} (ceil({m} * {n} / 8)). The adapter file is damaged or was made for a model of other "
            "shapes: save the adapter again, or load it into the model it was made for."
        )
    bits = np.unpackbits(stored.detach().cpu().numpy(), bitorder="little")
    past = int(bits[m * n:].sum())
    if past:
        raise ValueError(
            f"The saved index-set bitmap of {where} has {past} bits set past its {m * n} positions (allowed: 0). "
            "The adapter file is damaged: save the adapter again."
        )
    positions = np.flatnonzero(bits[: m * n])
    if k is not None and positions.size != k:
        raise ValueError(
            f"The saved index-set bitmap of {where} has {positions.size} bits set; the layer keeps K = {k} "
            "coefficients. The adapter file is damaged or does not belong to its adapter_config.json: save the "
            "adapter again, or restore the config that was saved with it."
        )
    return torch.from_numpy(positions.astype(np.int64)).to(memory_dtype(m, n)).to(stored.device)
