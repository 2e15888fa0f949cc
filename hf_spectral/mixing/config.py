"""What can be set on a spectral token mixer, and what values are allowed.

The defaults train well on the char-Shakespeare recipe; the auxiliary objectives are off (weight 0).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ACTIVATIONS = ("silu", "sigmoid", "identity")


@dataclass
class SpectralMixingConfig:
    """Knobs of the spectral token mixer that ``replace_attention`` puts in place of self-attention.

    Each layer keeps a dictionary of ``n_atoms`` damped complex exponentials over positions,
    ``phi_k(tau) = exp(-lambda_k tau) * exp(i (omega_k tau + theta_k))``, and mixes with per-token
    coefficients computed from each token's hidden state (``docs/mixing.md`` has the maths).
    """

    n_atoms: int | None = field(
        default=None,
        metadata={"help": "K, atoms per layer. None: the K whose mixer has the parameter count of the attention it replaces "
                  "(4 d K weights and 3 K (+ 3 K + d biases) against 4 d^2 (+ 4 d): K = d - 1 for GPT-2 and for a "
                  "Llama without grouped key/value heads, fewer with them). The recurrent state per layer is K "
                  "complex numbers."},
    )
    min_half_life: float = field(
        default=1.0,
        metadata={"help": "Shortest initial memory, in tokens (an atom's amplitude halves after this many positions)."},
    )
    max_half_life: float = field(
        default=1024.0,
        metadata={"help": "Longest initial memory, in tokens. Half-lives start log-uniform in [min, max]; "
                  "about the context length is a good value. Decays stay learnable."},
    )
    max_frequency: float = field(
        default=math.pi,
        metadata={"help": "Initial frequencies omega_k are drawn uniformly in [0, max_frequency] radians per token "
                  "(pi is the Nyquist limit of a sequence of tokens)."},
    )
    gate: str = field(
        default="silu",
        metadata={"help": "Activation of the per-token read coefficients c_t: silu (a gate, default), sigmoid or identity."},
    )
    bias: bool | None = field(
        default=None,
        metadata={"help": "Biases on the mixer's linear maps. None: as the replaced attention had them "
                  "(GPT-2 yes, Llama as config.attention_bias)."},
    )
    reconstruction_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the time-domain reconstruction term (0: off): the layer's input sequence rebuilt "
                  "through the dictionary's atoms and the coefficients the mixer uses (its output), relative squared "
                  "error over real tokens. 0.1 is a mild pull."},
    )
    stft_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the STFT-magnitude matching term over time on the same reconstruction, padding "
                  "masked (0: off)."},
    )
    stft_window: int = field(
        default=32,
        metadata={"help": "STFT window length in tokens (hop = window / 4); shorter sequences use their own length."},
    )
    prior_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the Gaussian-mixture prior (negative log-likelihood per coordinate) on the "
                  "per-token read coefficients the reconstruction uses (0: off; the mixture's parameters exist "
                  "only when it is on)."},
    )
    prior_components: int = field(
        default=8,
        metadata={"help": "Components of the Gaussian mixture (diagonal covariances), when prior_weight > 0."},
    )
    prior_min_scale: float = field(
        default=0.01,
        metadata={"help": "Floor on the mixture's standard deviations (scale = floor + exp(log_scale)): bounds the "
                  "prior's negative log-likelihood below by log(floor) + log(2 pi) / 2 per coordinate, so the "
                  "components cannot collapse onto points. About the spread expected of a mixing coefficient."},
    )

    def __post_init__(self):
        if self.n_atoms is not None and (
            isinstance(self.n_atoms, bool) or not isinstance(self.n_atoms, int) or self.n_atoms < 1
        ):
            raise ValueError(
                f"n_atoms={self.n_atoms!r} is not allowed: give a positive integer (atoms per layer, e.g. the hidden "
                "size), or None to match the parameter count of the attention it replaces."
            )
        for name in ("min_half_life", "max_half_life"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value!r} is not allowed: give a positive number of tokens, e.g. 1.0 or 1024.")
        if self.max_half_life < self.min_half_life:
            raise ValueError(
                f"max_half_life={self.max_half_life} is below min_half_life={self.min_half_life}: "
                "the range of initial memories must be [min, max] with min <= max."
            )
        if not (isinstance(self.max_frequency, (int, float)) and 0 < self.max_frequency <= math.pi):
            raise ValueError(
                f"max_frequency={self.max_frequency!r} is not allowed: give a value in (0, pi] radians per token "
                "(pi is the highest frequency a token sequence can carry)."
            )
        if self.gate not in ACTIVATIONS:
            raise ValueError(f"gate={self.gate!r} is not one of {ACTIVATIONS}: pick one (silu is the default).")
        if self.bias is not None and not isinstance(self.bias, bool):
            raise ValueError(f"bias={self.bias!r} is not allowed: give True, False or None (as the attention had).")
        for name in ("reconstruction_weight", "stft_weight", "prior_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value!r} is not allowed: give a weight >= 0 (0 turns the term off).")
        if isinstance(self.stft_window, bool) or not isinstance(self.stft_window, int) or self.stft_window < 2:
            raise ValueError(f"stft_window={self.stft_window!r} is not allowed: give an integer >= 2 (tokens), e.g. 32.")
        if isinstance(self.prior_min_scale, bool) or not isinstance(self.prior_min_scale, (int, float)) or not (
            self.prior_min_scale > 0 and math.isfinite(self.prior_min_scale)
        ):
            raise ValueError(
                f"prior_min_scale={self.prior_min_scale!r} is not allowed: give a positive floor on the prior's "
                "scales, e.g. 0.01 (without one the prior's likelihood is unbounded)."
            )
        if isinstance(self.prior_components, bool) or not isinstance(self.prior_components, int) or self.prior_components < 1:
            raise ValueError(
                f"prior_components={self.prior_components!r} is not allowed: give a positive integer, e.g. 8."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SpectralMixingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown spectral mixing settings {unknown}: the known ones are {sorted(known)}. "
                "The model was probably saved by a newer hf_spectral; upgrade it."
            )
        return cls(**values)
