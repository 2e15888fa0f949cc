"""Batched rebuilds: the merged weights of a training forward, built for all same-shape layers at once.

A spectral weight does not depend on the input, so the weights of every layer of a group of same-shape layers
(all q_proj together, ...) can be rebuilt as a few batched transforms, ``coefficient_space.group_to_matrix``
over an L x m x n tensor, instead of a few small operations per layer. Before a training forward a hook on the
model groups the layers that may need a weight; the group is built when its first member's forward takes a
path that reads the weight (``dense`` or ``sampled``), for every member that has not run yet. The members
take the same path (same shape, same tokens, so the same measured choice), so a member of a group whose first
layer takes the ``spectral`` or ``factored`` path costs nothing: deciding at that moment, not from the last
forward's paths, keeps a step at a new sequence length from rebuilding weights it will not read. Each layer
takes its weight once, in that forward, if nothing it was built from changed; otherwise it rebuilds its own,
as without this. The numbers are those of the per-layer rebuild.

Where it does not run: in evaluation (the weight cache) and after a merge (no rebuild at all); under
gradient checkpointing (the recomputation needs the weights later, one block at a time, and holding them
all would undo what checkpointing saves); under ``torch.compile``; for sharded parameters (FSDP2, ZeRO-3),
which are whole only inside their layer's forward; for layers forced to a path that never builds the weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .coefficient_space import group_key, group_to_matrix
from .compute.functions import transform_dtype

__all__ = ["install", "plan", "prebuild", "BATCH_ELEMENTS"]

BATCH_ELEMENTS = 1 << 24  # numbers in one batched L x m x n rebuild (64 MiB in float32)


def install(model: nn.Module) -> tuple:
    """Hooks on ``model`` (the model the tuner wraps: every PEFT forward goes through its ``__call__``) that
    group the layers before a training forward and drop what is left unused after it, even if it fails. Returns
    the hook handles (removed when the adapters are unloaded). The hooks are plain functions of the module
    they run on, so a deep copy or a pickle of the model carries working hooks."""
    return model.register_forward_pre_hook(_before_forward), model.register_forward_hook(_after_forward, always_call=True)


def _before_forward(module: nn.Module, args) -> None:
    first = next(module.parameters(), None)
    if first is not None and hasattr(first, "ds_id"):  # DeepSpeed ZeRO-3 gathers parameters module by module
        return
    if module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling() and not _checkpointing(module):
        layers = [m for m in module.modules() if hasattr(m, "prebuild_request")]
        module.__dict__["_spectral_groups"] = plan(layers)


def _after_forward(module: nn.Module, args, output) -> None:
    for group in module.__dict__.pop("_spectral_groups", ()):
        group.release()  # a layer that did not run (or took another path) holds no weight past the forward


def _checkpointing(model: nn.Module) -> bool:
    """Gradient checkpointing on, by transformers' flag (``is_activation_checkpointing`` since 5.x, the old name
    before; read from the class first, so that the deprecated name is not touched when the new one exists)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class Group:
    """Same-shape layers of one forward whose merged weights one batched rebuild can make. Each member holds the
    group (``layer.rebuild_group``) until its forward runs; the first member that needs its weight calls
    :meth:`build`, which builds the weights of the members still waiting."""

    def __init__(self, key: tuple, members: list):
        self.key, self.members = key, members  # members: (layer, adapter, space, values, base)
        for member in members:
            member[0].rebuild_group = self

    def waiting(self) -> list:
        return [m for m in self.members if m[0].rebuild_group is self]

    def build(self) -> list:
        """Build the weights of the waiting members; returns their layers."""
        members = self.waiting()
        method, delta, scaling, dtype, compute = self.key[0][-1], not self.key[1], self.key[2], self.key[3], self.key[5]
        built = []
        with torch.no_grad():
            per_chunk = max(1, BATCH_ELEMENTS // (members[0][2].m * members[0][2].n)) if members else 1
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                weights = group_to_matrix([m[2] for m in chunk], [m[3].detach().to(compute) for m in chunk], method)
                if scaling != 1.0:
                    weights.mul_(scaling)
                if delta:
                    torch._foreach_add_(list(weights.unbind(0)), [m[4] for m in chunk])
                weights = weights.to(dtype)
                for (layer, adapter, *_), weight in zip(chunk, weights.unbind(0), strict=True):
                    layer.set_prebuilt(adapter, weight)
                    layer.rebuild_group = None
                    built.append(layer)
        return built

    def release(self) -> None:
        for layer, *_ in self.members:
            if layer.rebuild_group is self:
                layer.rebuild_group = None
            layer.drop_prebuilt()


def plan(layers) -> list[Group]:
    """Group ``layers`` (spectral layers) that may rebuild a merged weight in the next training forward by shape,
    layout, dtype and device; groups of one are left out (alone, the layer's own rebuild is the same work)."""
    found: dict[tuple, list] = {}
    for layer in layers:
        request = layer.prebuild_request()
        if request is None:
            continue
        adapter, space, values, base, scaling, dtype = request
        method = space.weight_method(values.device)
        key = (group_key(space, method), base is None, scaling, dtype, values.device, transform_dtype(values.dtype))
        found.setdefault(key, []).append((layer, adapter, space, values, base))
    return [Group(key, members) for key, members in found.items() if len(members) > 1]


def prebuild(layers) -> list:
    """Build now the merged weights of ``layers`` that may need one, group by group; returns the layers that got
    one (the caller drops what is left unused: ``layer.drop_prebuilt()``)."""
    return [layer for group in plan(layers) for layer in group.build()]
