"""The evaluation-time weight cache of a spectral layer: when may the rebuilt weight be reused?"""

from __future__ import annotations

import torch


class WeightCache:
    """The rebuilt weight of a layer's active adapters, with what it was built from.

    Valid while the active adapters, the dtype and device, inference mode, and every tensor it was built
    from are unchanged: a tensor changed in place bumps its ``_version``, a tensor replaced (``p.data = ...``)
    has another ``data_ptr``. A state-dict load drops it (see ``_load_from_state_dict``). Edits through
    ``p.data`` in place, and under FSDP2 writes into the shards other than a state-dict load, are invisible
    to both: call ``drop_weight_cache()`` after those.
    """

    __slots__ = ("active", "dtype", "device", "inference", "states", "weight", "base")

    def __init__(self, layer, dtype, device, watched, weight, active=None):
        # ``active``: what the weight is for, the layer's active adapters by default (a mixed batch caches one
        # weight per adapter)
        active = layer._active_adapter if active is None else active
        self.active = list(active) if isinstance(active, list) else active
        self.dtype, self.device, self.weight = dtype, device, weight
        self.inference = torch.is_inference_mode_enabled()
        self.states = [(t, t._version, t.data_ptr()) for t in watched]
        self.base = layer.get_base_layer()

    def valid(self, layer, dtype, device, active=None) -> bool:
        active = layer._active_adapter if active is None else active
        if active != self.active or dtype != self.dtype or device != self.device:
            return False
        if torch.is_inference_mode_enabled() != self.inference:
            return False
        return all(t._version == version and t.data_ptr() == ptr for t, version, ptr in self.states)

    def needs_grad(self) -> bool:
        return any(t.requires_grad for t, _, _ in self.states)
