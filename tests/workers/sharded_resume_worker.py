"""Checkpoint, kill and resume a sharded run: FSDP2 (torch.distributed.checkpoint) or DeepSpeed ZeRO-3.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/workers/sharded_resume_worker.py --backend fsdp2 --out DIR
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/workers/sharded_resume_worker.py \
        --backend zero3 --out DIR [--hang-in-save-at 4] [--resume]

A replace-mode tiny GPT-2 trains 6 steps with AdamW (each rank on half of a batch of 8), a checkpoint every
2 steps in DIR/checkpoint-N: every rank writes its own shards of the model and of the optimiser state,
then, once all ranks are done, rank 0 writes the manifest of ``hf_spectral.ecosystem.checkpoints``. With
``--hang-in-save-at N`` the run stops inside the save of step N (model shards written, optimiser shards
not) and waits to be killed; ``--resume`` continues from ``last_complete_checkpoint(DIR)``;
``--then-uninterrupted DIR2`` then trains the same run from scratch into DIR2, in the same processes. At the end
rank 0 writes every trainable parameter, whole, to DIR/final.safetensors and a summary to DIR/final.json.
tests/test_sharded_optimizer.py kills a run with SIGKILL and compares the resumed run with an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for its shared helpers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from ecosystem_utils import tiny_gpt2, token_rows  # noqa: E402
from hf_spectral.ecosystem.checkpoints import last_complete_checkpoint, write_manifest  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hf_spectral import SpectralConfig  # noqa: E402

STEPS, SAVE_EVERY, GLOBAL_BATCH, LR = 6, 2, 8, 5e-3
HANGING_MARKER = "hanging-in-save"


def build():
    config = SpectralConfig(mode="replace", layout="random", coefficient_fraction=0.5, init_weights="random", seed=0)
    return get_peft_model(tiny_gpt2(seed=0), config)


def hang_here(out: str) -> None:
    """Stop in the middle of a save and wait for the test's SIGKILL; each rank leaves its process id (torchrun
    starts its workers in their own sessions, so killing the launcher's process group would miss them)."""
    dist.barrier()
    with open(os.path.join(out, f"{HANGING_MARKER}.rank{dist.get_rank()}"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(300)


class FSDP2Run:
    """fully_shard on each block and the root; torch's AdamW; torch.distributed.checkpoint."""

    def __init__(self, model):
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)

    def train_step(self, ids) -> torch.Tensor:
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()

    def save(self, folder: str, hang=None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        dcp.save(get_model_state_dict(self.model), checkpoint_id=os.path.join(folder, "model"))
        if hang:
            hang()
        dcp.save(get_optimizer_state_dict(self.model, self.optimizer), checkpoint_id=os.path.join(folder, "optimizer"))

    def load(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_state = get_model_state_dict(self.model)
        dcp.load(model_state, checkpoint_id=os.path.join(folder, "model"))
        set_model_state_dict(self.model, model_state)  # also drops the layers' evaluation-time weight caches
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(optimizer_state, checkpoint_id=os.path.join(folder, "optimizer"))
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state)

    def trainable(self) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in self.model.named_parameters() if p.requires_grad}


class Zero3Run:
    """deepspeed.initialize with ZeRO-3 and DeepSpeed's AdamW; engine.save_checkpoint / load_checkpoint."""

    def __init__(self, model):
        import deepspeed

        world = dist.get_world_size()
        config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
                  "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                        "leaf_module": {"classes": ["SpectralLinear"]}},
                  "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1, "torch_adam": True}}}
        self.deepspeed = deepspeed
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)

    def train_step(self, ids) -> torch.Tensor:
        loss = self.engine(input_ids=ids, labels=ids).loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def save(self, folder: str, hang=None) -> None:
        engine = self.engine
        if hang:  # stop after the model's partitions are written, before the optimiser's
            original = engine.checkpoint_engine.save

            def save(state_dict, path, *args, **kwargs):
                if "optim_states" in os.path.basename(str(path)):
                    hang()
                return original(state_dict, path, *args, **kwargs)

            engine.checkpoint_engine.save = save
        engine.save_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))

    def load(self, folder: str) -> None:
        self.engine.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))

    def trainable(self) -> dict[str, torch.Tensor]:
        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        with self.deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}


def train(backend: str, out: str, resume: bool, hang_at) -> None:
    """One run of 6 steps into ``out``, from scratch or resumed from its last complete checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(out, exist_ok=True)

    run = (FSDP2Run if backend == "fsdp2" else Zero3Run)(build())
    resumed_from, start, losses = None, 0, []
    if resume:
        resumed_from = last_complete_checkpoint(out)  # rank 0 sets newer incomplete ones aside
        dist.barrier()
        if resumed_from is not None:
            run.load(resumed_from)
            with open(os.path.join(resumed_from, "progress.json")) as handle:
                progress = json.load(handle)
            start, losses = progress["step"], progress["losses"]

    ids = token_rows(GLOBAL_BATCH * STEPS, seed=7)
    for step in range(start + 1, STEPS + 1):
        local = ids[(step - 1) * GLOBAL_BATCH:step * GLOBAL_BATCH].chunk(world)[rank]
        loss = run.train_step(local)
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        if step % SAVE_EVERY == 0:
            folder = os.path.join(out, f"checkpoint-{step}")
            os.makedirs(folder, exist_ok=True)
            hang = (lambda: hang_here(out)) if step == hang_at else None
            run.save(folder, hang)
            dist.barrier()  # every rank has written its shards
            if rank == 0:
                with open(os.path.join(folder, "progress.json"), "w") as handle:
                    json.dump({"step": step, "losses": losses}, handle)
                write_manifest(folder)
            dist.barrier()

    trainable = run.trainable()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in trainable.items()}, os.path.join(out, "final.safetensors"))
        with open(os.path.join(out, "final.json"), "w") as handle:
            json.dump({"resumed_from": resumed_from, "start": start, "losses": losses, "world_size": world}, handle)
    dist.barrier()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True, choices=("fsdp2", "zero3"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hang-in-save-at", type=int)
    parser.add_argument("--then-uninterrupted", metavar="DIR", help="afterwards, train from scratch into DIR too")
    args = parser.parse_args(argv)
    if args.backend == "zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed("gloo")
    else:
        dist.init_process_group("gloo")
    train(args.backend, args.out, args.resume, args.hang_in_save_at)
    if args.then_uninterrupted:  # the reference run, in the same processes (saves two interpreter starts)
        train(args.backend, args.then_uninterrupted, resume=False, hang_at=None)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
