"""Benchmark spectral layers against nn.Linear, PEFT LoRA and PEFT FourierFT; print Markdown, write JSON.

    python -m benchmarks.run                       # the whole table on the CPU, fp32 (long on 2 cores)
    python -m benchmarks.run --device cuda --dtype bf16
    python -m benchmarks.run --shapes 768x768 --tokens 4096 --suite layers --repeats 5
    python -m benchmarks.run --suite models
    python -m benchmarks.run --suite models --models smollm2 --smollm2-tokens 128 512 2048

Every repeat runs every case once, in a rotated order (see ``common.time_interleaved``): on a shared
machine, slow phases hit all cases alike, and ratios come from medians measured in the same run.
Writes ``<out>/<name>.json`` (machine, settings, every case's times and peak memory) and ``<out>/<name>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from . import layers, models
from .common import Case, machine, markdown_table, time_interleaved

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["layers", "models", "all"], default="all")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--shapes", nargs="+", type=_shape, default=layers.SHAPES, help="out x in, e.g. 768x3072")
    parser.add_argument("--tokens", nargs="+", type=int, default=layers.TOKENS)
    parser.add_argument("--budgets", nargs="+", type=int, default=layers.DELTA_BUDGETS, help="delta-mode K")
    parser.add_argument("--kinds", nargs="+", default=["linear", "replace", "delta", "lora", "fourierft", "eval"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--all-paths", action="store_true", help="also time every forced compute path")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--finetune-k", type=int, default=65536)
    parser.add_argument("--models", nargs="+", choices=models.MODEL_GROUPS, default=list(models.MODEL_GROUPS),
                        help="model-suite groups")
    parser.add_argument("--smollm2-tokens", nargs="+", type=int, default=list(models.SMOLLM2_TOKENS))
    parser.add_argument("--smollm2-paths", nargs="*", default=[], help="also time spectral delta with these paths forced")
    parser.add_argument("--smollm2-layouts", nargs="+", default=list(models.SMOLLM2_LAYOUTS),
                        help="the spectral delta K=1000 layouts timed beside LoRA r=8 (sparse_grid@128 sets its "
                        "grid_rank; lora@32 adds LoRA at that rank)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default=None, help="file name stem (default: suite-device-dtype-time)")
    return parser.parse_args(argv)


def layer_markdown(rows: list[dict]) -> str:
    parts = []
    groups = {}
    for r in rows:
        groups.setdefault((r["m"], r["n"], r["tokens"]), []).append(r)
    headers = ["case", "path", "trainable", "median ms", "min-max ms", "x nn.Linear", "x LoRA r=8",
               "x LoRA matched", "x FourierFT", "peak MiB", "extra peak vs matched LoRA (m x n buffers)"]
    for (m, n, tokens), group in groups.items():
        table = []
        for r in group:
            table.append([
                r["name"], r.get("path", "-"), r.get("params"), r["median_ms"], f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
                r.get("x_linear"), r.get("x_lora8"), r.get("x_lora_matched"), r.get("x_fourierft"), r.get("peak_mib"),
                r.get("extra_peak_mn"),
            ])
        parts.append(f"#### {m} x {n} (out x in), {tokens} tokens, {group[0]['dtype']}\n\n" + markdown_table(headers, table))
    return "\n\n".join(parts)


def model_markdown(rows: list[dict]) -> str:
    headers = ["step", "path", "tokens", "trainable", "median ms", "min-max ms", "x dense", "x LoRA r=8",
               "x LoRA matched", "x FourierFT", "peak MiB"]
    table = [[
        r["name"], r.get("path", "-"), r["tokens"], r.get("params"), r["median_ms"], f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
        r.get("x_reference"), r.get("x_lora8"), r.get("x_lora_matched"), r.get("x_fourierft"), r.get("peak_mib"),
    ] for r in rows]
    return markdown_table(headers, table)


def machine_markdown(info: dict, args) -> str:
    keys = ["cpu", "cpu_count", "threads", "gpu", "cuda", "triton", "torch", "peft", "transformers", "platform", "load_average"]
    lines = [f"- {k}: {info[k]}" for k in keys if k in info]
    lines.append(f"- repeats: {args.repeats} (median, min-max), warm-up {args.warmup}; dtype {args.dtype}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = args.name or f"{args.suite}-{device.type}-{args.dtype}-{stamp}"
    result = {"machine": info, "settings": {k: v for k, v in vars(args).items()}, "layers": [], "models": []}
    markdown = [f"### {name}\n", machine_markdown(info, args)]

    if args.suite in ("layers", "all"):
        for m, n in args.shapes:
            for tokens in args.tokens:
                cases: list[Case] = layers.build_layer_cases(
                    m, n, tokens, device, dtype, all_paths=args.all_paths, budgets=args.budgets, kinds=tuple(args.kinds)
                )
                time_interleaved(cases, device, args.repeats, args.warmup, target_s=0.02 if device.type == "cuda" else 0.05)
                layers.finish_cases(cases, device, memory=not args.no_memory)
                rows = layers.layer_rows([c.summary() for c in cases])
                result["layers"].extend(rows)
                text = layer_markdown(rows)
                print(text + "\n", flush=True)
                del cases
                _write(args, name, result, markdown + ["\n### Layers (so far)\n\n" + layer_markdown(result["layers"])])
        markdown.append("\n### Layers: forward + backward (eval rows: forward only, no gradients)\n\n" + layer_markdown(result["layers"]))
    if args.suite in ("models", "all"):
        cases = models.build_model_cases(
            device, dtype, finetune_k=args.finetune_k, groups=tuple(args.models), smollm2_tokens=tuple(args.smollm2_tokens),
            smollm2_paths=tuple(args.smollm2_paths), smollm2_layouts=tuple(args.smollm2_layouts),
        )
        time_interleaved(cases, device, args.repeats, args.warmup, target_s=0.02 if device.type == "cuda" else 0.05)
        models.finish_model_cases(cases, device, memory=not args.no_memory)
        result["models"] = models.model_rows([c.summary() for c in cases])
        text = model_markdown(result["models"])
        print(text + "\n", flush=True)
        markdown.append("\n### Models: one training step (forward, backward, AdamW)\n\n" + text)

    _write(args, name, result, markdown)
    print(machine_markdown(info, args))
    return result


def _write(args, name: str, result: dict, markdown: list[str]) -> None:
    # written after every group too, so a run cut short keeps what it measured
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write("\n".join(markdown) + "\n")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
