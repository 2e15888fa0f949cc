"""Spectral models under DeepSpeed ZeRO-2 and ZeRO-3 on CPU processes over gloo, launched by torchrun.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/workers/deepspeed_worker.py --out DIR

``deepspeed.initialize`` is called directly with the shipped configs (recipes/configs/deepspeed_zero{2,3}.json,
their "auto" entries filled in here as the HF Trainer would): without GPUs Accelerate's DeepSpeed plugin is not
data parallel (with ACCELERATE_USE_CPU=1 it silently becomes DDP; without, every rank reads all the data; see
docs/distributed.md).

For each stage (2, 3) and each mode (delta on a tiny Llama, replace on a tiny GPT-2 with the char recipe's 65
characters) every rank builds the same model and an unwrapped copy as the reference, then: records how the
coefficients are partitioned; trains 3 steps, each rank on half of the batch, the reference on the whole
batch (SGD with momentum as a client optimiser under ZeRO-2 and ZeRO-3, and the config's DeepSpeed AdamW
against torch's AdamW under ZeRO-3); saves the adapter consolidated from the shards (ZeRO-3:
``engine._zero3_consolidated_16bit_state_dict()``, what the HF Trainer and Accelerate call) and, on rank 0,
loads it with ``PeftModel.from_pretrained`` into a fresh base model. Each rank writes what it saw to
DIR/rank{R}.json for tests/test_deepspeed.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for its shared helpers
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import z3_leaf_module  # noqa: E402
from ecosystem_utils import REPO_ROOT, tiny_gpt2, token_rows  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from tiny_models import make_llama  # noqa: E402

from hf_spectral import SpectralConfig, SpectralLayer  # noqa: E402

CHARS = 65  # the char-Shakespeare vocabulary
MODELS = {
    # delta mode fine-tunes a (here random) Llama; replace mode trains a char-level GPT-2 from scratch
    "delta": (lambda: make_llama(seed=0).train(), 64,
              dict(mode="delta", layout="random", n_coefficients=200, init_weights=False,
                   target_modules=["q_proj", "v_proj", "down_proj"])),
    "replace": (lambda: tiny_gpt2(seed=0, vocab=CHARS), CHARS,
                dict(mode="replace", layout="lowfreq", coefficient_fraction=0.5)),
}
STEPS, GLOBAL_BATCH, LR, SGD_LR = 3, 8, 1e-2, 0.1
# SGD for the comparison with one process (to float rounding) under both stages; DeepSpeed's AdamW from the
# config under ZeRO-3 (Adam turns last-bit differences of near-zero gradients into steps of up to lr)
CASES = [f"zero{stage}-{mode}-sgd" for stage in (2, 3) for mode in MODELS] + [f"zero3-{mode}-adamw" for mode in MODELS]


def shipped_config(stage: int, world: int) -> dict:
    """recipes/configs/deepspeed_zero{stage}.json with its "auto" entries filled in as the HF Trainer does."""
    config = json.loads((REPO_ROOT / "recipes" / "configs" / f"deepspeed_zero{stage}.json").read_text())
    config.pop("_comment", None)
    config["bf16"] = config["fp16"] = {"enabled": False}
    config.update(train_batch_size=GLOBAL_BATCH, train_micro_batch_size_per_gpu=GLOBAL_BATCH // world,
                  gradient_accumulation_steps=1, gradient_clipping=0.0)
    zero = config["zero_optimization"]
    for key, value in list(zero.items()):
        if value == "auto":  # the Trainer's fills: bucket sizes from the hidden size; small here
            zero[key] = {"stage3_param_persistence_threshold": 0}.get(key, 10_000)
    # DeepSpeed's own AdamW; torch_adam because the fused CPU Adam needs a compiler build of its op
    config["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                       "weight_decay": 0.0, "torch_adam": True}}
    return config


def build(mode: str):
    factory, vocab, settings = MODELS[mode]
    return get_peft_model(factory(), SpectralConfig(**settings)), vocab


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def coefficient_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "spectral_coefficients" in n]


def run(stage: int, mode: str, out: str, rank: int, world: int, optimizer: str) -> dict:
    model, vocab = build(mode)
    reference = copy.deepcopy(model)
    config = shipped_config(stage, world)
    ref_trainable = [p for p in reference.parameters() if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        ref_optimizer = torch.optim.AdamW(ref_trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        client = None
    else:  # SGD: a distributed and a one-process sum that differ in the last bit stay a last-bit apart
        del config["optimizer"]
        config["zero_allow_untested_optimizer"] = True
        ref_optimizer = torch.optim.SGD(ref_trainable, lr=SGD_LR, momentum=0.9)
        client = torch.optim.SGD(trainable, lr=SGD_LR, momentum=0.9)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=client, config=config)
    names = coefficient_names(engine.module)
    params = dict(engine.module.named_parameters())
    partition = {
        n: {"numel_visible": params[n].numel(),
            "ds_numel": int(getattr(params[n], "ds_numel", params[n].numel())),
            "local": int(params[n].ds_tensor.numel()) if hasattr(params[n], "ds_tensor") else params[n].numel()}
        for n in names
    }
    spectral_layers = [m for m in engine.module.modules() if isinstance(m, SpectralLayer)]
    leaves = sum(z3_leaf_module(m) for m in spectral_layers)

    ids = token_rows(GLOBAL_BATCH * STEPS, seed=7, vocab=vocab)
    losses, ref_losses = [], []
    for step in range(STEPS):
        batch = ids[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        local = batch.chunk(world)[rank]
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        ref_loss = reference(input_ids=batch, labels=batch).loss
        ref_loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        ref_losses.append(ref_loss.item())

    # whole trained tensors, gathered from the partitions (a no-op under ZeRO-2)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    ref_params = dict(reference.named_parameters())
    with deepspeed.zero.GatheredParameters(trainable):
        trained = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    diffs = {n: (trained[n] - ref_params[n]).abs().max().item() for n in trained}
    moved = max((trained[n] - p0).abs().max().item() for n, p0 in dict(build(mode)[0].named_parameters()).items()
                if n in trained)

    engine.eval()
    reference.eval()
    probe = token_rows(4, seed=11, vocab=vocab)
    engine_logits = logits(engine.module, probe)  # ZeRO-3 gathers each layer's coefficients for its forward

    # the adapter, consolidated from the shards: every rank takes part in the gather, rank 0 writes
    folder = os.path.join(out, f"zero{stage}-{mode}-{optimizer}")
    state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None
    if rank == 0:
        engine.module.save_pretrained(folder, state_dict=state)
    dist.barrier()
    result = {
        "partition": partition,
        "spectral_layers": len(spectral_layers),
        "z3_leaf_spectral_layers": leaves,
        "losses": losses,
        "reference_losses": ref_losses,
        "max_diff_to_reference": max(diffs.values()),
        "diff_by_parameter": diffs,
        "max_change_in_training": moved,
        "engine_vs_reference_logits": (engine_logits - logits(reference, probe)).abs().max().item(),
        "optimizer": type(engine.optimizer).__name__,
    }
    if rank == 0:
        loaded = PeftModel.from_pretrained(MODELS[mode][0](), folder)  # into a fresh base model
        result["loaded_vs_engine_logits"] = (logits(loaded.eval(), probe) - engine_logits).abs().max().item()
        result["saved_files"] = sorted(os.listdir(folder))
    engine.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES), help="stage-mode-optimizer, comma-separated")
    args = parser.parse_args()
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world, "deepspeed": deepspeed.__version__, "runs": {}}
    for case in args.cases.split(","):
        stage, mode, optimizer = case.split("-")
        results["runs"][case] = run(int(stage.removeprefix("zero")), mode, args.out, rank, world, optimizer)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
