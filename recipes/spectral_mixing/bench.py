"""Speed and memory against sequence length: attention (PyTorch SDPA) vs the spectral mixer, batch 1.

    python -m recipes.spectral_mixing.bench [--lengths 256 512 ... 16384] [--contexts 1024 4096 16384]
        [--threads 1] [--out recipes/spectral_mixing/results/bench]

The model is the quick profile's (a 4-layer GPT-2, 128 wide, 4 heads, 65 characters; the mixer with K matched
to the attention's parameters), untrained, fp32, on the CPU. Each arm's fwd+bwd runs in its own process,
shortest length first, so the process's peak resident memory after length T is T's:

- fwd+bwd: ``model(ids, labels=ids).loss.backward()`` at length T; tokens/s = T / median time (1 warm-up at 256,
  then 3 repeats up to 2,048, 2 up to 4,096, 1 above); peak memory = the process's peak RSS minus its RSS
  after building the model and the warm-up;
- decoding: prefill a context of C tokens with the cache, then 32 greedy single-token steps; tokens/s over them.

Writes ``bench.json`` (every time, the machine, the load average) and ``bench.png`` (log-log), and prints the
tables, the log-log slopes from 1,024 to 16,384 and the length where the mixer overtakes attention.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ARMS = ("attention", "mixer")
DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
DEFAULT_CONTEXTS = [256, 1024, 4096, 16384]
DECODE_STEPS = 32


def build(arm: str, positions: int):
    from transformers import AutoModelForCausalLM, GPT2Config

    from hf_spectral.mixing import replace_attention

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=65, n_positions=positions, n_embd=128, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return replace_attention(model) if arm == "mixer" else model


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_train(arm: str, lengths: list[int]) -> dict:
    """fwd+bwd at each length, shortest first, in this process: the process's peak RSS only grows, so
    after length T it is T's peak (memory grows with T), measured above the RSS after the warm-up."""
    model = build(arm, max(max(lengths), 256)).train()
    warm = torch.randint(0, 65, (1, 256))
    model(input_ids=warm, labels=warm).loss.backward()
    model.zero_grad(set_to_none=True)
    baseline = rss_mib()
    results = {}
    for length in sorted(lengths):
        repeats = 3 if length <= 2048 else 2 if length <= 4096 else 1
        ids = torch.randint(0, 65, (1, length))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        results[str(length)] = {"seconds": times, "peak_mib": round(peak - baseline, 1), "load_average": os.getloadavg()[0]}
        print(f"fwd+bwd {arm} T={length}: {results[str(length)]}", file=sys.stderr, flush=True)
    return results


@torch.no_grad()
def child_decode(arm: str, contexts: list[int]) -> dict:
    model = build(arm, max(contexts) + DECODE_STEPS + 1).eval()
    results = {}
    for context in sorted(contexts):
        ids = torch.randint(0, 65, (1, context))
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - start
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        model(input_ids=token, cache=cache, use_cache=True)  # one warm-up step
        times = []
        for _ in range(DECODE_STEPS):
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
        results[str(context)] = {"prefill_seconds": prefill, "step_seconds": times, "load_average": os.getloadavg()[0]}
        print(f"decode {arm} context={context}: median step {statistics.median(times) * 1e3:.2f} ms",
              file=sys.stderr, flush=True)
    return results


def run_child(kind: str, arm: str, sizes: list[int], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "recipes.spectral_mixing.bench", "--child", kind, "--arm", arm,
               "--sizes", *map(str, sizes), "--threads", str(threads)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); its messages are above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def crossover(lengths, attention, mixer) -> float | None:
    """The length (log-interpolated) from which the mixer's fwd+bwd time is below attention's."""
    for i, length in enumerate(lengths):
        if mixer[i] < attention[i]:
            if i == 0:
                return float(length)
            d0 = math.log(attention[i - 1] / mixer[i - 1])
            d1 = math.log(attention[i] / mixer[i])
            share = d0 / (d0 - d1)
            return math.exp(math.log(lengths[i - 1]) + share * (math.log(length) - math.log(lengths[i - 1])))
    return None


