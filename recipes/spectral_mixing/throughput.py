"""Training throughput, attention against the mixer, side by side: one full step (forward, backward, AdamW)
of the fair profile's model at each context, the same tokens per step at every context.

    python -m recipes.spectral_mixing.throughput [--contexts 256 1024 2048] [--tokens 4096] [--repeats 7]
        [--threads 2 1] [--out recipes/spectral_mixing/results/throughput.json]

Both arms are built as the fair profile builds them (``configs/fair.yaml``: 4 layers, 128 wide, the mixer's K
matched to the attention's parameters) with ``n_positions`` = the context. At each thread count and context the
two arms' steps alternate (attention, mixer, attention, ...) after one warm-up step each, so drift in the
machine's speed falls on both; the table gives the medians, the ratio of the medians, and tokens/s. bench.py
measures the same models at batch 1 with each arm in its own process (there the point is memory against T).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from recipes.common.machine import cpu_name

from .train import build_model, load_settings, make_optimizer

ARMS = ("attention", "mixer")
FAIR_PROFILE = Path(__file__).parent / "configs" / "fair.yaml"
VOCAB = 65


def step_function(arm: str, context: int, batch: int):
    settings = load_settings(str(FAIR_PROFILE), arm, 0, [f"block_size={context}", f"batch_size={batch}"])
    model = build_model(settings, VOCAB).train()
    optimizer = make_optimizer(model, settings)
    ids = torch.randint(0, VOCAB, (batch, context), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.model = model
    return step


def measure(context: int, tokens: int, repeats: int) -> dict:
    batch = max(1, tokens // context)
    steps = {arm: step_function(arm, context, batch) for arm in ARMS}
    for step in steps.values():
        step()  # warm-up
    seconds = {arm: [] for arm in ARMS}
    for _ in range(repeats):
        for arm in ARMS:
            start = time.perf_counter()
            steps[arm]()
            seconds[arm].append(time.perf_counter() - start)
    medians = {arm: statistics.median(seconds[arm]) for arm in ARMS}
    return {
        "context": context, "batch": batch, "tokens": batch * context, "seconds": seconds, "medians": medians,
        "mixer_over_attention_time": medians["mixer"] / medians["attention"],
        "mixer_throughput_vs_attention": medians["attention"] / medians["mixer"],
    }


def table(rows: list[dict]) -> str:
    lines = ["| threads | context | batch | attention ms | mixer ms | mixer tokens/s ÷ attention's |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        a, m = row["medians"]["attention"] * 1e3, row["medians"]["mixer"] * 1e3
        lines.append(f"| {row['threads']} | {row['context']:,} | {row['batch']} | {a:,.0f} | {m:,.0f} | "
                     f"{row['mixer_throughput_vs_attention']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=4096, help="Tokens per step (batch = tokens // context).")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1],
                        help="Thread counts to measure at (default: torch's default, then 1).")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    load = os.getloadavg()
    rows = []
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        for context in args.contexts:
            rows.append({"threads": threads, **measure(context, args.tokens, args.repeats)})
            print(f"threads {threads}, context {context}: {rows[-1]['mixer_throughput_vs_attention']:.2f}x", flush=True)
    results = {
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load_average_before": load, "load_average_after": os.getloadavg()},
        "settings": vars(args), "rows": rows, "wall_seconds": round(time.perf_counter() - start, 1),
    }
    print(f"{results['machine']['cpu']}, torch {torch.__version__}, fp32, {args.tokens} tokens a step, "
          f"medians of {args.repeats} alternating steps; {results['wall_seconds']} s")
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
