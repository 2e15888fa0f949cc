"""What is compared: one function that turns an arm's settings into a PEFT config (or none, for full fine-tuning).

Every adapter targets the same layers (``target_modules`` of the profile) and trains the same head, so the arms
differ only in how a layer's update is parametrised:

| method      | update of an m x n layer                         | trainable per layer | its knob        |
|-------------|--------------------------------------------------|---------------------|-----------------|
| `spectral`  | scaling * IDCT2(S), K DCT coefficients           | K                   | n_coefficients  |
| `lora`      | (alpha / r) * B A                                | r (m + n)           | rank            |
| `fourierft` | scaling * Re(IFFT2(S)), K Fourier coefficients   | K                   | n_frequency     |
| `waveft`    | scaling * IDWT(S), K wavelet coefficients        | K                   | n_frequency     |
| `vera`      | diag(b) B diag(d) A, A and B frozen random       | r + m               | rank (r)        |
| `c3a`       | a block-circulant matrix of b x b blocks         | m n / b             | block_size (b)  |
| `full`      | every weight of the model                        | all                 | -               |

Spectral arms with ``layout: gradient`` choose their index sets from the loss gradient on calibration batches
before training (``hf_spectral.init_gradient_layout``; the run does it, see ``measures.calibrate``).

A "seed" of a run seeds everything random in it: data order, the head's init, and the random index sets of
spectral (``random``, ``banded``), FourierFT and WaveFT, so the spread over seeds includes the spread over index sets.
"""

from __future__ import annotations

from typing import Optional

from peft import C3AConfig, FourierFTConfig, LoraConfig, PeftConfig, VeraConfig, WaveFTConfig

import hf_spectral  # noqa: F401  (registers the method with PEFT)
from hf_spectral import SpectralConfig

METHODS = ("spectral", "lora", "fourierft", "waveft", "vera", "c3a", "full")

# Each method's own default scaling, used when an arm gives none (FourierFT's and WaveFT's are PEFT's defaults).
DEFAULT_SCALING = {"spectral": 10.0, "fourierft": 150.0, "waveft": 25.0}


def peft_config_for(
    method: str,
    *,
    task_type: str,
    target_modules,
    modules_to_save: Optional[list[str]],
    seed: int,
    layout: str = "random",
    n_coefficients: int = 1000,
    rank: int = 8,
    lora_alpha: Optional[float] = None,
    scaling: Optional[float] = None,
    block_size: int = 64,
    grid_rank: Optional[int] = None,
) -> Optional[PeftConfig]:
    """The PEFT config of an arm; None for ``full`` (no adapter: every weight trains)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if method == "full":
        return None
    common = dict(task_type=task_type, target_modules=target_modules, modules_to_save=modules_to_save)
    if method == "lora":
        # alpha = 2r is the common choice; dropout 0 because no other method here has one
        alpha = lora_alpha if lora_alpha is not None else 2 * rank
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, **common)
    if method == "vera":
        # PEFT's defaults (d_initial 0.1, the projections saved with the adapter); the seed draws the projections
        return VeraConfig(r=rank, vera_dropout=0.0, projection_prng_key=seed, **common)
    if method == "c3a":
        # block_size must divide every targeted layer's in and out features
        return C3AConfig(block_size=block_size, **common)
    scale = DEFAULT_SCALING[method] if scaling is None else float(scaling)
    if method == "spectral":
        extra = {} if grid_rank is None else {"grid_rank": grid_rank}
        return SpectralConfig(
            mode="delta", n_coefficients=n_coefficients, layout=layout, scaling=scale, seed=seed, **extra, **common
        )
    if method == "fourierft":
        # PEFT's default init (random spectrum, not the identity) and its scaling: what a user gets
        return FourierFTConfig(n_frequency=n_coefficients, scaling=scale, random_loc_seed=seed, **common)
    return WaveFTConfig(n_frequency=n_coefficients, scaling=scale, random_loc_seed=seed, **common)
