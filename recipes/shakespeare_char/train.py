"""Train one arm of the char-Shakespeare comparison from scratch with the HF Trainer.

    python -m recipes.shakespeare_char.train recipes/shakespeare_char/configs/quick.yaml \
        --arm lowfreq_mn2_wadam --seed 0 [key=value ...]

The profile (YAML) holds the settings every run shares (``defaults``) and a list of ``arms``;
an arm's keys override the defaults and ``key=value`` overrides both. The merged settings are
parsed into the dataclasses below and ``transformers.TrainingArguments`` by ``HfArgumentParser``,
so a mistyped key fails loudly. Under ``accelerate launch`` the same command runs data-parallel:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        -m recipes.shakespeare_char.train CONFIG --arm dense --seed 0

``train()`` reads top to bottom: arguments -> data -> model -> optimiser -> Trainer -> record, and the
sections of this file come in that order. What recipes share (profiles, overrides, records, hardware,
stable rank, the progress bar) is in ``recipes/common``.

Each run writes ``run.json`` (settings, parameter counts, checkpoint size, loss curves against
tokens, timings, stable ranks, a sample) and ``model/`` under
``{runs_dir}/{profile}/{arm}/seed{seed}``. An interrupted run resumes from its last complete
checkpoint when started again (``save_steps``; ``time_limit_minutes`` stops a run cleanly).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from hf_spectral.ecosystem.checkpoints import CompleteCheckpointCallback, last_complete_checkpoint
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from hf_spectral import SpectralConfig, SpectralLayer
from hf_spectral.optim import create_optimizer, optimizer_state_elements

from ..common import (
    OPTIMIZERS,
    arm_settings,
    check_optimizer,
    hardware,
    is_finished,
    load_profile,
    parse_args_with_overrides,
    parse_overrides,
    quiet,
    read_record,
    stable_rank,
    write_record,
)
from .prepare import load_meta, load_split, prepare

__all__ = ["load_profile", "parse_settings", "run_settings", "train"]  # load_profile: recipes.common's

KINDS = ("dense", "spectral", "lowrank")
BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's Conv1D layers per block
BLOCK_LAYER_NAME = re.compile(r"h\.(\d+)\.(" + "|".join(re.escape(n) for n in BLOCK_LAYERS) + r")$")


# --------------------------------------------------------------------------------------------------
# 1. arguments


@dataclass
class ArmArguments:
    """What is compared: how the blocks' linear layers are stored, and how they are optimised."""

    arm: str = field(default="dense", metadata={"help": "Name of the arm (a folder name)."})
    kind: str = field(default="dense", metadata={"help": f"One of {KINDS}."})
    fraction: float = field(
        default=0.5,
        metadata={"help": "K / (m n) per layer; the low-rank arm takes r = round(K / (m + n)) to match it."},
    )
    layout: str = field(default="lowfreq", metadata={"help": "Spectral index set: lowfreq, triangle or random."})
    basis: str = field(default="dct", metadata={"help": "Spectral basis: dct or random_orthonormal."})
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "adamw (torch AdamW on every parameter), wadam (hf_spectral.optim.SpectralAdamW with its second "
            "moment in the weight basis) or wfactored (the same, second moment factored into rows and columns)."
        },
    )

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}.")
        check_optimizer(self.optimizer, spectral=self.kind == "spectral", arm=f"kind={self.kind!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction!r} is outside (0, 1]; mn/2 is 0.5, mn/10 is 0.1.")


