"""Compute paths of a spectral layer: several exact ways to compute the same function.

A spectral layer computes ``y = x W^T + b`` with ``W = W0 + s * B_m^T S B_n`` (delta mode) or
``W = B_m^T S B_n`` (replace mode), where S holds K coefficients of a ``CoefficientSpace``: a p x q
block in the top-left corner (the ``lowfreq`` layout) or K scattered positions. The paths compute the
same outputs and gradients (``tests/test_compute_paths.py``) at different costs:

==========  =========================================================================  =====================
path        how                                                                        kept for backward
==========  =========================================================================  =====================
dense       build W (adapter merged into the base weight), one matmul; S's gradient     x, W
            is the adjoint transform of the dense weight gradient ``g^T x``
sampled     forward as ``dense``; S's gradient is read off the transformed             x, W
            activations, ``DCT_m(g)^T DCT_n(x)`` at the K positions only (one p x q
            matmul for a block, a sampled dense-dense product for scattered
            positions): the m x n product ``g^T x`` is never formed
separate    delta mode: ``W0 x`` and ``s * dW x`` as two matmuls (PEFT FourierFT's     x, dW
            way); a reference, never chosen by ``auto``
factored    block layouts: ``((x B_n[:q]^T) S^T) B_m[:p]``, three matmuls; never       x, T x q, T x p
            builds an m x n matrix
spectral    the activation domain: ``IDCT_m(DCT_n(x) S^T)`` with FFT transforms;      T x q, or T x n
            a block needs one p x q matmul, scattered positions a sparse product
            (one fused function, ``ScatteredSpectral``: four transforms in all);
            never builds an m x n matrix (DCT basis only)
==========  =========================================================================  =====================

``auto`` takes the cost model's cheapest (``cost_model.choose_path``), or the path measured fastest on this
machine by the explicit step ``hf_spectral.tune_compute_paths`` (``autotune.py``). Every transform runs in
float32 (float64 for float64 models) and the result is cast back: torch's FFTs refuse bf16, and sums over
thousands of coefficients lose too much in half precision. The matmuls that touch activations run in the
activations' dtype, as the layer they replace would.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .functions import Analyse, MergedLinear, ScatteredSpectral, Synthesise, matrix, orient

__all__ = ["PATHS", "available_paths", "run_path"]

PATHS = ("auto", "dense", "sampled", "separate", "factored", "spectral")


def available_paths(space, mode: str) -> tuple[str, ...]:
    paths = ["dense", "sampled"]
    if mode == "delta":
        paths.append("separate")
    if space.block is not None:
        paths.append("factored")
    if space.fft_ok:
        paths.append("spectral")
    return tuple(paths)


def run_path(
    path: str,
    x: torch.Tensor,
    values: torch.Tensor,
    space,
    *,
    base_weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scaling: float,
    fan_in_fan_out: bool = False,
    merged_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x W^T + b`` by one path. ``base_weight`` is W0 (delta mode, in its stored layout) or None.

    ``x`` is already in the compute dtype; autocast must be off (the layer sees to both). ``merged_weight``:
    the ``dense`` and ``sampled`` paths' W (out x in, in x's dtype), when a batched rebuild built it already.
    """
    mode = "replace" if base_weight is None else "delta"
    if path not in available_paths(space, mode):
        raise ValueError(
            f"compute path {path!r} is not available for this layer ({mode} mode, "
            f"{'a ' + 'x'.join(map(str, space.block)) + ' block' if space.block else 'scattered positions'}, "
            f"basis {space.basis!r}); available: {available_paths(space, mode)} or 'auto'."
        )
    if bias is not None:
        bias = bias.to(x.dtype)
    if path in ("dense", "sampled"):
        shape = x.shape
        x_2d = x.reshape(-1, shape[-1])
        weight_method = space.weight_method(x.device)
        y = MergedLinear.apply(
            x_2d, values, base_weight, bias, space, scaling, fan_in_fan_out, path, weight_method, merged_weight
        )
        return y.view(*shape[:-1], space.m)
    if path == "separate":
        delta = matrix(space, values) * scaling
        out = F.linear(x, orient(base_weight, fan_in_fan_out).to(x.dtype), bias)
        return out + F.linear(x, delta.to(x.dtype))
    if path == "spectral" and space.block is None:  # scattered positions: one fused function
        shape = x.shape
        y = ScatteredSpectral.apply(
            x.reshape(-1, shape[-1]), values, base_weight, bias, space, scaling, fan_in_fan_out
        )
        return y.view(*shape[:-1], space.m)
    update = _activation_update(path, x, values, space)
    if scaling != 1.0:
        update = update * scaling
    if base_weight is None:
        return update if bias is None else update + bias
    return F.linear(x, orient(base_weight, fan_in_fan_out).to(x.dtype), bias) + update


def _activation_update(path: str, x: torch.Tensor, values: torch.Tensor, space) -> torch.Tensor:
    """``x W_S^T`` for a block without building W_S: factored (matmul transforms) or spectral (FFT transforms)."""
    shape = x.shape
    x_2d = x.reshape(-1, shape[-1])
    p, q = space.block
    if path == "factored":  # in the activations' dtype, as a dense layer would be
        s = values.view(p, q).to(x.dtype)
        u = Analyse.apply(x_2d, space, "in", q, "matmul")
        out = Synthesise.apply(u @ s.T, space, "out", "matmul")
    else:  # FFTs in the transform dtype
        s = values.view(p, q)
        u = Analyse.apply(x_2d.to(values.dtype), space, "in", q, "fft")
        out = Synthesise.apply(u @ s.T, space, "out", "fft").to(x.dtype)
    return out.view(*shape[:-1], space.m)
