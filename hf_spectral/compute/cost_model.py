"""The cost model that ranks a spectral layer's compute paths (and, in a coefficient space, FFT against
matmul transforms).

Costs are in units of one float32 matmul flop on the device; each term below is one piece of work a
path does, with its count of flops or of elements passed over memory. The constants are measured per
device type (``benchmarks/calibrate.py``) and fitted to forced-path timings (``benchmarks/README.md``).
The model only ranks paths: every path is exact, so a wrong ranking costs time, never accuracy.
``auto`` takes its cheapest path unless ``tune_compute_paths`` measured one (``autotune.py``, which uses it
to prune the candidates it times).

A space passed in here needs only ``m``, ``n``, ``k``, ``block``, ``fft_ok``, ``factorable`` and
``support_shape()`` (a ``coefficient_space.CoefficientSpace``); this module imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["DeviceCosts", "DEVICE_COSTS", "costs_for", "transform_cost", "weight_cost", "estimate_costs", "choose_path"]


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
_OPS_FFT_TRANSFORM = 6  # the operations of one FFT-based DCT: gathers, the FFT, the twiddle product, the sign flip
_OPS_FUNCTION = 4  # an autograd Function's own bookkeeping, in operation equivalents


# The CPU constants hold at one thread. Matmuls spread over every thread; the passes around an FFT, the sparse
# products and each operation's overhead gain much less (on the 2-core EPYC, two threads ran a 2048 x 576 x 576
# matmul 1.6x faster and the DCT of the same activations 1.2x), so per matmul flop they cost threads ** 0.7 more.
_CPU_THREAD_EXPONENT = 0.7


@torch.compiler.assume_constant_result
def _cpu_threads() -> int:
    return torch.get_num_threads()


@functools.lru_cache(maxsize=None)
def _cpu_costs(threads: int) -> DeviceCosts:
    costs, factor = DEVICE_COSTS["cpu"], max(threads, 1) ** _CPU_THREAD_EXPONENT
    return dataclasses.replace(
        costs, elementwise=costs.elementwise * factor, fft=costs.fft * factor, sparse=costs.sparse * factor,
        launch=costs.launch * factor,
    )


def costs_for(device_type: str) -> DeviceCosts:
    """The constants of a device type (an unknown type is costed as a CPU, at torch's thread count)."""
    if device_type in DEVICE_COSTS and device_type != "cpu":
        return DEVICE_COSTS[device_type]
    return _cpu_costs(_cpu_threads())


def transform_cost(costs: DeviceCosts, rows: int, size: int, keep: int, method: str, matmul: float = 1.0) -> float:
    """One DCT (or inverse) of ``rows`` rows of length ``size``, ``keep`` coefficients kept; ``matmul`` is
    the cost of a matmul flop in the dtype the transform runs in."""
    if method == "matmul":
        # a (rows x size) @ (size x keep) product, one launch
        return 2.0 * rows * size * keep * matmul + costs.launch
    # the real FFT (n log n per row), the passes around it (a gather, a complex twiddle product and a gather
    # on the way out), and their launches
    return rows * size * (costs.fft * math.log2(max(size, 2)) + costs.dct_passes * costs.elementwise) + (
        _OPS_FFT_TRANSFORM * costs.launch
    )


def _best_transform(space, costs: DeviceCosts, rows: int, side: str, keep: int) -> float:
    size = space.m if side == "out" else space.n
    options = [transform_cost(costs, rows, size, keep, "matmul")]
    if space.fft_ok:
        options.append(transform_cost(costs, rows, size, keep, "fft"))
    return min(options)


def weight_cost(space, costs: DeviceCosts, method: str) -> float:
    """Rebuilding the m x n weight in float32 (its adjoint costs the same)."""
    m, n = space.m, space.n
    if space.block is not None:
        p, q = space.block
        if method == "matmul":
            # two products through the p x q block, in the cheaper association order
            return 2.0 * min(m * p * q + m * q * n, p * q * n + p * n * m) + 2 * costs.launch
        # p rows to length n, then n rows to length m
        return transform_cost(costs, p, n, n, "fft") + transform_cost(costs, n, m, m, "fft")
    # the scatter of K values into an m x n zero matrix (one pass over it)
    scatter = costs.elementwise * m * n + 2 * costs.launch
    if method == "matmul":
        return 2.0 * (m * m * n + m * n * n) + scatter + 2 * costs.launch
    return scatter + transform_cost(costs, m, n, n, "fft") + transform_cost(costs, n, m, m, "fft")


def estimate_costs(
    space,
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
    costs = costs_for(device_type)
    h = costs.half_matmul if half else 1.0
    launch = costs.launch
    t, m, n, k = tokens, space.m, space.n, space.k
    backward = coefficient_grad or input_grad
    # one T x n by n x m product in the activations' dtype
    dense_mm = 2.0 * t * m * n * h + launch
    # the cheaper rebuild of W (and, in backward, of the adjoint)
    weight = min(weight_cost(space, costs, "matmul"), weight_cost(space, costs, "fft") if space.fft_ok else math.inf)
    base = 0.0
    if mode == "delta":  # what the activation-domain paths pay for W0 x (and its input gradient), and the sum
        base = dense_mm * (1 + input_grad) + costs.elementwise * t * m + launch

    out = {}
    # dense and sampled: rebuild W, scale it, add W0 (delta), cast; y = x W^T and, in backward, g W
    merged = (
        weight + (costs.elementwise * m * n + launch) * (3 if mode == "delta" else 2) + dense_mm * (1 + input_grad)
        + _OPS_FUNCTION * launch
    )
    # dense: S's gradient is the adjoint of the m x n product g^T x
    out["dense"] = merged + (dense_mm + weight + costs.elementwise * m * n if coefficient_grad else 0.0)
    # sampled: S's gradient from DCT_m(g) and DCT_n(x), only at the kept positions
    if space.block is not None:
        p, q = space.block
        sampled_grad = (
            _best_transform(space, costs, t, "out", p) + _best_transform(space, costs, t, "in", q) + 2.0 * t * p * q + launch
        )
    else:
        sampled_grad = (
            _best_transform(space, costs, t, "out", m)
            + _best_transform(space, costs, t, "in", n)
            + costs.sparse * 2.0 * t * k  # the sampled dense-dense product at K positions
            + costs.elementwise * t * (m + n)  # casts and transposes of the transformed activations
            + 4 * launch
        )
    out["sampled"] = merged + (sampled_grad if coefficient_grad else 0.0)
    # separate: W0 x and dW x as two products (and dW's gradient as a dense product)
    if mode == "delta":
        out["separate"] = weight + base + dense_mm * (1 + input_grad) + (dense_mm + weight if coefficient_grad else 0.0)
    if space.factorable:
        out["factored"] = _factored_cost(space, costs, mode, t, h, base, coefficient_grad, input_grad)
    if space.block is not None and space.fft_ok:  # a top-left block in the activation domain, by FFTs
        p, q = space.block
        t_in = transform_cost(costs, t, n, q, "fft")  # x to its first q input coefficients
        t_out = transform_cost(costs, t, m, p, "fft")  # p output coefficients back to length m
        small = 2.0 * t * p * q + launch  # the p x q product in coefficient space
        cost = base + t_in + small + t_out + 2 * _OPS_FUNCTION * launch
        if backward:
            cost += t_out  # the output gradient into coefficient space
        if coefficient_grad:
            cost += small
        if input_grad:
            cost += small + t_in
        out["spectral"] = cost
    elif space.block is None and space.fft_ok:
        # one fused function (functions.ScatteredSpectral): the transforms write the layout the sparse products
        # read, and the frozen product is accumulated onto the update (no separate sum)
        t_in = transform_cost(costs, t, n, n, "fft")
        t_out = transform_cost(costs, t, m, m, "fft")
        sparse = costs.sparse * 2.0 * t * k + 2 * launch  # a sparse product with S (or S^T), or the sampled one
        fused_base = base - (costs.elementwise * t * m + launch) if mode == "delta" else 0.0
        cost = fused_base + t_in + sparse + t_out + _OPS_FUNCTION * launch
        if backward:
            cost += t_out  # DCT_m(g), shared by both gradients
        if coefficient_grad:
            cost += sparse
        if input_grad:
            cost += sparse + t_in
        out["spectral"] = cost
    return out


def _factored_cost(space, costs: DeviceCosts, mode: str, t: int, h: float, base: float, coefficient_grad: bool,
                   input_grad: bool) -> float:
    """LoRA's two products at rank r = min(p', q') through the p' rows x q' columns the coefficients sit on, in
    the activations' dtype; the sum with W0 x rides in the last product. The token-free factor (r x n or m x r)
    is built from S' and fixed basis rows."""
    m, n, launch = space.m, space.n, costs.launch
    p_s, q_s = space.support_shape()
    r, wide = min(p_s, q_s), (n if p_s <= q_s else m)  # wide: the length of the token-free factor's rows
    scatter = 0.0 if space.block is not None else costs.elementwise * p_s * q_s
    factor = 2.0 * p_s * q_s * wide + scatter + 2 * launch
    product = 2.0 * t * r * h  # per unit of length: T tokens through rank r
    cost = base - (costs.elementwise * t * m if mode == "delta" else 0.0) + factor + product * (n + m) + 2 * launch
    if p_s <= q_s:  # g B_m[rows]^T serves both gradients; then x's gradient and the factor's
        shared, input_part = m, n
    else:  # the factor's gradient reads x B_n[cols]^T kept from the forward; x's gradient goes back through both
        shared, input_part = 0, m + n
    if coefficient_grad or input_grad:
        cost += product * shared + launch
    if coefficient_grad:
        cost += factor + product * wide + launch
    if input_grad:
        cost += product * input_part + launch
    return cost


def choose_path(
    space,
    mode: str,
    tokens: int,
    device_type: str,
    *,
    coefficient_grad: bool,
    input_grad: bool,
    half: bool = False,
    sparse: bool = True,
) -> str:
    """The cheapest path by :func:`estimate_costs` (``separate`` is never chosen: ``dense`` beats it).

    ``sparse=False`` leaves out the paths that need sparse products (``sampled`` and ``spectral`` on scattered
    positions): under ``torch.compile``, whose graphs cannot build the sparse patterns those paths read."""
    costs = estimate_costs(
        space, mode, tokens, device_type, coefficient_grad=coefficient_grad, input_grad=input_grad, half=half
    )
    allowed = costs_for(device_type).auto_paths
    if not sparse and space.block is None:
        allowed = tuple(path for path in allowed if path not in ("sampled", "spectral"))
    best = None
    for path, cost in costs.items():  # the first of the cheapest, as min() would; a loop torch.compile can trace
        if path in allowed and (best is None or cost < costs[best]):
            best = path
    return best
