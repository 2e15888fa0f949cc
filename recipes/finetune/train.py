"""Fine-tune one arm (spectral delta, LoRA, FourierFT, WaveFT or full) with the HF Trainer, and write its run.json.

    python -m recipes.finetune.train recipes/finetune/configs/cls_smoke.yaml --arm spectral_random_k1000 \
        --seed 0 --lr 1e-3 [key=value ...]

Three tasks, one script:
- ``task: cls``: a sentence encoder + a new 2-way head on Rotten Tomatoes (fresh vs rotten); the metric is accuracy
  through ``evaluate`` (a local metric module by default, so it works offline; ``metric: accuracy`` takes the Hub's).
- ``task: lm``: a causal LM on tiny Shakespeare; the metric is validation perplexity, exp(mean token loss) over fixed
  blocks of the last 10% of the text.
- ``task: gen``: a causal LM completes ``Review: ...\nSentiment:`` with `` fresh`` or `` rotten``; the metric is the
  exact match of its greedy answer (``generative.py``).

Besides the metric a run records what PEFT's method comparison records (``measures.py``): the adapter's file size
and, for causal LMs with ``forgetting_data``, the loss change on held-out general text ("forgetting"). A spectral arm
with ``layout: gradient`` is calibrated on training batches before training (``hf_spectral.init_gradient_layout``).

A profile (YAML) holds ``defaults`` shared by its runs and a list of ``arms``; an arm's keys override the defaults,
and ``key=value`` overrides both. The merged settings are parsed into ``RecipeArguments`` and
``transformers.TrainingArguments`` by ``HfArgumentParser``, so a mistyped key fails loudly. ``--lr`` sets the
adapter's (or the body's) learning rate; the task head always trains at ``head_lr``, the same for every arm, so that
a sweep over ``--lr`` moves only what the methods differ in.

``run()`` reads top to bottom: arguments -> data -> model -> optimiser -> Trainer -> record, and the sections of this
file come in that order; what recipes share (profiles, overrides, records, hardware, stable rank, the progress bar) is
in ``recipes/common``.

The run writes ``{runs_dir}/{profile}/{arm}/lr{lr}/seed{seed}/run.json``: settings, trainable parameter counts, the
metric on validation (used to pick each method's learning rate) and test, loss curves, step times (median, min, max
after ``timing_warmup_steps``), peak memory, wall time and the hardware it ran on.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_spectral.optim import SpectralAdamW, spectral_projectors

from ..common import (
    OPTIMIZERS,
    arm_settings,
    check_optimizer,
    hardware,
    load_profile,
    parameter_counts,
    parse_args_with_overrides,
    parse_overrides,
    quiet,
    quiet_loading,
    read_record,
    stable_rank,
    write_record,
)
from . import generative, measures
from .arms import METHODS, peft_config_for
from .data import load_rotten_tomatoes, resolve_model, rotten_tomatoes_file, shakespeare_blocks, shakespeare_text

__all__ = ["arm_settings", "load_profile", "parse_overrides", "parse_settings", "run"]  # the first three: common's

TASKS = ("cls", "lm", "gen")
LOCAL_METRICS = Path(__file__).parent / "metrics"
SWEEP_KEYS = ("lrs", "seeds", "skip_timing")  # read by sweep.py, not by a run


# --------------------------------------------------------------------------------------------------
# 1. arguments


@dataclass
class RecipeArguments:
    """What a run trains and on what; TrainingArguments holds how."""

    profile: str = field(default="smoke", metadata={"help": "Name of the profile (a folder under runs_dir)."})
    arm: str = field(default="lora_r8", metadata={"help": "Name of the arm (a folder name)."})
    task: str = field(default="cls", metadata={"help": f"One of {TASKS}."})
    method: str = field(default="lora", metadata={"help": f"One of {METHODS}."})
    layout: str = field(default="random", metadata={"help": "Spectral index set: random, energy, banded, ..."})
    n_coefficients: int = field(default=1000, metadata={"help": "K per layer (spectral, FourierFT, WaveFT)."})
    rank: int = field(default=8, metadata={"help": "LoRA rank (and VeRA's r)."})
    grid_rank: Optional[int] = field(
        default=None, metadata={"help": "layout sparse_grid: its frequency rows and columns (default: the library's)."}
    )
    block_size_c3a: int = field(default=64, metadata={"help": "C3A's block size (divides every targeted layer)."})
    global_budget: bool = field(
        default=False, metadata={"help": "layout gradient: share the layers' total K by gradient energy."}
    )
    calibration_batches: int = field(default=4, metadata={"help": "layout gradient: training batches to calibrate on."})
    forgetting_data: Optional[str] = field(
        default=None, metadata={"help": "lm/gen: general text (a .txt(.bz2) or the Rotten Tomatoes csv) for forgetting."}
    )
    forgetting_blocks: int = field(default=16, metadata={"help": "Blocks of block_size tokens of it to score."})
    max_new_tokens: int = field(default=3, metadata={"help": "gen: tokens generated per answer."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha; default 2 * rank."})
    scaling: Optional[float] = field(
        default=None, metadata={"help": "Update multiplier; default: spectral 10, FourierFT 150, WaveFT 25."}
    )
    model: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={"help": "Hub name, local folder, or package:NAME/PATH (see data.py); a .gguf is converted once."},
    )
    model_dtype: str = field(
        default="float32", metadata={"help": "Weights are loaded (upcast) to this dtype; training runs in it."}
    )
    data: str = field(
        default="cornell-movie-review-data/rotten_tomatoes",
        metadata={"help": "cls: Hub dataset or the local csv(.bz2); lm: a text file or a URL."},
    )
    target_modules: Union[str, list[str]] = field(
        default=".*layer\\.\\d+\\.(attention\\.self\\.(query|key|value)|attention\\.output\\.dense|intermediate\\.dense|output\\.dense)",
        metadata={"help": "Layers every adapter targets (a regex, or a list of name suffixes)."},
    )
    head: str = field(default="classifier", metadata={"help": "cls: the new task head (trained by every arm)."})
    head_lr: float = field(default=2e-3, metadata={"help": "cls: the head's learning rate, the same for all arms."})
    max_length: int = field(default=96, metadata={"help": "cls, gen: tokens per review (longer ones are cut)."})
    block_size: int = field(default=128, metadata={"help": "lm: tokens per training and validation block."})
    max_train_examples: Optional[int] = field(default=None, metadata={"help": "Use only this many (smoke runs)."})
    max_eval_examples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate on this many, evenly spaced over each split (None: all)."}
    )
    metric: str = field(
        default="local", metadata={"help": "cls: 'local' (the module in metrics/accuracy) or an evaluate name."}
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "adamw, or for spectral arms SpectralAdamW with its second moment in the weight basis: "
            "wadam (full) or wfactored (row/column factored); see hf_spectral.optim."
        },
    )
    timing_warmup_steps: int = field(default=5, metadata={"help": "Steps left out of the step-time statistics."})
    allow_tf32: bool = field(default=True, metadata={"help": "On a GPU, let fp32 matmuls use TF32 (all arms alike)."})
    evaluate: bool = field(default=True, metadata={"help": "False: train only (timing runs)."})
    diagnostics: bool = field(
        default=True, metadata={"help": "Record the relative size and stable rank of every adapter's update."}
    )
    runs_dir: str = field(default="runs/finetune", metadata={"help": "Where run folders go."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {TASKS}.")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}.")
        check_optimizer(self.optimizer, spectral=self.method == "spectral", arm=f"method={self.method!r}")


def run_folder(recipe: RecipeArguments, lr: float, seed: int) -> Path:
    return Path(recipe.runs_dir) / recipe.profile / recipe.arm / f"lr{lr:g}" / f"seed{seed}"


def parse_settings(settings: dict, lr: float, seed: int) -> tuple[RecipeArguments, TrainingArguments]:
    settings = {k: v for k, v in settings.items() if k not in SWEEP_KEYS}
    settings.update(learning_rate=float(lr), seed=int(seed))
    recipe_keys = set(RecipeArguments.__dataclass_fields__)
    recipe = RecipeArguments(**{k: v for k, v in settings.items() if k in recipe_keys})
    settings["output_dir"] = str(run_folder(recipe, lr, seed))
    parser = HfArgumentParser((RecipeArguments, TrainingArguments))
    recipe, training = parser.parse_dict(settings, allow_extra_keys=False)
    return recipe, training


# --------------------------------------------------------------------------------------------------
# 2. data


def _evenly(n_total: int, n_keep: Optional[int]) -> list[int]:
    if n_keep is None or n_keep >= n_total:
        return list(range(n_total))
    return np.linspace(0, n_total - 1, n_keep).round().astype(int).tolist()


_DATA_CACHE: dict = {}  # a sweep's worker tokenizes once for all its runs


def classification_data(recipe: RecipeArguments, tokenizer):
    key = ("cls", recipe.data, recipe.model, recipe.max_length, recipe.max_train_examples, recipe.max_eval_examples)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = _classification_data(recipe, tokenizer)
    return _DATA_CACHE[key]


def _classification_data(recipe: RecipeArguments, tokenizer):
    data = load_rotten_tomatoes(recipe.data)
    if recipe.max_train_examples is not None:
        # a fixed subset (seed 0), the same for every run seed
        data["train"] = data["train"].shuffle(seed=0).select(range(min(recipe.max_train_examples, len(data["train"]))))
    for split in ("validation", "test"):
        data[split] = data[split].select(_evenly(len(data[split]), recipe.max_eval_examples))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=recipe.max_length)

    return data.map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")


class Blocks(torch.utils.data.Dataset):
    """Fixed token blocks; the labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def lm_data(recipe: RecipeArguments, tokenizer) -> dict[str, Blocks]:
    key = ("lm", recipe.data, recipe.model, recipe.block_size, recipe.max_train_examples, recipe.max_eval_examples)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = _lm_data(recipe, tokenizer)
    return _DATA_CACHE[key]


