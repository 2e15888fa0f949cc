"""The FFT-based DCT with and without the fused Triton kernels, and the paths that use it (CUDA).

    python -m benchmarks.transforms --out DIR

Times (median of ``do_bench``-style event timing) the DCT and inverse DCT of T x n float32 activations,
the rebuild of an n x n weight, and a few layer paths, once with ``triton_kernels.enabled`` and once
without, interleaved. Writes ``transforms.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from hf_spectral.dct import dct_lastdim, idct_lastdim
from hf_spectral.layouts import lowfreq_block

from hf_spectral import CoefficientSpace, triton_kernels

from .common import markdown_table


def _bench(fn, repeats=50):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _ops(tokens, n, k, x, w, plan, values, block_plan, block_values) -> dict:
    return {
        f"DCT {tokens} x {n}": lambda: dct_lastdim(x),
        f"DCT {tokens} x {n}, transposed out": lambda: dct_lastdim(x, transpose=True),
        # dct no longer calls the fused inverse (it measured slower); time it directly so that stays checkable
        f"IDCT {tokens} x {n}": lambda: idct_lastdim(x),
        f"rebuild {n} x {n}, K={k} scattered (fft)": lambda: plan.to_matrix(values, "fft"),
        f"adjoint {n} x {n}, K={k} scattered (fft)": lambda: plan.from_matrix(w, "fft"),
        f"rebuild {n} x {n}, block mn/2 (fft)": lambda: block_plan.to_matrix(block_values, "fft"),
        f"rebuild {n} x {n}, block mn/2 (matmul fp32)": lambda: block_plan.to_matrix(block_values, "matmul"),
        f"matmul {tokens} x {n} x {n} bf16": (lambda a=x.bfloat16(), b=w.bfloat16(): a @ b),  # noqa: B008
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    rows = []
    for n in (768, 2048, 4096):
        x = torch.randn(args.tokens, n, device=device)
        w = torch.randn(n, n, device=device)
        k = 65536
        plan = CoefficientSpace(n, n, "dct", 0, indices=torch.randperm(n * n, device=device)[:k].sort().values)
        block = lowfreq_block(n, n, n * n // 2)
        block_plan = CoefficientSpace(n, n, "dct", 0, block=block)
        values, block_values = torch.randn(k, device=device), torch.randn(block[0] * block[1], device=device)
        ops = _ops(args.tokens, n, k, x, w, plan, values, block_plan, block_values)
        for name, fn in ops.items():
            timings = {}
            for enabled in (True, False, True, False):
                triton_kernels.enabled = enabled
                timings.setdefault(enabled, []).append(_bench(fn))
            triton_kernels.enabled = True
            fused, plain = min(timings[True]), min(timings[False])
            bytes_moved = x.numel() * 4 * 2 if name.startswith(("DCT", "IDCT")) else None
            rows.append({"op": name, "fused_ms": fused, "pytorch_ms": plain, "speedup": plain / fused,
                         "fused_GBps": bytes_moved / fused / 1e6 if bytes_moved else None})
    print(markdown_table(["op", "Triton-fused ms", "PyTorch ms", "speed-up", "fused GB/s (in+out only)"],
                         [[r["op"], r["fused_ms"], r["pytorch_ms"], r["speedup"], r["fused_GBps"]] for r in rows]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "transforms.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
