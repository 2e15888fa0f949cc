"""Where the time of one delta layer goes: the scattered ``spectral`` path next to a frozen linear, LoRA and
what memory traffic allows.

    python -m benchmarks.profile_layer                                   # every shape and token count
    python -m benchmarks.profile_layer --shapes 576x576 --tokens 512 --repeats 3 --threads 1

Per shape (out x in = m x n) and token count T, one forward + backward with the input's gradient (fp32):

- ``frozen nn.Linear``: the delta layer's base alone, what any adapter pays at least;
- ``LoRA r=8``: PEFT's LoRA on that layer;
- ``delta random K=1000 [path]``: the default spectral delta with each path forced (``dense``, ``sampled``,
  ``spectral``), and ``spectral (composed)``: the ``spectral`` maths as three autograd pieces, the way the path
  ran before it was one fused function;
- ``transforms alone``: the four FFT transforms the spectral path runs (DCT_n(x), IDCT_m, DCT_m(g), IDCT_n),
  and ``their FFTs alone``: the real FFTs inside them, without the passes around them (reorder, twiddle, gathers);
- ``traffic bound``: the bytes those four must move at least (each reads its input and writes its output
  once, 8 bytes per float32 element: 8 T (2m + 2n)) at the bandwidth of a copy of a T x max(m, n) float32
  tensor, timed in the same run; ``floor`` = frozen linear + traffic bound, what an exact spectral layer
  with transforms at memory speed and free sparse products would cost.

Every repeat runs every case once in a rotated order (``common.time_interleaved``); medians with min-max.
Run at torch's default thread count and at 1 thread unless ``--threads`` says otherwise. Writes JSON with
``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from hf_spectral import SpectralConfig
from hf_spectral.compute import functions
from recipes.common.machine import cpu_name

from .common import Case, markdown_table, time_interleaved
from .layers import _Holder

SHAPES = [(576, 576), (1536, 576), (576, 1536)]
TOKENS = [128, 512, 2048]
K = 1000


def machine_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return cpu_name()


def _frozen_linear(m: int, n: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(n, m).requires_grad_(False)


def _train_step(forward, x, grad_out, params):
    def step():
        forward(x).backward(grad_out)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def build_cases(m: int, n: int, tokens: int) -> tuple[list[Case], dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, n, requires_grad=True)
    grad_out = torch.randn(tokens, m)
    cases = []

    base = _frozen_linear(m, n)
    cases.append(Case("frozen nn.Linear", _train_step(base, x, grad_out, [])))

    lora = get_peft_model(_Holder(_frozen_linear(m, n)), LoraConfig(r=8, target_modules=["layer"]))
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    cases.append(Case("LoRA r=8", _train_step(lora, x, grad_out, lora_params)))

    config = SpectralConfig(mode="delta", layout="random", n_coefficients=K, init_weights=False, target_modules=["layer"])
    for path in ("dense", "sampled", "spectral"):
        model = get_peft_model(_Holder(_frozen_linear(m, n)), config)
        model.base_model.model.layer.compute_path = path
        params = [p for p in model.parameters() if p.requires_grad]
        cases.append(Case(f"delta random K={K} [{path}]", _train_step(model, x, grad_out, params)))

    # the same path as three autograd pieces (Analyse, SparseProduct, Synthesise) around the frozen product
    layer = get_peft_model(_Holder(_frozen_linear(m, n)), config).base_model.model.layer
    space, values = layer.coefficient_space("default"), layer.spectral_coefficients["default"]
    scaling, base_layer = layer.spectral_settings["default"].scaling, layer.get_base_layer()

    def composed(inputs):
        update = functions.composed_spectral_update(inputs, values, space) * scaling
        return F.linear(inputs, base_layer.weight, base_layer.bias) + update

    cases.append(Case(f"delta random K={K} [spectral (composed)]", _train_step(composed, x, grad_out, [values])))

    x_plain, g_plain = x.detach(), grad_out
    coefficients = torch.randn(tokens, m)

    def transforms():
        with torch.no_grad():
            space.analyse(x_plain, "in", n, "fft", transpose=True)
            space.synthesise(coefficients, "out", "fft")
            space.analyse(g_plain, "out", m, "fft", transpose=True, scratch=True)
            space.synthesise(x_plain, "in", "fft")

    cases.append(Case("transforms alone (4)", transforms))

    # the four FFTs inside them, into kept buffers: what the FFT library itself costs
    spectra = {size: torch.empty(tokens, size // 2 + 1, dtype=torch.complex64) for size in (m, n)}
    signals = {size: torch.empty(tokens, size) for size in (m, n)}
    real_in = {n: x_plain, m: coefficients}

    def ffts():
        for size in (n, m):
            torch.fft.rfft(real_in[size], dim=-1, out=spectra[size])
            torch.fft.irfft(spectra[size], n=size, dim=-1, out=signals[size])

    cases.append(Case("their FFTs alone (4)", ffts))

    size = max(m, n)
    source, target = torch.randn(tokens, size), torch.empty(tokens, size)
    cases.append(Case(f"copy T x {size}", lambda: target.copy_(source)))
    traffic = {"transform_bytes": 8 * tokens * (2 * m + 2 * n), "copy_bytes": 8 * tokens * size}
    return cases, traffic


def _ratios(ms: float, linear: float, lora: float) -> dict:
    return {"x_linear": ms / linear, "x_lora": ms / lora}


def run(shapes, token_counts, repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for m, n in shapes:
        for tokens in token_counts:
            cases, traffic = build_cases(m, n, tokens)
            time_interleaved(cases, torch.device("cpu"), repeats)
            summaries = {case.name: case.summary() for case in cases}
            copy = summaries[f"copy T x {max(m, n)}"]
            bandwidth = traffic["copy_bytes"] / (copy["median_ms"] * 1e-3)
            bound_ms = traffic["transform_bytes"] / bandwidth * 1e3
            linear, lora = summaries["frozen nn.Linear"]["median_ms"], summaries["LoRA r=8"]["median_ms"]
            where = {"m": m, "n": n, "tokens": tokens, "threads": threads}
            for s in summaries.values():
                rows.append({**where, **s, **_ratios(s["median_ms"], linear, lora)})
            bound = {"name": "traffic bound (4 transforms)", "median_ms": bound_ms, "bandwidth_gb_s": bandwidth / 1e9}
            rows.append({**where, **bound})
            floor = {"name": "floor: frozen linear + traffic bound", "median_ms": linear + bound_ms}
            rows.append({**where, **floor, **_ratios(linear + bound_ms, linear, lora)})
            print(f"  {m}x{n} T={tokens} threads={threads} done", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    headers = ["shape", "T", "threads", "case", "median ms", "min-max ms", "x frozen linear", "x LoRA r=8"]
    body = []
    for r in rows:
        if "min_ms" in r:
            spread = f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"
        else:
            spread = f"{r['bandwidth_gb_s']:.1f} GB/s copy" if "bandwidth_gb_s" in r else ""
        x_linear = f"{r['x_linear']:.2f}" if "x_linear" in r else ""
        x_lora = f"{r['x_lora']:.2f}" if "x_lora" in r else ""
        shape = f"{r['m']}x{r['n']}"
        body.append([shape, r["tokens"], r["threads"], r["name"], f"{r['median_ms']:.2f}", spread, x_linear, x_lora])
    return markdown_table(headers, body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{m}x{n}" for m, n in SHAPES], help="out x in, e.g. 576x1536")
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--repeats", type=int, default=7, help="samples per case (each a rotated pass over all cases)")
    parser.add_argument("--threads", nargs="+", type=int, default=None, help="thread counts (default: torch's, then 1)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    shapes = []
    for text in args.shapes:
        try:
            m, n = (int(v) for v in text.lower().split("x"))
        except ValueError:
            parser.error(f"--shapes takes out x in as MxN (e.g. 576x1536), got {text!r}")
        shapes.append((m, n))
    threads = args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)
    name = machine_name()
    print(f"machine: {name}; torch {torch.__version__}; fp32; threads {threads}; {args.repeats} repeats")
    rows = []
    for count in threads:
        rows += run(shapes, args.tokens, args.repeats, count)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