def summarise(results: dict) -> dict:
    lengths = results["lengths"]
    summary = {}
    medians = {arm: [statistics.median(results["train"][arm][str(t)]["seconds"]) for t in lengths] for arm in ARMS}
    fit = [i for i, t in enumerate(lengths) if 1024 <= t <= 16384]
    if len(fit) < 2:
        fit = list(range(len(lengths)))  # a short run: fit over what was measured
    for arm in ARMS:
        peaks = [max(results["train"][arm][str(t)]["peak_mib"], 1e-3) for t in lengths]
        summary[arm] = {
            "time_slope_1k_16k": round(slope([lengths[i] for i in fit], [medians[arm][i] for i in fit]), 3),
            "memory_slope_1k_16k": round(slope([lengths[i] for i in fit], [peaks[i] for i in fit]), 3),
        }
        contexts = results["contexts"]
        per_token = [statistics.median(results["decode"][arm][str(c)]["step_seconds"]) for c in contexts]
        summary[arm]["decode_ratio_16k_over_1k"] = (
            round(per_token[contexts.index(16384)] / per_token[contexts.index(1024)], 3)
            if 1024 in contexts and 16384 in contexts else None
        )
    cross = crossover(lengths, medians["attention"], medians["mixer"])
    summary["crossover_length"] = None if cross is None else round(cross)
    return summary


def tables(results: dict) -> str:
    lengths, contexts = results["lengths"], results["contexts"]
    lines = ["| T | attention tokens/s | mixer tokens/s | mixer / attention time | attention peak MiB | mixer peak MiB |",
             "|---|---|---|---|---|---|"]
    for t in lengths:
        a, m = (results["train"][arm][str(t)] for arm in ARMS)
        ta, tm = statistics.median(a["seconds"]), statistics.median(m["seconds"])
        lines.append(f"| {t:,} | {t / ta:,.0f} | {t / tm:,.0f} | {tm / ta:.2f} | {a['peak_mib']:,.0f} | {m['peak_mib']:,.0f} |")
    lines += ["", "| context | attention decode tokens/s | mixer decode tokens/s |", "|---|---|---|"]
    for c in contexts:
        a, m = (statistics.median(results["decode"][arm][str(c)]["step_seconds"]) for arm in ARMS)
        lines.append(f"| {c:,} | {1 / a:,.0f} | {1 / m:,.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, contexts = results["lengths"], results["contexts"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for arm, style in zip(ARMS, ("o-", "s-"), strict=True):
        train = results["train"][arm]
        axes[0].plot(lengths, [t / statistics.median(train[str(t)]["seconds"]) for t in lengths], style, label=arm)
        axes[1].plot(lengths, [max(train[str(t)]["peak_mib"], 1e-1) for t in lengths], style, label=arm)
        decode = results["decode"][arm]
        axes[2].plot(contexts, [1 / statistics.median(decode[str(c)]["step_seconds"]) for c in contexts], style, label=arm)
    titles = ("fwd+bwd tokens/s (batch 1)", "peak memory above the model (MiB)", "decoding tokens/s")
    for ax, title, xlabel in zip(axes, titles, ("sequence length T", "sequence length T", "context length"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"4-layer d=128 GPT-2: attention (SDPA) vs spectral mixer; {results['machine']['description']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=DEFAULT_LENGTHS)
    parser.add_argument("--contexts", type=int, nargs="*", default=DEFAULT_CONTEXTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement (1 on a shared CPU)")
    parser.add_argument("--out", default="recipes/spectral_mixing/results/bench")
    parser.add_argument("--child", choices=("train", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        result = child_train(args.arm, args.sizes) if args.child == "train" else child_decode(args.arm, args.sizes)
        print(json.dumps(result))
        return None
    start = time.perf_counter()
    results = {
        "lengths": args.lengths, "contexts": args.contexts, "train": {arm: {} for arm in ARMS},
        "decode": {arm: {} for arm in ARMS},
        "machine": {"description": f"{os.cpu_count()}-core {platform.machine()} CPU, {args.threads} thread(s), fp32",
                    "torch": torch.__version__, "load_average_before": os.getloadavg()},
    }
    for arm in ARMS:
        results["train"][arm] = run_child("train", arm, args.lengths, args.threads)
    for arm in ARMS:
        results["decode"][arm] = run_child("decode", arm, args.contexts, args.threads)
    results["machine"]["load_average_after"] = os.getloadavg()
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["summary"] = summarise(results) if len(args.lengths) > 1 else {}
    results["command"] = "python -m recipes.spectral_mixing.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "bench.png")
    print(tables(results))
    print(json.dumps(results["summary"], indent=1))
    print(f"wall time {results['wall_seconds']} s")
    return results


if __name__ == "__main__":
    main()