def _lm_data(recipe: RecipeArguments, tokenizer) -> dict[str, Blocks]:
    blocks = shakespeare_blocks(shakespeare_text(recipe.data), tokenizer, recipe.block_size)
    train = blocks["train"]
    if recipe.max_train_examples is not None:
        train = train[
            torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[: recipe.max_train_examples]
        ]
    held_out = {s: blocks[s][_evenly(blocks[s].shape[0], recipe.max_eval_examples)] for s in ("validation", "test")}
    return {"train": Blocks(train), **{s: Blocks(b) for s, b in held_out.items()}}


def accuracy_metric(recipe: RecipeArguments):
    import evaluate

    # evaluate.load("accuracy") always asks the Hub; a metric module on disk works offline
    metric = evaluate.load(str(LOCAL_METRICS / "accuracy") if recipe.metric == "local" else recipe.metric)

    def compute(prediction):
        logits, labels = prediction
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute


def load_tokenizer(recipe: RecipeArguments):
    """The model's tokenizer (its pad token the end-of-text token if it has none) and where the model is."""
    path = resolve_model(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, path


def task_data(recipe: RecipeArguments, tokenizer) -> tuple:
    """The training set, the held-out sets (validation, test), the collator and the metric of the task."""
    if recipe.task == "cls":
        data = classification_data(recipe, tokenizer)
        return (
            data["train"],
            {"validation": data["validation"], "test": data["test"]},
            DataCollatorWithPadding(tokenizer),
            accuracy_metric(recipe),
        )
    if recipe.task == "gen":
        key = ("gen", recipe.data, recipe.model, recipe.max_length, recipe.max_train_examples, recipe.max_eval_examples)
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = generative.gen_data(
                recipe.data, tokenizer, recipe.max_length, recipe.max_train_examples,
                lambda n: _evenly(n, recipe.max_eval_examples),
            )
        data = _DATA_CACHE[key]
        return (data["train"], {"validation": data["validation"], "test": data["test"]},
                generative.PadCollator(tokenizer.pad_token_id), None)
    data = lm_data(recipe, tokenizer)
    return data["train"], {"validation": data["validation"], "test": data["test"]}, default_data_collator, None


# --------------------------------------------------------------------------------------------------
# 3. model


def build_model(recipe: RecipeArguments, path: str, tokenizer, seed: int):
    """The pretrained model with the arm's adapter (or fully trainable), its size before it, and the PEFT config."""
    dtype = getattr(torch, recipe.model_dtype)
    set_seed(seed)  # the head's init
    if recipe.task == "cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype)
        task_type, modules_to_save = "SEQ_CLS", [recipe.head]
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        task_type, modules_to_save = "CAUSAL_LM", None
    model.config.pad_token_id = tokenizer.pad_token_id
    base_total = sum(p.numel() for p in model.parameters())
    config = peft_config_for(
        recipe.method,
        task_type=task_type,
        target_modules=recipe.target_modules,
        modules_to_save=modules_to_save,
        seed=seed,
        layout=recipe.layout,
        n_coefficients=recipe.n_coefficients,
        rank=recipe.rank,
        lora_alpha=recipe.lora_alpha,
        scaling=recipe.scaling,
        block_size=recipe.block_size_c3a,
        grid_rank=recipe.grid_rank,
    )
    if config is not None:
        model = get_peft_model(model, config)
    return model, base_total, config


# --------------------------------------------------------------------------------------------------
# 4. optimiser


def build_optimizer(model, recipe: RecipeArguments, training: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW with two groups: the head at head_lr, everything else trainable at the swept learning rate."""
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if recipe.task == "cls" and recipe.head in name else body).append(param)
    # weight decay only for full fine-tuning: on an adapter it pulls the update to zero, not to a prior
    decay = training.weight_decay if recipe.method == "full" else 0.0
    groups = [{"params": body, "lr": training.learning_rate, "weight_decay": decay}]
    if head:
        groups.append({"params": head, "lr": recipe.head_lr, "weight_decay": 0.0})
    betas, eps = (training.adam_beta1, training.adam_beta2), training.adam_epsilon
    moments = OPTIMIZERS[recipe.optimizer]
    if moments is None:
        return torch.optim.AdamW(groups, betas=betas, eps=eps)
    # Adam's statistics in the weight basis for the coefficients; the head gets plain AdamW from the same optimiser
    return SpectralAdamW(groups, projectors=spectral_projectors(model), betas=betas, eps=eps, moments=moments)


# --------------------------------------------------------------------------------------------------
# 5. Trainer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, update), synchronised with the GPU."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self._start)


# --------------------------------------------------------------------------------------------------
# 6. record


def step_statistics(times: list[float], warmup: int) -> dict:
    kept = times[warmup:] if len(times) > warmup else times
    if not kept:
        return {}
    return {
        "median_s": statistics.median(kept),
        "min_s": min(kept),
        "max_s": max(kept),
        "steps_timed": len(kept),
    }


def update_diagnostics(model) -> dict:
    """Per adapted layer: ||dW||_F / ||W0||_F and the stable rank ||dW||_F^2 / ||dW||_2^2 of the update."""
    relative, stable = [], []
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            base = module.get_base_layer()
            for adapter in module.active_adapters:
                try:
                    delta = module.get_delta_weight(adapter).float()
                except (KeyError, AttributeError):
                    continue
                fro = torch.linalg.matrix_norm(delta).item()
                relative.append(fro / max(torch.linalg.matrix_norm(base.weight.float()).item(), 1e-12))
                stable.append(stable_rank(delta))
    if not relative:
        return {}
    return {
        "relative_update_median": float(np.median(relative)),
        "relative_update_max": float(np.max(relative)),
        "stable_rank_median": float(np.median(stable)),
        "layers": len(relative),
    }


def make_record(
    trainer: Trainer,
    output,
    recipe: RecipeArguments,
    training: TrainingArguments,
    settings: dict,
    results: dict,
    counts: dict,
    peft_config,
    timer: StepTimer,
    seed: int,
    lr: float,
    started: float,
    train_seconds: float,
) -> dict:
    """What ``run.json`` holds: settings, parameter counts, metrics, curves, step times, memory, hardware."""
    history = trainer.state.log_history
    record = {
        "profile": recipe.profile,
        "arm": recipe.arm,
        "task": recipe.task,
        "method": recipe.method,
        "seed": seed,
        "lr": float(lr),
        "head_lr": recipe.head_lr if recipe.task == "cls" else None,
        "scaling": getattr(peft_config, "scaling", None),
        "settings": {k: v for k, v in settings.items() if k not in SWEEP_KEYS},
        "recipe": asdict(recipe),
        # what local:rotten_tomatoes resolved to (the shared full file or the shipped sample)
        "data_file": str(rotten_tomatoes_file(recipe.data) or recipe.data) if recipe.task == "cls" else recipe.data,
        "parameters": counts,
        "results": results,
        "train_loss": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "validation_curve": [
            (h["step"], h.get("eval_accuracy", h.get("eval_loss"))) for h in history if "eval_loss" in h
        ],
        "final_train_loss": output.training_loss,
        "steps": trainer.state.global_step,
        "examples_per_step": training.per_device_train_batch_size * training.gradient_accumulation_steps,
        "step_time": step_statistics(timer.times, recipe.timing_warmup_steps),
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - started,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "hardware": hardware(),
        "diagnostics": update_diagnostics(trainer.model) if recipe.diagnostics and peft_config is not None else {},
        "evaluated": recipe.evaluate,
    }
    if recipe.task in ("lm", "gen"):
        record["tokens_per_step"] = record["examples_per_step"] * recipe.block_size
    return record


# --------------------------------------------------------------------------------------------------
# one run, top to bottom


def run(settings: dict, lr: float, seed: int, overwrite: bool = False) -> dict:
    """Train and evaluate one (arm, lr, seed); return and write its record. Skips a run whose run.json exists."""
    # 1. arguments (a run with a record is done: a record is only written whole, at the end)
    recipe, training = parse_settings(settings, lr, seed)
    folder = Path(training.output_dir)
    if (folder / "run.json").exists() and not overwrite:
        return read_record(folder)
    started = time.time()
    if torch.cuda.is_available() and recipe.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # 2. data: tokenized once per process for every run that shares it
    tokenizer, model_path = load_tokenizer(recipe)
    train_set, evals, collator, compute_metrics = task_data(recipe, tokenizer)

    # 3. model: the pretrained model with the arm's adapter (or every weight trainable)
    model, base_total, peft_config = build_model(recipe, model_path, tokenizer, seed)
    general = None
    if recipe.forgetting_data and recipe.task != "cls":  # an encoder with a new head has no LM loss to forget
        general = measures.general_blocks(recipe.forgetting_data, tokenizer, recipe.block_size, recipe.forgetting_blocks)
        loss_before = measures.base_loss(model, general, has_adapter=peft_config is not None)
    calibration_seconds = None
    if measures.needs_calibration(peft_config):  # layout gradient: the index sets come from the training data
        calibration_seconds = measures.calibrate(
            model, train_set, collator, batches=recipe.calibration_batches,
            batch_size=training.per_device_train_batch_size, global_budget=recipe.global_budget, seed=seed,
        )
    counts = parameter_counts(model, (recipe.head,) if recipe.task == "cls" else ())
    counts["base_model"] = base_total

    # 4. optimiser: the head at head_lr, the rest at lr
    optimizer = build_optimizer(model, recipe, training)

    # 5. Trainer: a progress bar (unless disable_tqdm) instead of printed logs; then each held-out split
    timer = StepTimer()
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train_set,
        eval_dataset=evals["validation"],
        data_collator=collator,
        compute_metrics=compute_metrics,
        callbacks=[timer],
        optimizers=(optimizer, None),
    )
    quiet(trainer, label=recipe.arm)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    memory = measures.PeakRSS().start()  # this run's peak resident memory (what a CPU run reports)
    train_started = time.time()
    output = trainer.train()
    train_seconds = time.time() - train_started
    results = {}
    for split, dataset in evals.items() if recipe.evaluate else ():
        metrics = trainer.evaluate(dataset, metric_key_prefix=split)
        results[split] = {k.removeprefix(f"{split}_"): v for k, v in metrics.items()}
        if recipe.task == "lm":
            results[split]["perplexity"] = math.exp(min(results[split]["loss"], 50.0))
        if recipe.task == "gen":
            results[split]["exact_match"] = generative.exact_match(
                trainer.model, tokenizer, dataset, training.per_device_eval_batch_size, recipe.max_new_tokens
            )

    # 6. record
    record = make_record(
        trainer,
        output,
        recipe,
        training,
        settings,
        results,
        counts,
        peft_config,
        timer,
        seed,
        lr,
        started,
        train_seconds,
    )
    record["peak_rss_run_mb"] = memory.stop()
    record["process_id"] = os.getpid()  # runs that shared a process share what it kept resident
    record["adapter_file_bytes"] = measures.adapter_file_bytes(trainer.model, peft_config)
    record["calibration_seconds"] = calibration_seconds
    record["forgetting"] = measures.forgetting(
        loss_before if general is not None else None,
        measures.mean_token_loss(trainer.model, general) if general is not None else None,
    )
    write_record(folder, record)  # a run.json that exists is complete

    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="A YAML profile (recipes/finetune/configs/*.yaml).")
    parser.add_argument("--arm", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, help="Learning rate (default: the arm's first lr in the profile).")
    parser.add_argument("--overwrite", action="store_true", help="Run again even if run.json exists.")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the profile's.")
    args = parse_args_with_overrides(parser, argv)
    quiet_loading()
    settings = arm_settings(load_profile(args.profile), args.arm)
    settings.update(parse_overrides(args.overrides))
    lr = args.lr if args.lr is not None else settings.get("lrs", [settings.get("learning_rate", 1e-3)])[0]
    record = run(settings, lr, args.seed, overwrite=args.overwrite)
    key = {"cls": "accuracy", "lm": "perplexity", "gen": "exact_match"}[record["task"]]
    summary = {split: round(r[key], 4) for split, r in record["results"].items()}
    print(
        json.dumps(
            {
                "arm": record["arm"],
                "lr": lr,
                "seed": args.seed,
                key: summary,
                "s_per_step": record["step_time"].get("median_s"),
            }
        )
    )
    return record


if __name__ == "__main__":
    main()
