"""A Trainer that shows one progress bar per run instead of printing every log dict.

The Trainer prints each log (``{'loss': ..., 'grad_norm': ...}``) with ``disable_tqdm=True`` and writes it under
its bar otherwise; a recipe keeps those logs in its run record (``trainer.state.log_history``), so on screen a bar
with the latest losses is enough::

    trainer = Trainer(...)
    quiet(trainer, label="dense")     # a bar if args.disable_tqdm is False, nothing otherwise
"""

from __future__ import annotations

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
