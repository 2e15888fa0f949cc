"""Train a tiny replace-mode model with Trainer, checkpointing every 2 steps; resume from the last
complete checkpoint if asked. Run by tests/test_resume.py, which kills it with SIGKILL mid-save.

    python tests/workers/resume_train.py --out DIR                      # an uninterrupted run
    python tests/workers/resume_train.py --out DIR --hang-in-save-at 4  # stops inside the save of step 4
    python tests/workers/resume_train.py --out DIR --resume             # resume from the last complete checkpoint

At the end it writes every trainable parameter to DIR/final.safetensors and a summary to DIR/final.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for its shared helpers

from ecosystem_utils import spectral_state, token_rows  # noqa: E402
from hf_spectral.ecosystem.checkpoints import CompleteCheckpointCallback, last_complete_checkpoint  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import make_gpt2  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_spectral import SpectralConfig  # noqa: E402

HANGING_MARKER = "hanging-in-save"


class Rows:
    """A map-style dataset of causal-LM examples."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class HangingTrainer(Trainer):
    """A Trainer that, for the test, stops in the middle of one checkpoint save (weights written, the
    optimizer, RNG and trainer state not yet) and waits there to be killed."""

    hang_at: int | None = None

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.hang_at == self.state.global_step:
            with open(os.path.join(self.args.output_dir, HANGING_MARKER), "w") as handle:
                handle.write(output_dir)
            time.sleep(600)
        return super()._save_optimizer_and_scheduler(output_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hang-in-save-at", type=int)
    args = parser.parse_args(argv)

    # dropout on, so the resumed run must restore the RNG state exactly; 16 rows of 4 per step =
    # 4 steps per epoch, so 6 steps cross an epoch boundary
    model = get_peft_model(
        make_gpt2(seed=0, dropout=0.1),
        SpectralConfig(mode="replace", layout="random", coefficient_fraction=0.5, init_weights="random", seed=0),
    )
    training = TrainingArguments(
        output_dir=args.out, max_steps=6, save_steps=2, per_device_train_batch_size=4, learning_rate=5e-3,
        lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01, logging_steps=1, report_to=[], seed=0,
        data_seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, save_total_limit=None,
    )
    trainer = HangingTrainer(model=model, args=training, train_dataset=Rows(token_rows(16, seed=2)),
                             callbacks=[CompleteCheckpointCallback()])
    trainer.hang_at = args.hang_in_save_at
    resume = last_complete_checkpoint(args.out) if args.resume else None
    trainer.train(resume_from_checkpoint=resume)

    save_file({k: v.contiguous() for k, v in spectral_state(model).items()}, os.path.join(args.out, "final.safetensors"))
    with open(os.path.join(args.out, "final.json"), "w") as handle:
        json.dump({"resumed_from": resume, "global_step": trainer.state.global_step,
                   "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}, handle)


if __name__ == "__main__":
    main()
