"""The autograd pieces of the compute paths; each keeps only what its backward needs.

Every function takes a ``CoefficientSpace`` (the adapter's basis, index set and transforms) and runs with
autograd's own bookkeeping kept small: the backward passes are written out, so that no path stores an
m x n matrix it does not need. ``dispatch`` puts them together into paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def transform_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype transforms run in: float64 for float64 models, float32 for everything else. torch's FFTs
    refuse half precision on CPU, and bf16 sums over thousands of coefficients lose too much."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def orient(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A base weight as out x in (Conv1D stores in x out)."""
    return weight.T if fan_in_fan_out else weight


class ToMatrix(torch.autograd.Function):
    """values -> the m x n matrix; the backward is the adjoint transform (nothing is saved)."""

    @staticmethod
    def forward(ctx, values, space, method):
        ctx.space, ctx.method = space, method
        return space.to_matrix(values, method)

    @staticmethod
    def backward(ctx, grad):
        return ctx.space.from_matrix(grad.contiguous(), ctx.method), None, None


def matrix(space, values: torch.Tensor) -> torch.Tensor:
    """The m x n matrix of the coefficients ``values``, differentiable, in their dtype."""
    return ToMatrix.apply(values, space, space.weight_method(values.device))


class Analyse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, space, side, keep, method):
        ctx.space, ctx.side, ctx.method = space, side, method
        return space.analyse(x, side, keep, method)

    @staticmethod
    def backward(ctx, grad):
        return ctx.space.synthesise(grad.contiguous(), ctx.side, ctx.method), None, None, None, None


class Synthesise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, space, side, method):
        ctx.space, ctx.side, ctx.method, ctx.keep = space, side, method, c.shape[-1]
        return space.synthesise(c, side, method)

    @staticmethod
    def backward(ctx, grad):
        return ctx.space.analyse(grad.contiguous(), ctx.side, ctx.keep, ctx.method), None, None, None


class SparseProduct(torch.autograd.Function):
    """``xd @ S^T`` for scattered coefficients S (m x n, K entries): sparse products both ways."""

    @staticmethod
    def forward(ctx, xd, values, space):
        ctx.space = space
        xd_t = xd.T.contiguous()  # the layout both sparse kernels read fastest
        ctx.save_for_backward(xd_t, values)
        return (space.sparse_matrix(values) @ xd_t).T  # (m x n)(n x T) -> T x m

    @staticmethod
    def backward(ctx, grad):
        xd_t, values = ctx.saved_tensors
        space = ctx.space
        grad_t = grad.T.contiguous()  # m x T
        grad_xd = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_xd = (space.sparse_matrix(values, transposed=True) @ grad_t).T
        if ctx.needs_input_grad[1]:
            grad_values = space.sampled_product(grad_t, xd_t.T)
        return grad_xd, grad_values, None


