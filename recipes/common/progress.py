"""A Trainer that shows one progress bar per run instead of printing every log dict.

The Trainer prints each log (``{'loss': ..., 'grad_norm': ...}``) with ``disable_tqdm=True`` and writes it under
its bar otherwise; a recipe keeps those logs in its run record (``trainer.state.log_history``), so on screen a bar
with the latest losses is enough::

    trainer = Trainer(...)
    quiet(trainer, label="dense")     # a bar if args.disable_tqdm is False, nothing otherwise

``quiet_loading()`` at a recipe's entry point keeps transformers' own warnings (the LOAD REPORT table it prints
for every ``from_pretrained`` whose checkpoint lacks a new task head, and the like) off the screen.
"""

from __future__ import annotations

import os
from typing import Optional

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback


class ProgressBar(TrainerCallback):
    """A tqdm bar over the run's steps, its postfix the latest training and validation loss."""

    def __init__(self, label: Optional[str] = None):
        self.label, self.bar, self.postfix = label, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.label, unit="step", dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, short in (("loss", "loss"), ("eval_loss", "val")):
            if key in logs:
                self.postfix[short] = f"{logs[key]:.3f}"
        self.bar.set_postfix(self.postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def quiet(trainer: Trainer, label: Optional[str] = None) -> Trainer:
    """Stop ``trainer`` printing its logs; give it a :class:`ProgressBar` unless ``args.disable_tqdm``."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(ProgressBar(label))
    return trainer


def quiet_loading() -> None:
    """What a recipe prints is its progress bars and tables.

    transformers logs errors only (a classification head that is new by design makes every load print a LOAD
    REPORT table of missing keys) unless ``TRANSFORMERS_VERBOSITY`` asks for more; no bar per dataset map or
    weight file; no import-time notes of optional quantization libraries (torchao, bitsandbytes) that a recipe
    does not use; no deprecation notice that PEFT triggers in transformers. The run record keeps what matters.
    """
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    for name in OPTIONAL_EXTRAS_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# loggers of optional libraries that PEFT imports when they are installed, and their import-time notes
OPTIONAL_EXTRAS_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "hqq", "kernels")
