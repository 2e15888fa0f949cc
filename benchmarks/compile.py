"""Eager against ``torch.compile`` for one training step (forward, backward, AdamW), spectral delta and LoRA.

    python -m benchmarks.compile [--threads 1] [--repeats 5]

A Llama built from its config (hidden 256, 4 layers, 4 heads, intermediate 688, vocabulary 4096), every projection
adapted: spectral delta K = 1000, LoRA r = 8. Batch 2 x 256 tokens. Reports the first step (which compiles) and the
median of the next steps, with min-max. ``tests/test_compile.py`` checks that compiled and eager agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_spectral import SpectralConfig

from .common import machine


def build(kind: str):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=4096, max_position_embeddings=256,
    ))
    if kind == "spectral":
        config = SpectralConfig(n_coefficients=1000, init_weights=False, target_modules="all-linear")
    else:
        config = LoraConfig(r=8, target_modules="all-linear")
    return get_peft_model(base, config).train()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.randint(0, 4096, (2, 256), generator=torch.Generator().manual_seed(0))
    rows = []
    for kind in ("spectral", "lora"):
        for compiled in (False, True):
            model = build(kind)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            forward = torch.compile(model) if compiled else model

            def step(forward=forward, optimizer=optimizer):
                forward(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()

            start = time.perf_counter()
            step()
            first = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            rows.append((kind, "compiled" if compiled else "eager", first, times))
    info = machine(torch.device("cpu"))
    print(f"{info['cpu']}, torch {info['torch']}, {info['threads']} threads, fp32, 2 x 256 tokens\n")
    print("| adapter | mode | first step s | median ms | min-max ms | x eager |\n|---|---|---|---|---|---|")
    for kind, mode, first, times in rows:
        eager = statistics.median(next(t for k, m, _, t in rows if k == kind and m == "eager"))
        median = statistics.median(times)
        print(f"| {kind} | {mode} | {first:.1f} | {median * 1e3:.0f} | {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} "
              f"| {median / eager:.2f} |")


if __name__ == "__main__":
    main()
