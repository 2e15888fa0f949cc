"""Batched rebuilds: the merged weights of a training forward, built for all same-shape layers at once.

A spectral weight does not depend on the input, so the weights of every layer of a group of same-shape layers
(all q_proj together, ...) can be rebuilt as a few batched transforms, ``coefficient_space.group_to_matrix``
over an L x m x n tensor, instead of a few small operations per layer. Before a training forward a hook on the
model groups the layers that may need a weight; the group, which holds its members and the weights it built,
is built when its first member's forward takes a path that reads the weight (``dense`` or ``sampled``), for
every member that has not run yet. The members take the same path (same shape, same tokens, so the same
choice), so a member of a group whose first layer takes the ``spectral`` or ``factored`` path costs nothing:
deciding at that moment, not from the last forward's paths, keeps a step at a new sequence length from
rebuilding weights it will not read. A layer asks its group once per forward (:func:`take`) and gets its
weight if nothing it was built from changed; otherwise it rebuilds its own, as without this. The numbers are
those of the per-layer rebuild.

Where it does not run: in evaluation (the weight cache) and after a merge (no rebuild at all); under
gradient checkpointing (the recomputation needs the weights later, one block at a time, and holding them
all would undo what checkpointing saves); under ``torch.compile``; for sharded parameters (FSDP2, ZeRO-3),
which are whole only inside their layer's forward; for layers forced to a path that never builds the weight.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from . import dropout
from .coefficient_space import group_key, group_to_matrix
from .compute.functions import transform_dtype

try:  # FSDP2 (fully_shard) holds parameters as DTensors
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch without torch.distributed.tensor
    _DTensor = None

__all__ = ["install", "plan", "prebuild", "take", "BATCH_ELEMENTS"]

BATCH_ELEMENTS = 1 << 24  # numbers in one batched L x m x n rebuild (64 MiB in float32)

# the group each spectral layer waits on until its forward runs (weak keys: a dropped model takes its entries along)
_waiting: "weakref.WeakKeyDictionary[nn.Module, Group]" = weakref.WeakKeyDictionary()


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
        layers = [m for m in module.modules() if hasattr(m, "spectral_coefficients")]
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


def _is_sharded(tensor) -> bool:
    """An FSDP2 DTensor or a DeepSpeed ZeRO-3 parameter (``ds_id``): whole only inside its module's forward, where
    the wrapper's own hooks gather it."""
    return (_DTensor is not None and isinstance(tensor, _DTensor)) or hasattr(tensor, "ds_id")


def _versions(layer, adapter: str) -> tuple:
    base = layer.get_base_layer().weight
    return layer.spectral_coefficients[adapter]._version, None if base is None else base._version


def _request(layer) -> Optional[tuple]:
    """(adapter, space, coefficients, base weight or None, scaling, compute dtype) if the layer's next training
    forward may rebuild a merged weight (``auto``, ``dense`` or ``sampled``: the path is chosen in the forward),
    else None."""
    if not getattr(layer, "batched_rebuilds", False) or dropout.applies(layer):  # another kind of layer, or an
        return None  # update computed on its own input (dropout.py): no merged weight to build ahead
    if layer.disable_adapters or layer.merged or layer.quantization_backend is not None or not layer.training:
        return None
    active = [a for a in layer.active_adapters if a in layer.spectral_coefficients]
    if layer.compute_path not in ("auto", "dense", "sampled") or len(active) != 1:
        return None
    adapter = active[0]
    values, settings = layer.spectral_coefficients[adapter], layer.spectral_settings[adapter]
    weight = layer.get_base_layer().weight
    space = layer.coefficient_space(adapter)
    # sharded (FSDP2 DTensors, ZeRO-3 partitions) or released tensors are whole only inside the layer's forward
    if not values.requires_grad or values.numel() != space.k or _is_sharded(values):
        return None
    delta = settings.mode == "delta"
    if delta and (weight is None or weight.numel() != space.m * space.n or _is_sharded(weight)):
        return None
    device_type = values.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else layer.model_dtype()
    base = (weight.T if layer.fan_in_fan_out else weight) if delta else None
    return adapter, space, values, base, settings.scaling if delta else 1.0, dtype


class Group:
    """Same-shape layers of one forward whose merged weights one batched rebuild can make. It holds its members
    until their forwards ask for their weight (:func:`take`); the first member that needs one calls
    :meth:`build`, which builds the weights of the members still waiting."""

    def __init__(self, key: tuple, members: list):
        self.key, self.members = key, members  # members: (layer, adapter, space, values, base)
        self.built: dict = {}  # layer -> (adapter, weight, versions it was built from)
        for member in members:
            _waiting[member[0]] = self

    def waiting(self) -> list:
        return [m for m in self.members if _waiting.get(m[0]) is self and m[0] not in self.built]

    def build(self) -> list:
        """Build the weights of the waiting members; returns their layers."""
        members = self.waiting()
        method, delta, scaling, dtype, compute = self.key[0][-1], not self.key[1], self.key[2], self.key[3], self.key[5]
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
                    self.built[layer] = (adapter, weight, _versions(layer, adapter))
        return [m[0] for m in members]

    def release(self) -> None:
        for layer, *_ in self.members:
            if _waiting.get(layer) is self:
                del _waiting[layer]
        self.built.clear()


def take(layer, adapter: str, dtype: torch.dtype, device: torch.device, needs_weight: bool) -> Optional[torch.Tensor]:
    """What a layer's training forward asks of its group, once: the weight built ahead for it (building the
    group's now if this is the first member to need one), or None: no group, a path that reads no weight
    (``needs_weight`` False), or something the weight was built from has changed since. The layer leaves its
    group either way."""
    group = _waiting.get(layer)
    if group is None:
        return None
    if needs_weight and layer not in group.built:
        group.build()  # the first of its group to need a weight: all of theirs at once
    del _waiting[layer]
    built = group.built.pop(layer, None)
    if not needs_weight or built is None or built[0] != adapter:
        return None
    _, weight, versions = built
    if versions != _versions(layer, adapter) or weight.dtype != dtype or weight.device != device:
        return None
    return weight


def plan(layers) -> list[Group]:
    """Group ``layers`` (spectral layers) that may rebuild a merged weight in the next training forward by shape,
    layout, dtype and device; groups of one are left out (alone, the layer's own rebuild is the same work)."""
    found: dict[tuple, list] = {}
    for layer in layers:
        request = _request(layer)
        if request is None:
            continue
        adapter, space, values, base, scaling, dtype = request
        method = space.weight_method(values.device)
        key = (group_key(space, method), base is None, scaling, dtype, values.device, transform_dtype(values.dtype))
        found.setdefault(key, []).append((layer, adapter, space, values, base))
    return [Group(key, members) for key, members in found.items() if len(members) > 1]


def prebuild(layers) -> list:
    """Build now the merged weights of ``layers`` that may need one, group by group; returns the layers that got
    one (each takes it in its next forward; :meth:`Group.release` drops what is left unused)."""
    return [layer for group in plan(layers) for layer in group.build()]
