"""The recurrent state a spectral mixer carries through ``generate``: K complex numbers per layer.

transformers' models build a ``DynamicCache`` (or take the one the user passes) and hand it to every
attention module; they also ask it for ``get_seq_length()`` to place the next positions. A mixer
swaps its own slot in that cache for a ``SpectralStateLayer``: it holds the state (batch, K), counts
the tokens seen, and follows beam search's reordering. Its size does not grow with the context, so
each new token costs the same whatever came before. Rolling a state back (``crop``, used by assisted
decoding) is impossible for a recurrence and raises.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache


class SpectralStateLayer(DynamicLayer):
    """One layer's slot in a transformers ``Cache``: the mixer's state and the number of tokens it has seen."""

    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_zeros(0)
        self.values = value_states.new_zeros(0)
        self.is_initialized = True

    def store(self, state: torch.Tensor, new_tokens: int) -> None:
        if not self.is_initialized:
            self.lazy_initialization(state.real, state.real)
        self.state = state
        self.length += new_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "this cache layer belongs to a spectral mixer (a recurrent state, no keys or values); an attention "
            "module cannot use it. Use a fresh cache for a model with attention."
        )

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.state = None
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            f"crop({tokens_to_remove}) on a spectral mixer's cache: a recurrent state cannot be rolled back. "
            "Assisted or speculative decoding needs attention layers; use plain greedy, sampling or beam search."
        )

    def offload(self):
        if self.state is not None:
            self.state = self.state.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.state is not None and self.state.device != self.device:
            self.state = self.state.to(self.device, non_blocking=True)


def state_slot(cache: Cache, layer_idx: int) -> SpectralStateLayer:
    """The mixer's slot in ``cache`` (made on first use); a slot that already holds attention keys is refused."""
    if isinstance(cache, EncoderDecoderCache):
        raise TypeError("a spectral mixer is a decoder-only self-attention replacement; it cannot use an EncoderDecoderCache")
    if not isinstance(cache, Cache) or not hasattr(cache, "layers"):
        raise TypeError(
            f"cache of type {type(cache).__name__} is not a transformers Cache: pass a DynamicCache() (or none: "
            "the model makes one), not a tuple of tensors"
        )
    while len(cache.layers) <= layer_idx:
        cache.layers.append(SpectralStateLayer())
    slot = cache.layers[layer_idx]
    if not isinstance(slot, SpectralStateLayer):
        if slot.get_seq_length() > 0:
            raise ValueError(
                f"cache layer {layer_idx} already holds {slot.get_seq_length()} tokens of attention keys and values; "
                "a spectral mixer needs its own state. Start generation with a fresh cache."
            )
        slot = SpectralStateLayer()
        cache.layers[layer_idx] = slot
    return slot
