"""Healing: a short fine-tune of a compressed model on the training split, at a fixed token budget.

Every parameter the compressed model stores trains (the spectral coefficients, SVD factors or kept weights, and the
embedding and norms, which stay dense in every method), so the storage does not change: pruned weights keep their
zeros (their gradient is masked and they are re-zeroed after each step). Batches draw windows at random from both
texts' training splits, half each. Optimisers: ``adamw`` (torch's AdamW) for every method, and for spectral models
``spectral_adamw`` (``hf_spectral.optim.create_optimizer``: Adam's moments kept in the weight basis).
Schedule: linear warm-up over the first 10% of the steps, then cosine down to 10% of the rate; gradients clipped at 1.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from hf_spectral.optim import create_optimizer

OPTIMIZERS = ("adamw", "spectral_adamw")


def training_batches(train: dict[str, torch.Tensor], steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of ``batch_size`` windows, the texts taking turns, drawn with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    names = sorted(train)
    batches = []
    for step in range(steps):
        rows = []
        for j in range(batch_size):
            blocks = train[names[(step * batch_size + j) % len(names)]]
            rows.append(blocks[int(torch.randint(blocks.shape[0], (1,), generator=generator))])
        batches.append(torch.stack(rows))
    return batches


def _masks(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight, m.prune_mask) for m in model.modules() if hasattr(m, "prune_mask")]


def heal(model: nn.Module, batches: list[torch.Tensor], lr: float, optimizer: str = "adamw") -> dict:
    """Train ``model`` on ``batches``; returns the losses and step times."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}.")
    masks = _masks(model)
    if not hasattr(model, "peft_config"):  # svd / prune: everything the model stores trains
        for p in model.parameters():
            p.requires_grad_(True)
    hooks = [weight.register_hook(lambda g, mask=mask: g * mask) for weight, mask in masks]
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "spectral_adamw":
        opt = create_optimizer(model, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps, warmup = len(batches), max(1, len(batches) // 10)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    model.train()
    losses, times = [], []
    try:
        for ids in batches:
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for weight, mask in masks:
                    weight.mul_(mask)
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - start)
    finally:
        for h in hooks:
            h.remove()
    model.eval()
    trainable = sum(p.numel() for p in params)
    return dict(losses=losses, step_seconds=times, trainable_parameters=trainable, optimizer=optimizer, lr=lr)
