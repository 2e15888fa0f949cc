"""Batched rebuilds: the merged weights of a training forward, built for all same-shape layers at once.

A spectral weight does not depend on the input, so before a training forward the model can rebuild the
weights of every layer that will need one (the ``dense`` and ``sampled`` paths, as their last forward
took) as a few batched transforms per group of same-shape layers (all q_proj together, ...) instead of a
few small operations per layer: ``coefficient_space.group_to_matrix`` over an L x m x n tensor. Each layer
takes its weight once, in that forward, if nothing it was built from changed; otherwise it rebuilds its
own, as without this. The numbers are those of the per-layer rebuild.

Where it does not run: in evaluation (the weight cache) and after a merge (no rebuild at all); under
gradient checkpointing (the recomputation needs the weights later, one block at a time, and holding them
all would undo what checkpointing saves); under ``torch.compile``; for sharded parameters (FSDP2, ZeRO-3),
which are whole only inside their layer's forward; for layers that never build the weight (the
``factored`` and ``spectral`` paths).
"""

from __future__ import annotations

import torch
from torch import nn

from .coefficient_space import group_key, group_to_matrix
from .compute.functions import transform_dtype

__all__ = ["install", "prebuild", "BATCH_ELEMENTS"]

BATCH_ELEMENTS = 1 << 24  # numbers in one batched L x m x n rebuild (64 MiB in float32)


def install(model: nn.Module) -> tuple:
    """Hooks on ``model`` (the model the tuner wraps: every PEFT forward goes through its ``__call__``) that
    build ahead before a training forward and drop what is left unused after it, even if it fails. Returns
    the hook handles (removed when the adapters are unloaded). The hooks are plain functions of the module
    they run on, so a deep copy or a pickle of the model carries working hooks."""
    return model.register_forward_pre_hook(_before_forward), model.register_forward_hook(_after_forward, always_call=True)


def _before_forward(module: nn.Module, args) -> None:
    first = next(module.parameters(), None)
    if first is not None and hasattr(first, "ds_id"):  # DeepSpeed ZeRO-3 gathers parameters module by module
        return
    if module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling() and not _checkpointing(module):
        layers = [m for m in module.modules() if hasattr(m, "prebuild_request")]
        module.__dict__["_spectral_prebuilt"] = prebuild(layers)


def _after_forward(module: nn.Module, args, output) -> None:
    for layer in module.__dict__.pop("_spectral_prebuilt", ()):  # a layer that did not run (or took another
        layer.drop_prebuilt()  # path) holds no weight past the forward


def _checkpointing(model: nn.Module) -> bool:
    """Gradient checkpointing on, by transformers' flag (``is_activation_checkpointing`` since 5.x, the old name
    before; read from the class first, so that the deprecated name is not touched when the new one exists)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def prebuild(layers) -> list:
    """Build ahead the merged weights of ``layers`` (spectral layers) that will need one; returns the layers
    that got one (the caller drops what is left unused after the forward)."""
    groups: dict[tuple, list] = {}
    for layer in layers:
        request = layer.prebuild_request()
        if request is None:
            continue
        adapter, space, values, base, scaling, dtype = request
        method = space.weight_method(values.device)
        key = (group_key(space, method), base is None, scaling, dtype, values.device, transform_dtype(values.dtype))
        groups.setdefault(key, []).append((layer, adapter, space, values, base))
    built = []
    with torch.no_grad():
        for key, members in groups.items():
            if len(members) < 2:  # alone, the layer's own rebuild is the same work
                continue
            method, delta, scaling, dtype, compute = key[0][-1], not key[1], key[2], key[3], key[5]
            per_chunk = max(1, BATCH_ELEMENTS // (members[0][2].m * members[0][2].n))
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                weights = group_to_matrix([m[2] for m in chunk], [m[3].detach().to(compute) for m in chunk], method)
                if scaling != 1.0:
                    weights.mul_(scaling)
                if delta:
                    torch._foreach_add_(list(weights.unbind(0)), [m[4] for m in chunk])
                weights = weights.to(dtype)
                for (layer, adapter, *_), weight in zip(chunk, weights.unbind(0)):
                    layer.set_prebuilt(adapter, weight)
                    built.append(layer)
    return built
