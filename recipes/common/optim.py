"""The optimiser names recipes accept, and what each means for ``hf_spectral.optim``."""

from __future__ import annotations

from typing import Optional

# name -> SpectralAdamW's ``moments`` (None: torch AdamW on every parameter)
OPTIMIZERS: dict[str, Optional[str]] = {
    "adamw": None,  # torch AdamW; on coefficients it normalises each cosine pattern, not each weight
    "wadam": "weight",  # SpectralAdamW: Adam's second moment of the lifted gradient, in the weight basis
    "wfactored": "factored",  # the same, that second moment factored into rows and columns (K + m + n numbers)
}


def check_optimizer(name: str, spectral: bool, arm: str = "this arm") -> Optional[str]:
    """SpectralAdamW's ``moments`` for ``name``; raise if the name is unknown or is for spectral arms only.

    ``arm`` names the arm in the message (``"method='lora'"``, ``"a dense arm"``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not one of {tuple(OPTIMIZERS)}.")
    if OPTIMIZERS[name] is not None and not spectral:
        raise ValueError(f"optimizer={name!r} is for spectral arms only, not {arm}; use optimizer=adamw.")
    return OPTIMIZERS[name]
