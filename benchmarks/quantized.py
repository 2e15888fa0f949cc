"""A 4-bit (nf4) base with a spectral delta against the same base with LoRA r = 8: step time and peak memory.

    python -m benchmarks.quantized                      # SmolLM2-135M's shapes, 256 tokens, 1 thread
    python -m benchmarks.quantized --tokens 512 --threads 2 --repeats 7 --json runs/quantized.json

The model is SmolLM2-135M's architecture built from a LlamaConfig (hidden 576, intermediate 1536, 30
layers, 9 heads, 3 KV heads, vocabulary 49152, tied embeddings) with random weights, saved once and loaded
with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` (bitsandbytes runs 4-bit layers on
CPU). Both arms adapt all 7 projections of every block (q, k, v, o, gate, up, down): spectral delta with
K = 1000 coefficients per layer (``layout="random"``, compute path ``auto``) and PEFT LoRA r = 8
(alpha 16). One training step is forward + backward + ``torch.optim.AdamW`` step on one sequence; the
evaluation step is a forward under ``torch.no_grad`` (no weight cache on a quantized base). Medians with
min-max over ``--repeats`` steps after two warm-up steps, as CPU time of the process (``time.process_time``:
with one thread, steady on a shared machine where wall time follows the other jobs) and as wall time.

Each arm runs in its own process, so its peak memory is its own: ``peak RSS`` is the process's resident
high-water mark (``VmHWM``) over the training steps, reset after loading (``/proc/self/clear_refs``), and
``training extra`` is that peak minus the resident memory of the loaded, adapted model before the first step
(activations, gradients, optimiser state, transform buffers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from recipes.common.machine import cpu_name

SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_theta=100000.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def run_arm(arm: str, path: str, tokens: int, repeats: int, threads: int) -> dict:
    """One arm, in this process: load 4-bit, adapt, time training and evaluation steps."""
    import torch
    from hf_spectral.model import spectral_layers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import hf_spectral  # noqa: F401  (registers the method)
    from hf_spectral import SpectralConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
    if arm == "spectral":
        config = SpectralConfig(mode="delta", n_coefficients=1000, layout="random", target_modules=PROJECTIONS)
    else:
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))

    def train_step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model.train()
    rss_loaded = _status_kib("VmRSS")
    peak_reset = _reset_peak()
    times, cpu_times, losses = [], [], []
    for i in range(2 + repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(train_step())
        if i >= 2:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = _status_kib("VmHWM")
    paths = sorted({layer.last_compute_path for _, layer in spectral_layers(model)}) if arm == "spectral" else []

    model.eval()
    eval_times, eval_cpu_times = [], []
    with torch.no_grad():
        for i in range(1 + repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            model(ids)
            if i >= 1:
                eval_times.append(time.perf_counter() - start)
                eval_cpu_times.append(time.process_time() - cpu_start)
    return {
        "arm": arm, "trainable": trainable, "tokens": tokens, "threads": threads, "repeats": repeats,
        "train_s": times, "train_cpu_s": cpu_times, "eval_s": eval_times, "eval_cpu_s": eval_cpu_times,
        "losses": losses, "paths": paths,
        "rss_loaded_mib": rss_loaded / 1024, "peak_rss_mib": peak / 1024, "peak_was_reset": peak_reset,
    }


def _median(values):
    return statistics.median(values), min(values), max(values)


def table(results: list[dict]) -> str:
    lora = next((r for r in results if r["arm"] == "lora"), None)
    rows = [
        "| arm | trainable | train step CPU s, median [min-max] | vs LoRA | train step wall s | eval forward CPU s "
        "| eval wall s | peak RSS (MiB) | training extra (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        med, lo, hi = _median(r["train_cpu_s"])
        emed, elo, ehi = _median(r["eval_cpu_s"])
        ratio = f"{med / statistics.median(lora['train_cpu_s']):.2f}x" if lora else ""
        name = "spectral delta K=1000" if r["arm"] == "spectral" else "LoRA r=8"
        rows.append(
            f"| {name} | {r['trainable']:,} | {med:.2f} [{lo:.2f}-{hi:.2f}] | {ratio} | {statistics.median(r['train_s']):.2f} "
            f"| {emed:.2f} [{elo:.2f}-{ehi:.2f}] | {statistics.median(r['eval_s']):.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['peak_rss_mib'] - r['rss_loaded_mib']:.0f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="one sequence of this many tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per arm (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--arms", default="spectral,lora", help="comma-separated: spectral, lora")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.arm:
        print(json.dumps(run_arm(args.arm, args.model, args.tokens, args.repeats, args.threads)))
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(tmp)
        results = []
        for arm in args.arms.split(","):
            command = [
                sys.executable, "-m", "benchmarks.quantized", "--arm", arm, "--model", tmp, "--tokens", str(args.tokens),
                "--repeats", str(args.repeats), "--threads", str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if done.returncode != 0:
                sys.exit(f"arm {arm} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    import bitsandbytes
    import peft
    import transformers

    cpu = cpu_name()
    print(
        f"SmolLM2-135M shapes, random weights, bitsandbytes {bitsandbytes.__version__} nf4 base (compute float32), "
        f"{args.tokens} tokens, forward+backward+AdamW; {cpu}, {args.threads} thread(s) of {os.cpu_count()}; torch "
        f"{torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}; load average "
        f"{os.getloadavg()[0]:.1f}; {len(results[0]['train_s'])} timed steps per arm"
    )
    print(table(results))
    for r in results:
        if r["paths"]:
            print(f"spectral compute paths chosen (auto): {', '.join(r['paths'])}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
