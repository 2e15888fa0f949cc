"""Compute paths of a spectral layer: several exact ways to compute the same function.

A spectral layer computes ``y = x W^T + b`` with ``W = W0 + s * B_m^T S B_n`` (delta mode) or
``W = B_m^T S B_n`` (replace mode), where S holds K coefficients of a ``CoefficientSpace``: a p x q
block (the ``lowfreq`` and ``grid`` layouts) or K scattered positions. The paths compute the
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
factored    block and sparse-grid layouts: LoRA's two products through the p'         x, T x r
            frequency rows x q' columns the coefficients sit on: ``(x (S' B_n[cols])^T) B_m[rows]`` (or the
            other association), r = min(p', q'); never builds an m x n matrix, and
            costs what LoRA at rank r costs
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
    if space.factorable:
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
    if path == "factored":
        shape = x.shape
        add = bias  # what joins the update in its last product: W0 x + b, or b alone
        if base_weight is not None:
            add = F.linear(x, orient(base_weight, fan_in_fan_out).to(x.dtype), bias).view(-1, space.m)
        y = _factored(x.reshape(-1, shape[-1]), values, space, scaling, add)
        return y.view(*shape[:-1], space.m)
    update = _spectral_block_update(x, values, space)
    if scaling != 1.0:
        update = update * scaling
    if base_weight is None:
        return update if bias is None else update + bias
    return F.linear(x, orient(base_weight, fan_in_fan_out).to(x.dtype), bias) + update


def _factored(x_2d: torch.Tensor, values: torch.Tensor, space, scaling: float, add: Optional[torch.Tensor]):
    """``add + s * x W_S^T`` as LoRA computes its update: two products through the rank-r side of
    ``W_S = B_m[rows]^T S' B_n[cols]``, S' the p' x q' coefficients over their support's rows and columns. The
    token-free factor (S' B_n[cols], r x n, or B_m[rows]^T S', m x r) is built first, in the activations' dtype
    as a dense layer would run, with the scaling folded in; ``add`` (W0 x + b, or b) joins in the last product."""
    s = space.support_block(values).to(x_2d.dtype)
    if scaling != 1.0:
        s = s * scaling
    rows_out = space.support_rows("out", x_2d.dtype, x_2d.device)
    rows_in = space.support_rows("in", x_2d.dtype, x_2d.device)
    if s.shape[0] <= s.shape[1]:  # rank side p': x (S' B_n)^T, then B_m rows
        inner, outer = x_2d @ (s @ rows_in).T, rows_out
    else:  # rank side q': x B_n^T, then (B_m^T S')^T
        inner, outer = x_2d @ rows_in.T, s.T @ rows_out
    return inner @ outer if add is None else torch.addmm(add, inner, outer)


def _spectral_block_update(x: torch.Tensor, values: torch.Tensor, space) -> torch.Tensor:
    """``x W_S^T`` for a top-left block without building W_S, by FFT transforms (the ``spectral`` path)."""
    shape = x.shape
    x_2d = x.reshape(-1, shape[-1])
    p, q = space.block
    s = values.view(p, q)  # FFTs in the transform dtype
    u = Analyse.apply(x_2d.to(values.dtype), space, "in", q, "fft")
    out = Synthesise.apply(u @ s.T, space, "out", "fft").to(x.dtype)
    return out.view(*shape[:-1], space.m)
