"""Measure the constants of the compute paths' cost model (``hf_spectral.compute.cost_model.DEVICE_COSTS``).

    python -m benchmarks.calibrate [--device cuda]

Everything is expressed in units of one matmul flop: an elementwise pass per element, an FFT per element
and log2(length), a sparse (sampled) product per flop. Prints the constants and a check of the model
against measured transforms and rebuilds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from hf_spectral.dct import dct_lastdim, idct_lastdim
from hf_spectral.layouts import lowfreq_block

from hf_spectral import CoefficientSpace
from hf_spectral.compute import cost_model


def _time(fn, device, repeats=7) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        inner = 1 if device.type == "cpu" else 20
        for _ in range(inner):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def calibrate(device: torch.device, tokens: int = 4096, size: int = 2048) -> dict:
    f32 = dict(device=device, dtype=torch.float32)
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(tokens, size, device=device, dtype=gemm_dtype)
    b = torch.randn(size, size, device=device, dtype=gemm_dtype)
    per_flop = _time(lambda: a @ b, device) / (2.0 * tokens * size * size)
    x = torch.randn(tokens, size, **f32)
    elementwise = _time(lambda: x * 1.5, device) / x.numel() / per_flop
    fft = _time(lambda: torch.fft.rfft(x, dim=-1), device) / (x.numel() * math.log2(size)) / per_flop
    k = 65536
    plan = CoefficientSpace(size, size, "dct", 0, indices=torch.randperm(size * size)[:k].sort().values.to(device))
    g_t = torch.randn(size, tokens, **f32)
    xd_t = torch.randn(size, tokens, **f32)
    sparse = _time(lambda: plan.sampled_product(g_t, xd_t.T), device) / (2.0 * tokens * k) / per_flop
    constants = {"elementwise": elementwise, "fft": fft, "sparse": sparse}

    # check the model with these constants on composite operations
    costs = cost_model.DeviceCosts(**constants)
    checks = []
    for name, fn, model in [
        ("DCT of T x n (fft)", lambda: dct_lastdim(x), cost_model.transform_cost(costs, tokens, size, size, "fft")),
        ("IDCT of T x n (fft)", lambda: idct_lastdim(x), cost_model.transform_cost(costs, tokens, size, size, "fft")),
        ("DCT of T x n (matmul)", lambda: plan.analyse(x, "in", size, "matmul"), 2.0 * tokens * size * size * (1 if gemm_dtype == torch.float32 else 0)),
        ("rebuild scattered (fft)", lambda: plan.to_matrix(torch.randn(k, **f32), "fft"), cost_model.weight_cost(plan, costs, "fft")),
    ]:
        checks.append({"op": name, "measured_ms": _time(fn, device) * 1e3, "model_ms": model * per_flop * 1e3})
    block = lowfreq_block(size, size, size * size // 2)
    block_plan = CoefficientSpace(size, size, "dct", 0, block=block)
    values = torch.randn(block[0] * block[1], **f32)
    for method in ("matmul", "fft"):
        checks.append({
            "op": f"rebuild block mn/2 ({method})",
            "measured_ms": _time(lambda method=method: block_plan.to_matrix(values, method), device) * 1e3,
            "model_ms": cost_model.weight_cost(block_plan, costs, method) * per_flop * 1e3,
        })
    return {"device": str(device), "matmul_dtype": str(gemm_dtype), "matmul_tflops": 1e-12 / per_flop,
            "constants": constants, "checks": checks}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args(argv)
    result = calibrate(torch.device(args.device), args.tokens, args.size)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
