"""Measurements of trained weights that every recipe reports the same way."""

from __future__ import annotations

import torch


def stable_rank(weight: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2: a smooth count of the directions a matrix uses (1 .. rank; 0 for W = 0).

    From the smaller Gram matrix G: its trace is ||W||_F^2 and its top eigenvalue ||W||_2^2, cheaper than an SVD
    of W. G is formed in float32 (float64 weights stay float64), its eigenvalues taken in float64: about 1e-7
    relative error, far below what a stable rank is read to."""
    w = weight.detach()
    w = w.double() if w.dtype == torch.float64 else w.float()
    gram = (w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T).double()
    top = float(torch.linalg.eigvalsh(gram)[-1])
    return float(torch.trace(gram)) / top if top > 0 else 0.0


def parameter_counts(model: torch.nn.Module, head_names: tuple[str, ...] = ()) -> dict:
    """Trainable parameters, split into the task head and the rest (the adapter, or the body), and the total.

    ``head_names``: substrings of parameter names that belong to the head (``"classifier"``), counted apart so
    that methods are compared on what they add, not on the head every arm trains alike."""
    trainable = head = total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if not param.requires_grad:
            continue
        trainable += param.numel()
        if any(h in name for h in head_names):
            head += param.numel()
    return {"trainable": trainable, "trainable_head": head, "trainable_adapter": trainable - head, "total": total}
