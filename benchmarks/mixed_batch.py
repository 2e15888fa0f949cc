"""Mixed-batch inference against running each adapter's rows on their own, one group after another.

    python -m benchmarks.mixed_batch [--threads 1] [--repeats 7]

A Llama built from its config (hidden 512, 4 layers, 8 heads, intermediate 1376, vocabulary 8192), three spectral
delta adapters (K = 1000 on every projection) and the base model, a batch of 12 rows x 128 tokens, three rows per
adapter. Both ways compute the same rows (tests/test_lora_parity.py); this measures what one batch costs against
four forwards of three rows, each after ``set_adapter``. Prints a Markdown table with medians and min-max.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_spectral import SpectralConfig

from .common import machine

ADAPTERS = ("one", "two", "three")


def build():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=8192, max_position_embeddings=256,
    )
    spectral = dict(n_coefficients=1000, init_weights=False, target_modules="all-linear")
    model = get_peft_model(LlamaForCausalLM(config), SpectralConfig(seed=0, **spectral), adapter_name=ADAPTERS[0])
    for seed, name in enumerate(ADAPTERS[1:], start=1):
        model.add_adapter(name, SpectralConfig(seed=seed, **spectral))
    return model.eval()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm: caches, merged weights
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build()
    names = [name for name in (*ADAPTERS, "__base__") for _ in range(3)]
    ids = torch.randint(0, 8192, (len(names), 128), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def mixed():
        model(input_ids=ids, adapter_names=names)

    @torch.no_grad()
    def one_group_at_a_time():
        for group in (*ADAPTERS, "__base__"):
            rows = [i for i, name in enumerate(names) if name == group]
            if group == "__base__":
                with model.disable_adapter():
                    model(input_ids=ids[rows])
            else:
                model.set_adapter(group)
                model(input_ids=ids[rows])

    results = {"mixed batch (12 rows)": timed(mixed, args.repeats),
               "one group after another (4 x 3 rows)": timed(one_group_at_a_time, args.repeats)}
    info = machine(torch.device("cpu"))
    print(f"{info['cpu']}, torch {info['torch']}, {info['threads']} threads, fp32, 12 x 128 tokens\n")
    base = statistics.median(results["one group after another (4 x 3 rows)"])
    print("| way | median ms | min-max ms | x groups |\n|---|---|---|---|")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"| {name} | {median * 1e3:.0f} | {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