class ScatteredSpectral(torch.autograd.Function):
    """The activation-domain layer for scattered coefficients in one function, forward and backward.

    Forward: ``y = x W0^T + b + IDCT_m(DCT_n(x) (sS)^T)`` (no W0 in replace mode), S the m x n matrix of
    the K coefficients at their positions, s the scaling. Backward, with ``gd = DCT_m(g)``:
    ``grad_x = g W0 + IDCT_n(gd sS)`` and ``grad_S = s (gd^T DCT_n(x))`` at the K positions.
    Four transforms in all, the fewest an exact layer needs: ``DCT_n(x)`` is kept from the forward,
    and ``DCT_m(g)`` serves both gradients. The transformed activations are kept transposed (n x T),
    the layout both sparse kernels read fastest, written by the transform itself; s is folded into
    the K values and the frozen product is accumulated onto the update in place.
    """

    @staticmethod
    def forward(ctx, x, values, base_weight, bias, space, scaling, fan_in_fan_out):
        transform = values.dtype
        scaled = values * scaling if scaling != 1.0 else values
        xd_t = space.analyse(x.to(transform), "in", space.n, "fft", transpose=True)  # n x T
        update = space.synthesise(space.sparse_product(scaled, xd_t).T, "out", "fft")  # T x m, contiguous
        if base_weight is None:
            y = update.to(x.dtype)
        else:
            weight_t = orient(base_weight, fan_in_fan_out).to(x.dtype).T
            if x.dtype == transform:
                y = update.addmm_(x, weight_t)  # one product accumulated onto the update
            else:
                y = torch.mm(x, weight_t).add_(update)
        if bias is not None:
            y.add_(bias)
        ctx.space, ctx.scaling, ctx.fan_in_fan_out = space, scaling, fan_in_fan_out
        ctx.save_for_backward(xd_t, scaled, base_weight, x if ctx.needs_input_grad[2] else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        xd_t, scaled, base_weight, x = ctx.saved_tensors
        space = ctx.space
        grad = grad.contiguous()
        grad_x = grad_values = grad_base = grad_bias = None
        gd_t = space.analyse(grad.to(scaled.dtype), "out", space.m, "fft", transpose=True, scratch=True)  # m x T
        if ctx.needs_input_grad[1]:
            grad_values = space.sampled_product(gd_t, xd_t.T)
            if ctx.scaling != 1.0:
                grad_values.mul_(ctx.scaling)
        if ctx.needs_input_grad[0]:
            update = space.synthesise(space.sparse_product(scaled, gd_t, transposed=True).T, "in", "fft")  # T x n
            if base_weight is None:
                grad_x = update.to(grad.dtype)
            else:
                weight = orient(base_weight, ctx.fan_in_fan_out).to(grad.dtype)
                if grad.dtype == scaled.dtype:
                    grad_x = update.addmm_(grad, weight)
                else:
                    grad_x = torch.mm(grad, weight).add_(update)
        if ctx.needs_input_grad[2]:  # a trainable base weight (rare): its plain gradient
            grad_base = orient(grad.T @ x, ctx.fan_in_fan_out)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.sum(0)
        return grad_x, grad_values, grad_base, grad_bias, None, None, None


def composed_spectral_update(x_2d: torch.Tensor, values: torch.Tensor, space) -> torch.Tensor:
    """``IDCT_m(DCT_n(x) S^T)`` for scattered S as three autograd pieces (in the transform dtype), the way
    the ``spectral`` path computed before :class:`ScatteredSpectral`: a second implementation to test the
    fused one against and to time it by."""
    xd = Analyse.apply(x_2d.to(values.dtype), space, "in", space.n, "fft")
    z = SparseProduct.apply(xd, values, space)
    return Synthesise.apply(z, space, "out", "fft")


class MergedLinear(torch.autograd.Function):
    """One matmul with the rebuilt weight (merged into the base weight in delta mode).

    Forward: ``W = W0 + s * rebuild(values)`` (or ``rebuild(values)``, or W as a batched rebuild built it),
    ``y = x W^T + b``. Keeps x and W.
    Backward: ``g W`` for x; for the coefficients either the adjoint of ``g^T x`` (``dense``) or the
    K sampled entries of ``DCT_m(g)^T DCT_n(x)`` (``sampled``).
    """

    @staticmethod
    def forward(ctx, x, values, base_weight, bias, space, scaling, fan_in_fan_out, grad_method, weight_method,
                merged_weight=None):
        if merged_weight is not None:  # built ahead by a batched rebuild (the same numbers)
            weight = merged_weight
        else:
            with torch.no_grad():
                weight = space.to_matrix(values.detach(), weight_method)
                if scaling != 1.0:
                    weight.mul_(scaling)
                if base_weight is not None:
                    weight.add_(orient(base_weight, fan_in_fan_out))
                weight = weight.to(x.dtype)
        ctx.space, ctx.scaling, ctx.fan_in_fan_out = space, scaling, fan_in_fan_out
        ctx.grad_method, ctx.weight_method = grad_method, weight_method
        ctx.transform_dtype = values.dtype
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        space = ctx.space
        grad_2d = grad.reshape(-1, grad.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_values = grad_base = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ weight).view(x.shape)
        need_weight_grad = ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            grad_values = coefficient_grad(space, grad_2d, x_2d, ctx.grad_method, ctx.weight_method, ctx.transform_dtype)
            if ctx.scaling != 1.0:
                grad_values = grad_values * ctx.scaling
        if need_weight_grad:  # a trainable base weight (rare): its plain gradient
            grad_base = orient(grad_2d.T @ x_2d, ctx.fan_in_fan_out)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_values, grad_base, grad_bias, None, None, None, None, None, None


def sampled_chunk(space, tokens: int) -> int:
    """Tokens per chunk of the sampled gradient: its transform buffers (a few chunk x (m + n) floats)
    then stay near one m x n buffer however many tokens there are; at least 256 rows per FFT call."""
    return min(tokens, max(256, space.m * space.n // (space.m + space.n)))


def coefficient_grad(space, grad_2d, x_2d, grad_method, weight_method, dtype):
    if grad_method == "dense":
        return space.from_matrix((grad_2d.T @ x_2d).to(dtype), weight_method)
    # sum over token chunks of DCT_m(g)^T DCT_n(x) at the K positions
    tokens = grad_2d.shape[0]
    if tokens == 0:  # an empty batch
        return grad_2d.new_zeros(space.k, dtype=dtype)
    chunk = sampled_chunk(space, tokens)
    method_out = space.activation_method("out", space.block[0] if space.block else space.m, grad_2d.device, chunk)
    method_in = space.activation_method("in", space.block[1] if space.block else space.n, x_2d.device, chunk)
    total = None
    for start in range(0, tokens, chunk):
        g, x = grad_2d[start : start + chunk].to(dtype), x_2d[start : start + chunk].to(dtype)
        # both transforms are read once, right away: scratch buffers (see CoefficientSpace.analyse)
        if space.block is not None:
            p, q = space.block
            gd, xd = space.analyse(g, "out", p, method_out, scratch=True), space.analyse(x, "in", q, method_in, scratch=True)
            part = (gd.T @ xd).reshape(-1)
        else:
            gd_t = space.analyse(g, "out", space.m, method_out, transpose=True, scratch=True)
            xd_t = space.analyse(x, "in", space.n, method_in, transpose=True, scratch=True)
            part = space.sampled_product(gd_t, xd_t.T)
        total = part if total is None else total.add_(part)
        del g, x, part
    return total

