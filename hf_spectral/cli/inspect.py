"""``hf-spectral inspect``: what a saved adapter holds, read from its files alone."""

from __future__ import annotations

import json

from .common import check_source, count, model_order, size_in_bytes, table


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "inspect", help="what a saved adapter holds: mode, layout, K and shape per layer, sizes",
        description="Show a spectral adapter's mode, layout, K and shape per layer, parameter counts and size on disk.",
    )
    parser.add_argument("adapter", metavar="DIR_OR_REPO", help="adapter folder, or a Hub repo id (owner/name)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..io.adapter_files import CONFIG_NAME, read_adapter

    check_source(args.adapter, args.revision, CONFIG_NAME, "adapter")
    summary = read_adapter(args.adapter, revision=args.revision)
    summary.layers.sort(key=lambda layer: model_order(layer.name))  # the file lists them alphabetically
    config = summary.config
    layers = [
        {
            "name": layer.name,
            "shape": list(layer.shape) if layer.shape else None,
            "n_coefficients": layer.n_coefficients,
            "fraction": layer.n_coefficients / layer.dense_parameters if layer.shape else None,
            "indices": "saved" if layer.has_saved_indices else "recomputed",
        }
        for layer in summary.layers
    ]
    report = {
        "adapter": args.adapter,
        "folder": summary.path,
        "mode": summary.mode,
        "layout": config.get("layout"),
        "basis": config.get("basis"),
        "scaling": config.get("scaling"),
        "seed": config.get("seed"),
        "base_model": summary.base_model,
        "spectral_parameters": summary.spectral_parameters,
        "other_parameters": summary.other_parameters,
        "total_parameters": summary.total_parameters,
        "dense_parameters_of_spectral_layers": summary.dense_parameters,
        "size_on_disk": summary.size_on_disk,
        "files": summary.file_sizes,
        "layers": layers,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    scaling = f"   scaling: {config.get('scaling')}" if summary.mode == "delta" else ""
    print(f"adapter: {args.adapter}" + (f"  ({summary.path})" if summary.path != args.adapter else ""))
    print(
        f"method: spectral   mode: {summary.mode}   layout: {config.get('layout')}   basis: {config.get('basis')}"
        f"{scaling}   seed: {config.get('seed')}"
    )
    print(f"base model: {summary.base_model or 'not recorded'}")
    ks = sorted({layer.n_coefficients for layer in summary.layers})
    print(
        f"spectral layers: {len(summary.layers)}   K per layer: {ks[0] if len(ks) == 1 else f'{ks[0]}..{ks[-1]}'}"
        f"   spectral coefficients: {count(summary.spectral_parameters)}"
    )
    if summary.dense_parameters:
        print(
            f"dense weights of these layers: {count(summary.dense_parameters)} "
            f"(the coefficients are {summary.spectral_parameters / summary.dense_parameters:.2%} of them)"
        )
    if summary.other_parameters:
        print(
            f"other saved parameters: {count(summary.other_parameters)} in {len(summary.other_tensors)} tensors "
            "(replace mode: embeddings, norms, biases, head)"
        )
    print(f"parameters in the adapter: {count(summary.total_parameters)}")
    files = ", ".join(f"{name} {size_in_bytes(size)}" for name, size in summary.file_sizes.items())
    print(f"size on disk: {size_in_bytes(summary.size_on_disk)} ({files})")
    print()
    rows = [
        [
            layer["name"],
            f"{layer['shape'][0]} x {layer['shape'][1]}" if layer["shape"] else "?",
            str(layer["n_coefficients"]),
            f"{layer['fraction']:.2%}" if layer["fraction"] is not None else "?",
            layer["indices"],
        ]
        for layer in layers
    ]
    print(table(rows, ["layer", "shape (out x in)", "K", "K / (out x in)", "index set"]))
    return 0

