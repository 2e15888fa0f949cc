"""``hf-spectral compress``: a pretrained model in replace mode, each layer projected onto its kept
coefficients; reports each layer's error against its dense weight and the saving."""

from __future__ import annotations

import json
import math
import os
import sys

from .common import CLIError, count, fraction, load_model, size_in_bytes, table

LAYOUTS = ("lowfreq", "triangle", "random", "energy", "banded")  # hf_spectral.layouts.LAYOUTS (tested equal)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compress", help="replace-mode compression of a pretrained model (projection onto kept coefficients)",
        description=(
            "Compress a pretrained model: every targeted linear layer keeps FRACTION of its DCT coefficients "
            "(the L2-best approximation on the chosen index set), and the dense weight is dropped. Prints each "
            "layer's relative reconstruction error and the parameter saving, and saves a replace-mode adapter that "
            "holds the whole compressed model."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="model folder or Hub repo id")
    parser.add_argument("--fraction", type=fraction, required=True, help="share of each layer's coefficients kept, in (0, 1]")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the compressed adapter")
    parser.add_argument("--layout", default="energy", choices=LAYOUTS,
                        help="which coefficients are kept (default: energy, the L2-best set for each layer)")
    parser.add_argument("--basis", default="dct", choices=("dct", "random_orthonormal"), help="default: dct")
    parser.add_argument("--target-modules", metavar="A,B", help="comma-separated module names (default: all linear layers but the head)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random and banded layouts")
    parser.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype to load the model in (default float32)")
    parser.add_argument("--revision", help="Hub revision of MODEL")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    parser.set_defaults(func=run)


def _dense_linear_weights(model) -> dict:
    """{module name: its weight as out x in} of every Linear and Conv1D. The tensors are the model's own (no
    copy): replace mode drops the layers' references, and these keep the weights alive until the errors are
    measured."""
    from peft.utils.other import transpose
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return {
        name: transpose(module.weight.detach(), isinstance(module, Conv1D))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module.weight is not None
    }


def run(args) -> int:
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists and is not empty; pick a new folder or add --overwrite.")
    import torch
    from peft import get_peft_model

    from .._peft_registry import PEFT_KEY_PREFIX
    from ..config import SpectralConfig
    from ..ecosystem.model_card import write_model_card
    from ..model import spectral_layers

    targets = args.target_modules.split(",") if args.target_modules else None
    try:
        config = SpectralConfig(
            mode="replace", coefficient_fraction=args.fraction, layout=args.layout, basis=args.basis,
            seed=args.seed, init_weights="project", target_modules=targets,
        )
    except ValueError as error:
        raise CLIError(str(error)) from None

    print(f"loading {args.model} ...", file=sys.stderr)
    model = load_model(args.model, args.revision, args.dtype)
    before = sum(p.numel() for p in model.parameters())
    weights = _dense_linear_weights(model)

    print("projecting layers ...", file=sys.stderr)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # no target found, a budget that does not fit, ...
        raise CLIError(str(error).splitlines()[0]) from None

    records = []
    for name, layer in spectral_layers(peft_model):
        key = name.removeprefix(PEFT_KEY_PREFIX)
        # measured, not inferred: ||W - W_K||_F / ||W||_F in float64 against the dense weight (Parseval's
        # ||W||^2 - ||S_K||^2 would lose the small errors to cancellation: ~2e-4 at fraction 1 in float32)
        dense = weights.pop(key).to(torch.float64)
        with torch.no_grad():
            rebuilt = layer.rebuild("default").detach().to(torch.float64)
        total = float(dense.square().sum())
        error = math.sqrt(float((dense - rebuilt).square().sum()) / total) if total > 0 else 0.0
        records.append({"name": key, "shape": [layer.out_features, layer.in_features],
                        "n_coefficients": layer.spectral_coefficients["default"].numel(), "relative_error": error})
    del weights  # the dense weights go now
    after = sum(p.numel() for p in peft_model.parameters())
    dense_targets = sum(r["shape"][0] * r["shape"][1] for r in records)
    kept = sum(r["n_coefficients"] for r in records)

    rows = [
        [r["name"], f"{r['shape'][0]} x {r['shape'][1]}", str(r["n_coefficients"]), f"{r['relative_error']:.4f}"]
        for r in records
    ]
    print(table(rows, ["layer", "shape (out x in)", "K", "rel. error ||W - W_K|| / ||W||"]))
    total_error = math.sqrt(sum(r["relative_error"] ** 2 for r in records) / max(len(records), 1))
    print()
    print(f"compressed layers: {len(records)} (layout {args.layout}, basis {args.basis}, fraction {args.fraction})")
    print(f"mean relative error (root mean square over layers): {total_error:.4f}")
    print(
        f"those layers: {count(dense_targets)} -> {count(kept)} parameters "
        f"(saving {count(dense_targets - kept)}, {1 - kept / dense_targets:.1%})"
    )
    print(
        f"whole model:  {count(before)} -> {count(after)} parameters "
        f"(saving {count(before - after)}, {1 - after / before:.1%})"
    )

    os.makedirs(args.out, exist_ok=True)
    peft_model.save_pretrained(args.out)
    write_model_card(args.out, base_model=args.model)
    report = {
        "model": args.model, "fraction": args.fraction, "layout": args.layout, "basis": args.basis,
        "seed": args.seed, "parameters_before": before, "parameters_after": after,
        "compressed_layer_parameters_before": dense_targets, "compressed_layer_parameters_after": kept,
        "layers": records,
    }
    with open(os.path.join(args.out, "compression.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved to {args.out} ({size_in_bytes(size)}); load it with: import hf_spectral; "
          f"PeftModel.from_pretrained(<the base model>, {args.out!r})")
    return 0