@dataclass
class ModelArguments:
    """The paper's model: a 4-layer, 4-head, 128-dim GPT-2 with a 256-character context."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = field(default=256, metadata={"help": "Context length of the model."})
    dropout: float = field(default=0.0, metadata={"help": "Residual, embedding and attention dropout."})


@dataclass
class DataArguments:
    """Where the data and the runs live, and how validation and sampling are done."""

    profile: str = field(default="custom", metadata={"help": "Profile name (a folder name)."})
    runs_dir: str = field(default="runs/shakespeare_char", metadata={"help": "Root folder of all runs."})
    data_dir: str = field(default="runs/shakespeare_char/data", metadata={"help": "Output of prepare.py."})
    input: Optional[str] = field(default=None, metadata={"help": "input.txt, if the data is not prepared yet."})
    block_size: int = field(default=256, metadata={"help": "Characters per training and validation window."})
    eval_batch_size: int = field(default=64, metadata={"help": "Windows per validation batch."})
    eval_windows: Optional[int] = field(
        default=None, metadata={"help": "Evenly spaced validation windows to use; None: the whole split."}
    )
    sample_chars: int = field(default=300, metadata={"help": "Characters sampled from the final model."})
    save_model: bool = field(default=True, metadata={"help": "Save the final model under model/."})
    time_limit_minutes: Optional[float] = field(
        default=None,
        metadata={"help": "Stop with a checkpoint after this long (single process); run again to resume."},
    )


def run_settings(profile: dict, arm: str, seed: int, overrides: list[str] | None = None) -> dict:
    """The flat settings of one run: profile defaults, then the arm, then ``key=value`` overrides."""
    settings = arm_settings(profile, arm)
    settings.pop("seeds", None)  # the sweep's business
    settings["seed"] = seed
    settings.update(parse_overrides(overrides))
    settings.setdefault("data_seed", seed)
    runs_dir = settings.get("runs_dir", DataArguments.runs_dir)
    settings.setdefault("output_dir", str(Path(runs_dir) / settings["profile"] / arm / f"seed{seed}"))
    return settings


def parse_settings(settings: dict) -> tuple[ArmArguments, ModelArguments, DataArguments, TrainingArguments]:
    parser = HfArgumentParser((ArmArguments, ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_dict(settings)


# --------------------------------------------------------------------------------------------------
# 2. data


class RandomWindows(torch.utils.data.Dataset):
    """``count`` training windows at seeded random offsets (one per sample the run will see)."""

    def __init__(self, tokens: np.ndarray, block_size: int, count: int, seed: int):
        self.tokens, self.block_size = tokens, block_size
        self.offsets = np.random.default_rng(seed).integers(0, len(tokens) - block_size, size=count)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        start = int(self.offsets[i])
        ids = torch.from_numpy(self.tokens[start : start + self.block_size].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def validation_windows(tokens: np.ndarray, block_size: int, limit: Optional[int] = None) -> torch.Tensor:
    """Fixed windows over the validation split, overlapping by one character, so that every character
    after the first is predicted exactly once (the last, partial window is dropped)."""
    stride = block_size - 1
    starts = np.arange(0, len(tokens) - block_size + 1, stride)
    if limit is not None and limit < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, limit).round().astype(int)]
    return torch.from_numpy(np.stack([tokens[s : s + block_size] for s in starts]).astype(np.int64))


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, device) -> float:
    """Mean cross-entropy over every predicted character of ``windows`` (deterministic)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


# --------------------------------------------------------------------------------------------------
# 3. model: dense, spectral (K coefficients per layer) or low rank (W = B A)


def block_layer_names(model: nn.Module) -> dict[str, nn.Module]:
    """``h.{i}.attn.c_attn``-style names of the blocks' linear layers (dense, spectral or LoRA)."""
    found = {}
    for name, module in model.named_modules():
        match = BLOCK_LAYER_NAME.search(name)
        if match:
            found[f"h.{match.group(1)}.{match.group(2)}"] = module
    return found


def gpt2_config(model_args: ModelArguments, vocab_size: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=model_args.n_positions,
        n_embd=model_args.n_embd,
        n_layer=model_args.n_layer,
        n_head=model_args.n_head,
        resid_pdrop=model_args.dropout,
        embd_pdrop=model_args.dropout,
        attn_pdrop=model_args.dropout,
        activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU, as one fused kernel
        bos_token_id=0,
        eos_token_id=0,
    )


