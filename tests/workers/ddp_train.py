"""A plain Accelerate training loop for a spectral model, run unchanged in one process or many.

    # two CPU processes over gloo (DDP); --cpu --num_processes 2 would silently run ONE process
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/workers/ddp_train.py --out runs/ddp
    # the same global batch in one process
    python tests/workers/ddp_train.py --out runs/single

Each process writes its trainable parameters to OUT/rank{R}.safetensors; the main process writes
the per-step losses (averaged over processes) to OUT/losses.json and the adapter to OUT/adapter.
tests/test_accelerate_ddp.py runs both commands and compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for its shared helpers

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedType, set_seed  # noqa: E402
from ecosystem_utils import spectral_state, token_rows  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import make_gpt2  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from hf_spectral import SpectralConfig  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8, help="rows per optimiser step, over all processes")
    parser.add_argument("--mode", default="replace", choices=("delta", "replace"))
    parser.add_argument("--layout", default="lowfreq")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)

    accelerator = Accelerator()
    if args.global_batch % accelerator.num_processes:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {accelerator.num_processes} processes")
    set_seed(0)
    budget = {"n_coefficients": 64} if args.mode == "delta" else {"coefficient_fraction": 0.5}
    config = SpectralConfig(mode=args.mode, layout=args.layout, target_modules=["c_attn", "c_proj", "c_fc"], **budget)
    model = get_peft_model(make_gpt2(seed=0), config)

    rows = token_rows(args.global_batch * args.steps, seed=1)
    # each process takes batch_size rows per step; Accelerate deals consecutive batches to the processes
    loader = DataLoader(TensorDataset(rows), batch_size=args.global_batch // accelerator.num_processes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    else:
        optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses = []
    model.train()
    for (ids,) in loader:
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())

    os.makedirs(args.out, exist_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:  # whole tensors gathered from the shards, on the main process
        state = {k: v for k, v in accelerator.get_state_dict(model).items() if "spectral_coefficients" in k}
    else:
        state = spectral_state(unwrapped)
    if state:
        save_file({k: v.contiguous().cpu() for k, v in state.items()},
                  os.path.join(args.out, f"rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not sharded:
            unwrapped.save_pretrained(os.path.join(args.out, "adapter"))
        with open(os.path.join(args.out, "losses.json"), "w") as handle:
            json.dump({"processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                       "device": str(accelerator.device), "losses": losses,
                       "dtensor_parameters": sum(isinstance(p, DTensor) for p in model.parameters())}, handle)
    accelerator.end_training()


if __name__ == "__main__":
    main()
