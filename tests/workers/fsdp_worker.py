"""Spectral layers under FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU processes over gloo.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/workers/fsdp_worker.py --out DIR

For each mode (delta, replace) every rank builds the same tiny GPT-2 with spectral layers, keeps an
unsharded copy as the reference, shards the blocks and the root with ``fully_shard``, and then:
checks that the coefficients are DTensors sharded over the ranks; trains 3 steps (each rank on
its half of the batch; the reference on the whole batch); saves a sharded checkpoint with
torch.distributed.checkpoint as safetensors (one file per rank) and loads it into a differently
initialised sharded model. Each rank writes what it saw to DIR/rank{R}.json for tests/test_fsdp.py.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for its shared helpers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from ecosystem_utils import finish_rank, mean_over_ranks, reference_step, token_rows  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tiny_models import make_gpt2  # noqa: E402
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import hf_spectral  # noqa: E402
from hf_spectral import SpectralConfig  # noqa: E402

CONFIGS = {
    "delta": dict(mode="delta", layout="random", n_coefficients=75, init_weights=False,
                  target_modules=["c_attn", "c_proj", "c_fc"]),
    # lowfreq in replace mode takes the factored forward, which reshapes the (gathered) coefficients
    "replace": dict(mode="replace", layout="lowfreq", coefficient_fraction=0.5),
}


def build(mode: str, seed: int):
    # The evaluation-time weight cache stays on: the no-grad forwards below build it, and the checkpoint load
    # must drop it (FSDP2 gathers the loaded shards into the same memory without a version bump).
    return get_peft_model(make_gpt2(seed=seed), SpectralConfig(**CONFIGS[mode]))


def shard(model) -> None:
    for block in model.base_model.model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def tied_aliases(model) -> set[str]:
    """State-dict names of tied parameters after their first name (GPT-2's lm_head.weight is wte.weight)."""
    first, aliases = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        first.setdefault(id(param), name)
    return aliases


def sharded_state(model) -> dict:
    # safetensors refuses two names for one tensor, so a tied weight is stored once
    aliases = tied_aliases(model)
    return {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def run_mode(mode: str, out: str, rank: int, world: int) -> dict:
    model = build(mode, seed=0)
    reference = copy.deepcopy(model)  # unsharded, trained on the whole batch
    shard(model)

    coefficients = {n: p for n, p in model.named_parameters() if "spectral_coefficients" in n}
    sharding = {
        name: {
            "dtensor": isinstance(p, DTensor),
            "placements": [str(pl) for pl in p.placements] if isinstance(p, DTensor) else None,
            "global": list(p.shape),
            "local": list(p.to_local().shape) if isinstance(p, DTensor) else list(p.shape),
        }
        for name, p in coefficients.items()
    }

    # The optimiser takes the parameters right after fully_shard, before any forward: the root module
    # keeps its parameters unsharded after a forward, and model.parameters() would then hand out the
    # unsharded tensors instead of the sharded DTensors that FSDP2 updates.
    # SGD, not Adam: Adam turns last-bit differences in near-zero gradients into lr-sized steps.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5, momentum=0.9)
    ref_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5, momentum=0.9)

    ids = token_rows(8, seed=7)
    local = ids.chunk(world)[rank]
    before = (logits(model, ids) - logits(reference, ids)).abs().max().item()
    losses, ref_losses = [], []
    model.train()
    reference.train()
    for _ in range(3):
        loss = model(input_ids=local, labels=local).loss
        loss.backward()  # FSDP reduce-scatters the mean gradient over ranks
        optimizer.step()
        optimizer.zero_grad()
        losses.append(mean_over_ranks(loss, world))
        ref_losses.append(reference_step(reference, ref_optimizer, ids))
    model.eval()
    reference.eval()
    ref_params = dict(reference.named_parameters())
    trained_diff = max(
        (p.full_tensor() - ref_params[n]).abs().max().item() for n, p in coefficients.items()
    )
    after = (logits(model, ids) - logits(reference, ids)).abs().max().item()

    # a sharded checkpoint: every rank writes its own shards, as safetensors
    folder = os.path.join(out, f"checkpoint-{mode}")
    dcp.save(sharded_state(model), storage_writer=HuggingFaceStorageWriter(folder, save_distributed=True))
    dist.barrier()

    restored = build(mode, seed=1)  # other initial values, so a load that does nothing shows
    # the evaluation cache holds the dense weight the dense path reads (a lowfreq block would take the cheaper
    # factored path, which caches nothing): force dense so the check below sees a cache to drop
    hf_spectral.set_compute_path(restored, "dense")
    shard(restored)
    mismatch_before_load = (logits(restored, ids) - logits(model, ids)).abs().max().item()
    cached_before = [m for m in restored.modules() if getattr(m, "_weight_cache", None) is not None]
    state = sharded_state(restored)
    dcp.load(state, storage_reader=HuggingFaceStorageReader(folder))
    set_model_state_dict(restored, state, options=StateDictOptions(strict=False))  # the alias follows its tie
    restored.eval()
    loaded_diff = (logits(restored, ids) - logits(model, ids)).abs().max().item()
    cached_after = [m for m in restored.modules() if getattr(m, "last_compute_path", None) == "cached"]

    return {
        "sharding": sharding,
        "logits_diff_before_training": before,
        "losses": losses,
        "reference_losses": ref_losses,
        "coefficients_diff_after_training": trained_diff,
        "logits_diff_after_training": after,
        "checkpoint_files": sorted(os.listdir(folder)),
        "logits_diff_before_load": mismatch_before_load,
        "logits_diff_after_load": loaded_diff,
        "layers_with_a_cached_weight_before_load": len(cached_before),
        "layers_evaluated_from_the_cache_after_load": len(cached_after),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world, "modes": {mode: run_mode(mode, args.out, rank, world) for mode in CONFIGS}}
    finish_rank(args.out, rank, results, indent=1)


if __name__ == "__main__":
    main()
