"""SpectralAdamW (full and factored second moment) under DDP, FSDP2 and DeepSpeed ZeRO-2/3, on CPU over gloo.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/workers/sharded_optimizer_worker.py --out DIR

For each wrapper and each ``moments`` ("weight", "factored") every rank builds the same replace-mode tiny
GPT-2 (random layout, so the optimiser's scattered transform runs; embeddings, norms and the head train
too), wraps it, builds ``hf_spectral.optim.create_optimizer`` over the wrapped parameters the way that
wrapper wants, and trains 3 steps with each rank on half of the batch. The reference is the same model
trained with the same optimiser in one process on the whole batch. A run either trains (the coefficients
are compared with the reference) or raises; then the worker records the error and whether any parameter
had changed. DeepSpeed runs only where it imports. Each rank writes DIR/rank{R}.json for
tests/test_sharded_optimizer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for its shared helpers
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from ecosystem_utils import tiny_gpt2, token_rows  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from hf_spectral import SpectralConfig  # noqa: E402
from hf_spectral.optim import create_optimizer  # noqa: E402

try:
    import deepspeed
except Exception as error:  # noqa: BLE001  (any failure to import means: no DeepSpeed here)
    deepspeed, DEEPSPEED_ERROR = None, f"{type(error).__name__}: {error}"
else:
    DEEPSPEED_ERROR = None

STEPS, GLOBAL_BATCH = 3, 8
SETTINGS = dict(lr=5e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def build():
    config = SpectralConfig(mode="replace", layout="random", coefficient_fraction=0.5, init_weights="random", seed=0)
    return get_peft_model(tiny_gpt2(seed=0), config)


def full(param) -> torch.Tensor:
    return (param.full_tensor() if isinstance(param, DTensor) else param).detach().clone()


def deepspeed_config(stage: int, world: int) -> dict:
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1, "steps_per_print": 10**6, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def train(wrapper: str, moments: str, rank: int, world: int) -> dict:
    model = build()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = token_rows(GLOBAL_BATCH * STEPS, seed=7)

    if wrapper == "ddp":
        wrapped = DistributedDataParallel(model)
        optimizer = create_optimizer(model, moments=moments, **SETTINGS)
        forward, backward, step = wrapped, lambda loss: loss.backward(), optimizer.step
    elif wrapper == "fsdp2":
        for block in model.base_model.model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        optimizer = create_optimizer(model, moments=moments, **SETTINGS)  # right after fully_shard (docs/distributed.md)
        forward, backward, step = model, lambda loss: loss.backward(), optimizer.step
    else:  # zero2, zero3: the optimiser is handed to deepspeed.initialize, as Trainer and Accelerate do
        optimizer = create_optimizer(model, moments=moments, **SETTINGS)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(int(wrapper[-1]), world))
        forward, backward, step = engine, engine.backward, engine.step

    def params():
        named = dict((engine.module if wrapper.startswith("zero") else model).named_parameters())
        if wrapper == "zero3":
            with deepspeed.zero.GatheredParameters(list(named.values())):
                return {n: p.detach().clone() for n, p in named.items() if n in initial}
        return {n: full(p) for n, p in named.items() if n in initial}

    losses, error = [], None
    try:
        for i in range(STEPS):
            local = ids[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH].chunk(world)[rank]
            loss = forward(input_ids=local, labels=local).loss
            backward(loss)
            step()
            (engine.zero_grad() if wrapper.startswith("zero") else optimizer.zero_grad())
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
    except Exception as caught:  # noqa: BLE001  (recorded for the test to judge)
        error = f"{type(caught).__name__}: {caught}"
    final = params()
    result = {"error": error, "losses": losses, "steps_done": len(losses),
              "max_change": max((final[n] - initial[n]).abs().max().item() for n in initial)}
    if error is None:
        result["coefficients"] = {n: v.tolist() for n, v in final.items() if "spectral_coefficients" in n}
    if wrapper.startswith("zero"):
        engine.destroy()
    return result


def reference(moments: str) -> dict:
    model = build()
    optimizer = create_optimizer(model, moments=moments, **SETTINGS)
    ids = token_rows(GLOBAL_BATCH * STEPS, seed=7)
    losses = []
    for i in range(STEPS):
        batch = ids[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses,
            "coefficients": {n: p.detach().tolist() for n, p in model.named_parameters() if "spectral_coefficients" in n}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--wrappers", default="ddp,fsdp2,zero2,zero3")
    args = parser.parse_args()
    wrappers = args.wrappers.split(",")
    if deepspeed is None:
        wrappers = [w for w in wrappers if not w.startswith("zero")]
    if any(w.startswith("zero") for w in wrappers):
        deepspeed.init_distributed("gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world, "deepspeed_error": DEEPSPEED_ERROR, "runs": {}}
    for moments in ("weight", "factored"):
        if rank == 0:
            results["runs"][f"reference-{moments}"] = reference(moments)
        for wrapper in wrappers:
            results["runs"][f"{wrapper}-{moments}"] = train(wrapper, moments, rank, world)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