def build_model(arm: ArmArguments, model_args: ModelArguments, vocab_size: int, seed: int) -> nn.Module:
    set_seed(seed)
    model = AutoModelForCausalLM.from_config(gpt2_config(model_args, vocab_size))
    if arm.kind == "dense":
        return model
    if arm.kind == "spectral":
        # every linear layer of the blocks becomes K coefficients; embeddings, norms, biases and the
        # tied head stay dense and train (replace mode's default)
        spectral = SpectralConfig(
            mode="replace",
            coefficient_fraction=arm.fraction,
            layout=arm.layout,
            basis=arm.basis,
            seed=seed,
            fan_in_fan_out=True,  # GPT-2 stores its Conv1D weights as (in, out)
        )
        return get_peft_model(model, spectral)
    return lowrank_model(model, arm.fraction)


def lowrank_model(model: nn.Module, fraction: float) -> nn.Module:
    """W = B A trained from scratch at the spectral arm's parameter count per layer.

    PEFT LoRA on the same model with its base weights zeroed and frozen; everything else trains.
    A and B start balanced, with B A of the variance of the layer's usual init, and LoRA's
    scaling is 1 (alpha = r).
    """
    ranks, stds = {}, {}
    for name, module in block_layer_names(model).items():
        m, n = module.nf, module.nx  # Conv1D stores (in, out)
        k = max(1, round(fraction * m * n))
        ranks[name] = max(1, round(k / (m + n)))
        stds[name] = float(module.weight.detach().std())
        with torch.no_grad():
            module.weight.zero_()
    pattern = {re.escape(name): r for name, r in ranks.items()}
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        rank_pattern=pattern,
        alpha_pattern=pattern,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
    )
    model = get_peft_model(model, config)
    for name, module in block_layer_names(model).items():
        a, b, r = module.lora_A["default"].weight, module.lora_B["default"].weight, ranks[name]
        if a.shape[0] != r or module.scaling["default"] != 1.0:
            raise RuntimeError(f"LoRA gave {name} rank {a.shape[0]} and scaling {module.scaling['default']}.")
        std = (stds[name] ** 2 / r) ** 0.25  # r * std_a^2 * std_b^2 = std_W^2
        with torch.no_grad():
            a.normal_(0.0, std)
            b.normal_(0.0, std)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or not name.endswith("base_layer.weight")
    return model


