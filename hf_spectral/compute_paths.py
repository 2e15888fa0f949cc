"""Compute paths of a spectral layer: several ways to compute the same function, and the choice among them.

A spectral layer computes ``y = x W^T + b`` with ``W = W0 + s * B_m^T S B_n`` (delta mode) or
``W = B_m^T S B_n`` (replace mode), where S holds K coefficients: a p x q block in the top-left
corner (the ``lowfreq`` layout) or K scattered positions. The paths compute the same outputs and
gradients (``tests/test_compute_paths.py``) at different costs:

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
            a block needs one p x q matmul, scattered positions a sparse product;
            never builds an m x n matrix (DCT basis only)
==========  =========================================================================  =====================

``auto`` takes the cheapest by a cost model (:func:`estimate_costs`): matmul flops, FFT and
elementwise passes, and sparse products, weighted per device type with constants measured on the
machines in ``benchmarks/README.md``. The model only ranks paths; every path is exact.

Evaluation does not pay for any of this: a layer caches its rebuilt weight while nothing changes
(see ``SpectralLayer``), and ``merge_and_unload`` leaves plain dense layers.

Every transform runs in float32 (float64 for float64 models) and the result is cast back: torch's
FFTs refuse bf16, and sums over thousands of coefficients lose too much in half precision. The
matmuls that touch activations run in the activations' dtype, as the layer they replace would.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .bases import basis_matrix
from .dct import _dct_fft_lastdim, _idct_fft_lastdim

__all__ = [
    "PATHS",
    "SpectralPlan",
    "DeviceCosts",
    "DEVICE_COSTS",
    "estimate_costs",
    "choose_path",
    "available_paths",
    "run_path",
    "rebuild",
    "set_compute_path",
    "set_weight_cache",
    "forced_transform",
]

PATHS = ("auto", "dense", "sampled", "separate", "factored", "spectral")

_FORCED_TRANSFORM: Optional[str] = None


@contextlib.contextmanager
def forced_transform(method: Optional[str]):
    """Within the block, rebuilds and activation transforms of DCT layers use ``method`` ("fft" or
    "matmul") instead of the cheaper one: for tests that every implementation agrees."""
    global _FORCED_TRANSFORM
    if method not in (None, "fft", "matmul"):
        raise ValueError(f"method must be 'fft', 'matmul' or None, got {method!r}.")
    previous, _FORCED_TRANSFORM = _FORCED_TRANSFORM, method
    try:
        yield
    finally:
        _FORCED_TRANSFORM = previous


def transform_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 models transform in float64, everything else in float32
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# what the paths need to know about one adapter


class SpectralPlan:
    """Shapes, basis and index set of one adapter of one layer, with the transforms the paths use.

    ``block`` is (p, q) for the lowfreq layout (coefficients in row-major p x q order), else None and
    ``indices`` holds the K flat positions ``row * n + col`` in the order of the coefficients.
    """

    def __init__(self, m: int, n: int, basis: str, seed: int, block: Optional[tuple[int, int]], indices):
        self.m, self.n, self.basis, self.seed, self.block = m, n, basis, seed, block
        self.indices = indices
        self.k = block[0] * block[1] if block is not None else int(indices.numel())
        self._sparse = {}

    # -- bases and transforms of activations (along the last dimension) ----------------------------

    def _basis(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return basis_matrix(self.basis, size, self.seed, dtype, device)

    def size(self, side: str) -> int:
        return self.m if side == "out" else self.n

    def analyse(self, x: torch.Tensor, side: str, keep: int, method: str, transpose: bool = False) -> torch.Tensor:
        """The first ``keep`` coefficients of ``x``'s rows in the basis of ``side`` ("out": m, "in": n)."""
        size = self.size(side)
        if method == "fft":
            return _dct_fft_lastdim(x, keep, transpose=transpose)
        out = x @ self._basis(size, x.dtype, x.device)[:keep].T
        return out.T.contiguous() if transpose else out

    def synthesise(self, c: torch.Tensor, side: str, method: str) -> torch.Tensor:
        """Rows of length m or n from their first ``c.shape[-1]`` coefficients (the rest zero)."""
        size = self.size(side)
        if method == "fft":
            return _idct_fft_lastdim(c, size)
        return c @ self._basis(size, c.dtype, c.device)[: c.shape[-1]]

    # -- the weight, and the adjoint that maps a weight gradient to the coefficients ----------------

    def rebuild(self, values: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
        """The m x n matrix ``B_m^T S B_n`` (no autograd; see :func:`rebuild` for a differentiable one)."""
        m, n = self.m, self.n
        method = method or self.weight_method(values.device)
        if self.block is not None:
            p, q = self.block
            s = values.view(p, q)
            if method == "fft":  # rows first (p x n), then columns (n x m), transposed back
                return self.synthesise(self.synthesise(s, "in", "fft").T, "out", "fft").T
            b_m, b_n = self._basis(m, s.dtype, s.device)[:p], self._basis(n, s.dtype, s.device)[:q]
            if m * p * q + m * q * n <= p * q * n + p * n * m:
                return (b_m.T @ s) @ b_n
            return b_m.T @ (s @ b_n)
        full = values.new_zeros(m * n).index_put_((self.indices,), values).view(m, n)
        if method == "fft":
            return self.synthesise(self.synthesise(full, "in", "fft").T, "out", "fft").T
        return self._basis(m, full.dtype, full.device).T @ full @ self._basis(n, full.dtype, full.device)

    def adjoint(self, grad_weight: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
        """The gradient of the K coefficients from the gradient of the rebuilt m x n weight."""
        method = method or self.weight_method(grad_weight.device)
        if self.block is not None:
            p, q = self.block
            if method == "fft":
                return self.analyse(self.analyse(grad_weight, "in", q, "fft").T, "out", p, "fft").T.reshape(-1)
            b_m = self._basis(self.m, grad_weight.dtype, grad_weight.device)[:p]
            b_n = self._basis(self.n, grad_weight.dtype, grad_weight.device)[:q]
            return (b_m @ grad_weight @ b_n.T).reshape(-1)
        if method == "fft":
            coefficients = self.analyse(self.analyse(grad_weight, "in", self.n, "fft").T, "out", self.m, "fft").T
        else:
            b_m = self._basis(self.m, grad_weight.dtype, grad_weight.device)
            b_n = self._basis(self.n, grad_weight.dtype, grad_weight.device)
            coefficients = b_m @ grad_weight @ b_n.T
        return coefficients.reshape(-1)[self.indices]

    def weight_method(self, device: torch.device) -> str:
        """fft or matmul for the rebuild and its adjoint, whichever the cost model finds cheaper."""
        if self.basis != "dct":
            return "matmul"
        if _FORCED_TRANSFORM is not None:
            return _FORCED_TRANSFORM
        costs = DEVICE_COSTS.get(device.type, DEVICE_COSTS["cpu"])
        return min(("matmul", "fft"), key=lambda method: _weight_cost(self, costs, method))

    def activation_method(self, side: str, keep: int, device: torch.device, rows: int) -> str:
        """fft or matmul for a float32 transform of ``rows`` activations, whichever is cheaper."""
        if self.basis != "dct":
            return "matmul"
        if _FORCED_TRANSFORM is not None:
            return _FORCED_TRANSFORM
        costs = DEVICE_COSTS.get(device.type, DEVICE_COSTS["cpu"])
        return min(("matmul", "fft"), key=lambda method: _transform_cost(costs, rows, self.size(side), keep, method))

    # -- scattered positions as sparse matrices (built once per device) -----------------------------

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

    def sampled_product(self, a_t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The K entries ``(a_t @ b)[row_k, col_k]`` of an (m x T) @ (T x n) product, without forming it.

        Fastest with ``a_t`` row-major and ``b`` column-major (the transpose of a contiguous n x T).
        """
        crow, col, order = self.sparse_pattern(a_t.device)
        pattern = _csr(crow, col, a_t.new_zeros(col.numel()), (self.m, self.n))
        sampled = torch.sparse.sampled_addmm(pattern, a_t, b, beta=0.0).values()
        return sampled if order is None else torch.empty_like(sampled).index_put_((order,), sampled)


def _csr(crow, col, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the two kernels used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _orient(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


# --------------------------------------------------------------------------------------------------
# autograd pieces; each keeps only what its backward needs


class _Rebuild(torch.autograd.Function):
    """values -> the m x n matrix; the backward is the adjoint transform (nothing is saved)."""

    @staticmethod
    def forward(ctx, values, plan, method):
        ctx.plan, ctx.method = plan, method
        return plan.rebuild(values, method)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.adjoint(grad.contiguous(), ctx.method), None, None


def rebuild(plan: SpectralPlan, values: torch.Tensor, method: Optional[str] = None) -> torch.Tensor:
    """The m x n matrix of the coefficients ``values``, differentiable, in their dtype."""
    return _Rebuild.apply(values, plan, method or plan.weight_method(values.device))


class _Analyse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, side, keep, method):
        ctx.plan, ctx.side, ctx.method = plan, side, method
        return plan.analyse(x, side, keep, method)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.synthesise(grad.contiguous(), ctx.side, ctx.method), None, None, None, None


class _Synthesise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, plan, side, method):
        ctx.plan, ctx.side, ctx.method, ctx.keep = plan, side, method, c.shape[-1]
        return plan.synthesise(c, side, method)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.analyse(grad.contiguous(), ctx.side, ctx.keep, ctx.method), None, None, None


class _SparseProduct(torch.autograd.Function):
    """``xd @ S^T`` for scattered coefficients S (m x n, K entries): sparse products both ways."""

    @staticmethod
    def forward(ctx, xd, values, plan):
        ctx.plan = plan
        xd_t = xd.T.contiguous()  # the layout both sparse kernels read fastest
        ctx.save_for_backward(xd_t, values)
        return (plan.sparse_matrix(values) @ xd_t).T  # (m x n)(n x T) -> T x m

    @staticmethod
    def backward(ctx, grad):
        xd_t, values = ctx.saved_tensors
        plan = ctx.plan
        grad_t = grad.T.contiguous()  # m x T
        grad_xd = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_xd = (plan.sparse_matrix(values, transposed=True) @ grad_t).T
        if ctx.needs_input_grad[1]:
            grad_values = plan.sampled_product(grad_t, xd_t.T)
        return grad_xd, grad_values, None


class _MergedLinear(torch.autograd.Function):
    """One matmul with the rebuilt weight (merged into the base weight in delta mode).

    Forward: ``W = W0 + s * rebuild(values)`` (or ``rebuild(values)``), ``y = x W^T + b``. Keeps x and W.
    Backward: ``g W`` for x; for the coefficients either the adjoint of ``g^T x`` (``dense``) or the
    K sampled entries of ``DCT_m(g)^T DCT_n(x)`` (``sampled``).
    """

    @staticmethod
    def forward(ctx, x, values, base_weight, bias, plan, scaling, fan_in_fan_out, grad_method, weight_method):
        with torch.no_grad():
            weight = plan.rebuild(values.detach(), weight_method)
            if scaling != 1.0:
                weight.mul_(scaling)
            if base_weight is not None:
                weight.add_(_orient(base_weight, fan_in_fan_out))
            weight = weight.to(x.dtype)
        ctx.plan, ctx.scaling, ctx.fan_in_fan_out = plan, scaling, fan_in_fan_out
        ctx.grad_method, ctx.weight_method = grad_method, weight_method
        ctx.transform_dtype = values.dtype
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        grad_2d = grad.reshape(-1, grad.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_values = grad_base = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ weight).view(x.shape)
        need_weight_grad = ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            grad_values = _coefficient_grad(plan, grad_2d, x_2d, ctx.grad_method, ctx.weight_method, ctx.transform_dtype)
            if ctx.scaling != 1.0:
                grad_values = grad_values * ctx.scaling
        if need_weight_grad:  # a trainable base weight (rare): its plain gradient
            grad_base = _orient(grad_2d.T @ x_2d, ctx.fan_in_fan_out)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_values, grad_base, grad_bias, None, None, None, None, None


def sampled_chunk(plan: SpectralPlan, tokens: int) -> int:
    """Tokens per chunk of the sampled gradient: its transform buffers (a few chunk x (m + n) floats)
    then stay near one m x n buffer however many tokens there are; at least 256 rows per FFT call."""
    return min(tokens, max(256, plan.m * plan.n // (plan.m + plan.n)))


def _coefficient_grad(plan, grad_2d, x_2d, grad_method, weight_method, dtype):
    if grad_method == "dense":
        return plan.adjoint((grad_2d.T @ x_2d).to(dtype), weight_method)
    # sum over token chunks of DCT_m(g)^T DCT_n(x) at the K positions
    tokens = grad_2d.shape[0]
    chunk = sampled_chunk(plan, tokens)
    method_out = plan.activation_method("out", plan.block[0] if plan.block else plan.m, grad_2d.device, chunk)
    method_in = plan.activation_method("in", plan.block[1] if plan.block else plan.n, x_2d.device, chunk)
    total = None
    for start in range(0, tokens, chunk):
        g, x = grad_2d[start : start + chunk].to(dtype), x_2d[start : start + chunk].to(dtype)
        if plan.block is not None:
            p, q = plan.block
            part = (plan.analyse(g, "out", p, method_out).T @ plan.analyse(x, "in", q, method_in)).reshape(-1)
        else:
            gd_t = plan.analyse(g, "out", plan.m, method_out, transpose=True)
            xd_t = plan.analyse(x, "in", plan.n, method_in, transpose=True)
            part = plan.sampled_product(gd_t, xd_t.T)
        total = part if total is None else total.add_(part)
        del g, x, part
    return total


# --------------------------------------------------------------------------------------------------
# the paths


def available_paths(plan: SpectralPlan, mode: str) -> tuple[str, ...]:
    paths = ["dense", "sampled"]
    if mode == "delta":
        paths.append("separate")
    if plan.block is not None:
        paths.append("factored")
    if plan.basis == "dct":
        paths.append("spectral")
    return tuple(paths)


def run_path(
    path: str,
    x: torch.Tensor,
    values: torch.Tensor,
    plan: SpectralPlan,
    *,
    base_weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scaling: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``y = x W^T + b`` by one path. ``base_weight`` is W0 (delta mode, in its stored layout) or None.

    ``x`` is already in the compute dtype; autocast must be off (the layer sees to both).
    """
    mode = "replace" if base_weight is None else "delta"
    if path not in available_paths(plan, mode):
        raise ValueError(
            f"compute path {path!r} is not available for this layer ({mode} mode, "
            f"{'a ' + 'x'.join(map(str, plan.block)) + ' block' if plan.block else 'scattered positions'}, "
            f"basis {plan.basis!r}); available: {available_paths(plan, mode)} or 'auto'."
        )
    if bias is not None:
        bias = bias.to(x.dtype)
    if path in ("dense", "sampled"):
        shape = x.shape
        x_2d = x.reshape(-1, shape[-1])
        weight_method = plan.weight_method(x.device)
        y = _MergedLinear.apply(x_2d, values, base_weight, bias, plan, scaling, fan_in_fan_out, path, weight_method)
        return y.view(*shape[:-1], plan.m)
    if path == "separate":
        delta = rebuild(plan, values) * scaling
        out = F.linear(x, _orient(base_weight, fan_in_fan_out).to(x.dtype), bias)
        return out + F.linear(x, delta.to(x.dtype))
    update = _activation_update(path, x, values, plan)
    if scaling != 1.0:
        update = update * scaling
    if base_weight is None:
        return update if bias is None else update + bias
    return F.linear(x, _orient(base_weight, fan_in_fan_out).to(x.dtype), bias) + update


def _activation_update(path: str, x: torch.Tensor, values: torch.Tensor, plan: SpectralPlan) -> torch.Tensor:
    """``x W_S^T`` without building W_S: factored (matmul transforms) or spectral (FFT transforms)."""
    shape = x.shape
    x_2d = x.reshape(-1, shape[-1])
    if plan.block is not None:
        p, q = plan.block
        if path == "factored":  # in the activations' dtype, as a dense layer would be
            s = values.view(p, q).to(x.dtype)
            u = _Analyse.apply(x_2d, plan, "in", q, "matmul")
            out = _Synthesise.apply(u @ s.T, plan, "out", "matmul")
        else:  # FFTs in the transform dtype
            s = values.view(p, q)
            u = _Analyse.apply(x_2d.to(values.dtype), plan, "in", q, "fft")
            out = _Synthesise.apply(u @ s.T, plan, "out", "fft").to(x.dtype)
        return out.view(*shape[:-1], plan.m)
    xd = _Analyse.apply(x_2d.to(values.dtype), plan, "in", plan.n, "fft")
    z = _SparseProduct.apply(xd, values, plan)
    return _Synthesise.apply(z, plan, "out", "fft").to(x.dtype).view(*shape[:-1], plan.m)


# --------------------------------------------------------------------------------------------------
# the cost model


@dataclass(frozen=True)
class DeviceCosts:
    """Relative costs on one device type, in units of one float32 matmul flop.

    ``elementwise``: one pass over memory, per element. ``fft``: per element and log2(length) of a real
    FFT. ``dct_passes``: the passes around the FFT in one DCT. ``sparse``: per flop of a sparse-dense or
    sampled dense-dense product. ``half_matmul``: one bf16/fp16 matmul flop. ``launch``: the fixed cost of
    one operation (Python, dispatch and kernel launch), which decides small problems on a GPU.
    ``auto_paths``: the paths ``auto`` chooses among on this device.
    """

    elementwise: float
    fft: float
    sparse: float
    dct_passes: float
    half_matmul: float
    launch: float
    auto_paths: tuple = ("dense", "sampled", "factored", "spectral")


# Measured with benchmarks/calibrate.py and fitted to the forced-path timings of benchmarks/run.py
# --all-paths (benchmarks/README.md): a 2-core AMD EPYC (one thread) and an H100 (bf16 matmuls).
DEVICE_COSTS = {
    "cpu": DeviceCosts(elementwise=25.0, fft=8.0, sparse=15.0, dct_passes=11.0, half_matmul=1.0, launch=5e5),
    "cuda": DeviceCosts(
        elementwise=75.0, fft=7.5, sparse=128.0, dct_passes=2.5, half_matmul=0.07, launch=8e8,
        # measured on an H100 in bf16: the sampled and activation-domain paths never won by more than noise
        # (their float32 FFTs and sparse products cost more than bf16 matmuls there)
        auto_paths=("dense", "factored"),
    ),
}

# operations (kernels) per piece, for the launch term
_OPS_FFT_TRANSFORM = 6
_OPS_FUNCTION = 4  # an autograd Function's own bookkeeping, in operation equivalents


def _transform_cost(costs: DeviceCosts, rows: int, size: int, keep: int, method: str, matmul: float = 1.0) -> float:
    """One DCT (or inverse) of ``rows`` rows of length ``size``, ``keep`` coefficients kept; ``matmul`` is
    the cost of a matmul flop in the dtype the transform runs in."""
    if method == "matmul":
        return 2.0 * rows * size * keep * matmul + costs.launch
    # the FFT, and around it a gather, a complex twiddle product and a gather on the way out
    return rows * size * (costs.fft * math.log2(max(size, 2)) + costs.dct_passes * costs.elementwise) + (
        _OPS_FFT_TRANSFORM * costs.launch
    )


def _best_transform(plan: SpectralPlan, costs: DeviceCosts, rows: int, side: str, keep: int) -> float:
    size = plan.size(side)
    options = [_transform_cost(costs, rows, size, keep, "matmul")]
    if plan.basis == "dct":
        options.append(_transform_cost(costs, rows, size, keep, "fft"))
    return min(options)


def _weight_cost(plan: SpectralPlan, costs: DeviceCosts, method: str) -> float:
    """Rebuilding the m x n weight in float32 (its adjoint costs the same)."""
    m, n = plan.m, plan.n
    if plan.block is not None:
        p, q = plan.block
        if method == "matmul":
            return 2.0 * min(m * p * q + m * q * n, p * q * n + p * n * m) + 2 * costs.launch
        return _transform_cost(costs, p, n, n, "fft") + _transform_cost(costs, n, m, m, "fft")
    scatter = costs.elementwise * m * n + 2 * costs.launch
    if method == "matmul":
        return 2.0 * (m * m * n + m * n * n) + scatter + 2 * costs.launch
    return scatter + _transform_cost(costs, m, n, n, "fft") + _transform_cost(costs, n, m, m, "fft")


def estimate_costs(
    plan: SpectralPlan,
    mode: str,
    tokens: int,
    device_type: str = "cpu",
    *,
    coefficient_grad: bool = True,
    input_grad: bool = True,
    half: bool = False,
) -> dict[str, float]:
    """Relative cost (float32 matmul-flop units) of each available path for one forward (+ backward).

    ``half``: the activations are bf16/fp16, so their matmuls cost ``half_matmul`` per flop (the
    transforms stay float32).
    """
    costs = DEVICE_COSTS.get(device_type, DEVICE_COSTS["cpu"])
    h = costs.half_matmul if half else 1.0
    launch = costs.launch
    t, m, n, k = tokens, plan.m, plan.n, plan.k
    backward = coefficient_grad or input_grad
    dense_mm = 2.0 * t * m * n * h + launch
    weight = min(_weight_cost(plan, costs, "matmul"), _weight_cost(plan, costs, "fft") if plan.basis == "dct" else math.inf)
    base = 0.0
    if mode == "delta":  # what the activation-domain paths pay for W0 x (and its input gradient), and the sum
        base = dense_mm * (1 + input_grad) + costs.elementwise * t * m + launch

    out = {}
    merged = (
        weight + (costs.elementwise * m * n + launch) * (3 if mode == "delta" else 2) + dense_mm * (1 + input_grad)
        + _OPS_FUNCTION * launch
    )
    out["dense"] = merged + (dense_mm + weight + costs.elementwise * m * n if coefficient_grad else 0.0)
    if plan.block is not None:
        p, q = plan.block
        sampled_grad = (
            _best_transform(plan, costs, t, "out", p) + _best_transform(plan, costs, t, "in", q) + 2.0 * t * p * q + launch
        )
    else:
        sampled_grad = (
            _best_transform(plan, costs, t, "out", m)
            + _best_transform(plan, costs, t, "in", n)
            + costs.sparse * 2.0 * t * k
            + costs.elementwise * t * (m + n)
            + 4 * launch
        )
    out["sampled"] = merged + (sampled_grad if coefficient_grad else 0.0)
    if mode == "delta":
        out["separate"] = weight + base + dense_mm * (1 + input_grad) + (dense_mm + weight if coefficient_grad else 0.0)
    if plan.block is not None:
        p, q = plan.block
        for path, method in (("factored", "matmul"), ("spectral", "fft")):
            if method == "fft" and plan.basis != "dct":
                continue
            mm = h if method == "matmul" else 1.0  # factored runs in the activations' dtype, spectral in float32
            t_in = _transform_cost(costs, t, n, q, method, mm)
            t_out = _transform_cost(costs, t, m, p, method, mm)
            small = 2.0 * t * p * q * mm + launch
            cost = base + t_in + small + t_out + 2 * _OPS_FUNCTION * launch
            if backward:
                cost += t_out  # the output gradient into coefficient space
            if coefficient_grad:
                cost += small
            if input_grad:
                cost += small + t_in
            out[path] = cost
    elif plan.basis == "dct":
        t_in = _transform_cost(costs, t, n, n, "fft")
        t_out = _transform_cost(costs, t, m, m, "fft")
        sparse = costs.sparse * 2.0 * t * k + costs.elementwise * t * n + 2 * launch
        cost = base + t_in + sparse + t_out + 3 * _OPS_FUNCTION * launch
        if backward:
            cost += t_out + costs.elementwise * t * m
        if coefficient_grad:
            cost += sparse
        if input_grad:
            cost += sparse + t_in
        out["spectral"] = cost
    return out


def choose_path(
    plan: SpectralPlan,
    mode: str,
    tokens: int,
    device_type: str,
    *,
    coefficient_grad: bool,
    input_grad: bool,
    half: bool = False,
) -> str:
    """The cheapest path by :func:`estimate_costs` (``separate`` is never chosen: ``dense`` beats it)."""
    costs = estimate_costs(
        plan, mode, tokens, device_type, coefficient_grad=coefficient_grad, input_grad=input_grad, half=half
    )
    allowed = DEVICE_COSTS.get(device_type, DEVICE_COSTS["cpu"]).auto_paths
    return min((path for path in costs if path in allowed), key=costs.get)


# --------------------------------------------------------------------------------------------------
# model-level switches


def _spectral_layers(model):
    from .layer import SpectralLayer

    return [module for module in model.modules() if isinstance(module, SpectralLayer)]


def set_compute_path(model, path: str) -> int:
    """Force one compute path (or ``"auto"``) on every spectral layer of ``model``; returns how many.

    For tests and benchmarks: every path computes the same function, ``auto`` the cheapest one.
    """
    if path not in PATHS:
        raise ValueError(f"compute path must be one of {PATHS}, got {path!r}.")
    layers = _spectral_layers(model)
    for layer in layers:
        layer.compute_path = path
    return len(layers)


def set_weight_cache(model, enabled: bool) -> int:
    """Turn the evaluation-time weight cache of every spectral layer on or off (dropping what it holds)."""
    layers = _spectral_layers(model)
    for layer in layers:
        layer.cache_weights = bool(enabled)
        layer.drop_weight_cache()
    return len(layers)
