"""What a recipe prints is its progress bars and tables: ``quiet_loading()`` at its entry point, before anything
imports transformers or PEFT, keeps other libraries' notes off the screen.

This module imports nothing heavy, so calling it first silences the import-time notes too.
"""

from __future__ import annotations

import os

# loggers of optional libraries that PEFT imports when they are installed (their import-time notes concern
# CUDA extensions and kernels a recipe does not use)
OPTIONAL_EXTRAS_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "hqq", "kernels")


def quiet_loading() -> None:
    """transformers logs errors only (a classification head that is new by design makes every load print a LOAD
    REPORT table of missing keys) unless ``TRANSFORMERS_VERBOSITY`` asks for more; no bar per dataset map or
    weight file; no import-time notes of optional quantization libraries (torchao, bitsandbytes) that a recipe
    does not use; no deprecation notice that PEFT triggers in transformers. The run record keeps what matters.
    """
    import logging
    import warnings

    for name in OPTIONAL_EXTRAS_LOGGERS:  # first: importing transformers and datasets may import them
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