def block_parameter_counts(model: nn.Module, kind: str) -> dict:
    """Trainable parameters, those of the block layers (weights, coefficients or A and B), and their dense size."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    if kind == "dense":
        block = sum(m.weight.numel() for m in block_layer_names(model).values())
    elif kind == "spectral":
        block = sum(v for n, v in trainable.items() if "spectral_coefficients" in n)
    else:
        block = sum(v for n, v in trainable.items() if "lora_" in n)
    dense_block = sum(
        m.nf * m.nx if isinstance(m, Conv1D) else m.out_features * m.in_features
        for m in (getattr(mod, "base_layer", mod) for mod in block_layer_names(model).values())
    )
    return {
        "trainable": sum(trainable.values()),
        "block": block,
        "dense_block": dense_block,
        "block_share": block / dense_block,
        "other": sum(trainable.values()) - block,
    }


# --------------------------------------------------------------------------------------------------
# 4. optimiser


def build_optimizer(model: nn.Module, arm: ArmArguments, args: TrainingArguments) -> Optional[torch.optim.Optimizer]:
    """SpectralAdamW for ``wadam`` and ``wfactored``; None (the Trainer's own AdamW) for ``adamw``."""
    moments = OPTIMIZERS[arm.optimizer]
    return create_optimizer(model, args, moments=moments) if moments else None


# --------------------------------------------------------------------------------------------------
# 5. Trainer


class CharTrainer(Trainer):
    """Trainer whose evaluation is the deterministic full-split validation loss."""

    def __init__(self, *args, val_windows: torch.Tensor, eval_batch_size: int, tokens_per_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_windows, self.eval_batch_size, self.tokens_per_step = val_windows, eval_batch_size, tokens_per_step
        self.eval_seconds = 0.0

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        start = time.perf_counter()
        # every process scores the whole split on its own copy: identical, and no gather is needed
        loss = validation_loss(self.model, self.val_windows, self.eval_batch_size, self.args.device)
        self.eval_seconds += time.perf_counter() - start
        metrics = {f"{metric_key_prefix}_loss": loss, "tokens": self.state.global_step * self.tokens_per_step}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class WallClock(TrainerCallback):
    """Adds up training time across resumed chunks, and stops a chunk at its time limit."""

    def __init__(self, output_dir: Path, limit_minutes: Optional[float]):
        self.path = output_dir / "wall_clock.json"
        self.before = json.loads(self.path.read_text())["seconds"] if self.path.is_file() else 0.0
        self.start = time.perf_counter()
        self.limit = None if limit_minutes is None else limit_minutes * 60.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def on_step_end(self, args, state, control, **kwargs):
        if self.limit is not None and time.perf_counter() - self.start > self.limit:
            control.should_training_stop = True
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.write_text(json.dumps({"seconds": self.seconds(), "step": state.global_step}))


# --------------------------------------------------------------------------------------------------
# 6. record


def effective_weights(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The out x in weight of every block layer, as the model computes it."""
    weights = {}
    with torch.no_grad():
        for name, module in block_layer_names(model).items():
            if kind == "spectral" and isinstance(module, SpectralLayer):
                weights[name] = module.rebuild("default").float()
            elif kind == "lowrank":
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                weights[name] = (b @ a * module.scaling["default"]).float()
            elif isinstance(module, Conv1D):
                weights[name] = module.weight.T.float()
    return weights


def save_arm(model: nn.Module, kind: str, directory: Path) -> int:
    """Save what is needed to restore the model; return its size on disk in bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "lowrank":
        # LoRA's own save keeps only A and B; a model trained from scratch needs every trained tensor
        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(directory / "model.safetensors"))
        model.peft_config["default"].save_pretrained(str(directory))
    else:
        model.save_pretrained(str(directory))  # dense: the model; spectral: adapter + non-spectral tensors
    # the architecture beside the weights (config.json), so GPT2LMHeadModel(GPT2Config.from_pretrained(directory))
    # rebuilds the model the adapter goes on
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(str(directory))
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@torch.no_grad()
def sample(model: nn.Module, chars: str, length: int, context: int, seed: int, device) -> str:
    """``length`` characters drawn from the model (temperature 1), seeded, after a newline."""
    if hasattr(model, "merge_and_unload"):  # a dense copy samples faster than rebuilding weights per character
        model = copy.deepcopy(model).merge_and_unload()
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = [chars.index("\n")]
    for _ in range(length):
        x = torch.tensor([ids[-context:]], device=device)
        probs = torch.softmax(model(input_ids=x).logits[0, -1].float().cpu(), dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    return "".join(chars[i] for i in ids[1:])


def make_record(
    trainer: Trainer,
    output,
    settings: dict,
    arm: ArmArguments,
    data_args: DataArguments,
    meta: dict,
    counts: dict,
    clock: WallClock,
    tokens_per_step: int,
) -> dict:
    """What ``run.json`` holds: settings, counts, checkpoint size, curves against tokens, timings, stable ranks,
    a sample and the hardware."""
    args, history, steps = trainer.args, trainer.state.log_history, trainer.state.global_step
    output_dir = Path(args.output_dir)
    weights = effective_weights(trainer.model, arm.kind)
    val_curve = [[e["step"] * tokens_per_step, e["eval_loss"]] for e in history if "eval_loss" in e]
    seconds = clock.seconds()
    ranks = {name: stable_rank(w) for name, w in weights.items()}
    return {
        "profile": data_args.profile,
        "arm": arm.arm,
        "seed": args.seed,
        **{k: v for k, v in asdict(arm).items() if k != "arm"},
        "finished": steps >= args.max_steps,
        "final_val_loss": val_curve[-1][1],
        "best_val_loss": min(v for _, v in val_curve),
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "params": counts,
        "checkpoint_bytes": save_arm(trainer.model, arm.kind, output_dir / "model") if data_args.save_model else None,
        "curves": {
            "train": [[e["step"] * tokens_per_step, e["loss"]] for e in history if "loss" in e],
            "val": val_curve,
        },
        "wall_seconds": seconds,
        "eval_seconds": trainer.eval_seconds,
        "train_runtime_seconds_last_chunk": output.metrics.get("train_runtime"),
        "tokens_per_second": steps * tokens_per_step / max(seconds - trainer.eval_seconds, 1e-9),
        "optimizer_state_elements": optimizer_state_elements(trainer.optimizer),
        "stable_rank": ranks,
        "sample": sample(
            trainer.model, meta["chars"], data_args.sample_chars, data_args.block_size, args.seed, args.device
        ),
        "hardware": hardware(args.device, args.world_size),
        "settings": settings,
        "mean_stable_rank": float(np.mean(list(ranks.values()))),
    }


# --------------------------------------------------------------------------------------------------
# one run, top to bottom


def train(settings: dict) -> Optional[dict]:
    """Run one arm; return its result (on the main process) or None if it stopped at its time limit."""
    # 1. arguments: the settings, parsed and checked (a finished run is returned as it was recorded)
    arm, model_args, data_args, args = parse_settings(settings)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_finished(output_dir):
        return read_record(output_dir)
    if data_args.block_size > model_args.n_positions:
        raise ValueError(
            f"block_size={data_args.block_size} is longer than the context n_positions={model_args.n_positions}."
        )

    # 2. data: seeded random training windows (one per sample the run sees), fixed validation windows
    with args.main_process_first(desc="prepare data"):
        if data_args.input or not Path(data_args.data_dir, "meta.json").is_file():
            prepare(data_args.input, data_args.data_dir)
        meta = load_meta(data_args.data_dir)
    train_tokens, val_tokens = load_split(data_args.data_dir, "train"), load_split(data_args.data_dir, "val")
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens_per_step = samples_per_step * data_args.block_size
    train_set = RandomWindows(train_tokens, data_args.block_size, args.max_steps * samples_per_step, args.seed)
    val_windows = validation_windows(val_tokens, data_args.block_size, data_args.eval_windows)

    # 3. model: dense, spectral or low rank
    model = build_model(arm, model_args, meta["vocab_size"], args.seed)
    counts = block_parameter_counts(model, arm.kind)

    # 4. optimiser
    optimizer = build_optimizer(model, arm, args)

    # 5. Trainer: resumes from the last complete checkpoint; a progress bar instead of printed logs
    clock = WallClock(output_dir, data_args.time_limit_minutes)
    trainer = CharTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_windows,  # Trainer wants one when eval_strategy is set; evaluate() reads val_windows
        optimizers=(optimizer, None),
        callbacks=[clock, CompleteCheckpointCallback()],  # a kill during a save never becomes the resume point
        val_windows=val_windows,
        eval_batch_size=data_args.eval_batch_size,
        tokens_per_step=tokens_per_step,
    )
    quiet(trainer, label=arm.arm)
    output = trainer.train(resume_from_checkpoint=last_complete_checkpoint(str(output_dir)))
    if not any("eval_loss" in e and e["step"] == trainer.state.global_step for e in trainer.state.log_history):
        trainer.evaluate()
    if not trainer.is_world_process_zero():
        return None

    # 6. record: a run stopped at its time limit records where it got to (finished: false); run again to resume
    result = make_record(trainer, output, settings, arm, data_args, meta, counts, clock, tokens_per_step)
    write_record(output_dir, result)
    return result if result["finished"] else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="a profile YAML, e.g. recipes/shakespeare_char/configs/quick.yaml")
    parser.add_argument("--arm", required=True, help="an arm of the profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value settings that win over the profile")
    args = parse_args_with_overrides(parser, argv)
    result = train(run_settings(load_profile(args.profile), args.arm, args.seed, args.overrides))
    if result is not None:
        print(
            f"{result['arm']} seed {result['seed']}: val loss {result['final_val_loss']:.4f} after "
            f"{result['tokens']:,} tokens in {result['wall_seconds']:.0f} s"
        )
    # Under torchrun / accelerate launch the Trainer's gloo group would otherwise be torn down at interpreter exit,
    # where its worker threads can abort the process ("terminate called without an active exception", exit -6)
    # after a run that finished. Only after success: a rank that failed must not wait for the others here.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
