"""Decoding cost per token at two contexts, measured interleaved in one process (drift-proof on a busy CPU).

    python -m recipes.spectral_mixing.decode_check [--arm mixer] [--contexts 1024 16384] [--steps 40]

Prefills one cache per context, then alternates single-token greedy steps between them, so a change in
the machine's load hits both alike; prints the median and minimum step time per context (first 5 skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .bench import ARMS, build


@torch.no_grad()
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", default="mixer", choices=ARMS)
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 16384])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.arm, max(args.contexts) + args.steps + 1).eval()
    state = {}
    for context in args.contexts:
        out = model(input_ids=torch.randint(0, 65, (1, context)), use_cache=True)
        state[context] = [out.cache, out.logits[:, -1:].argmax(-1)]
    times = {c: [] for c in args.contexts}
    for _ in range(args.steps):
        for context in args.contexts:
            cache, token = state[context]
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True)
            times[context].append(time.perf_counter() - start)
            state[context][1] = out.logits[:, -1:].argmax(-1)
    result = {str(c): {"median_ms": round(statistics.median(t[5:]) * 1e3, 2), "min_ms": round(min(t) * 1e3, 2)}
              for c, t in times.items()}
    print(json.dumps({"arm": args.arm, **result}))
    return result


if __name__ == "__main__":
    main()
