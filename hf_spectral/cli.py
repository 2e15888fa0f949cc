"""The ``hf-spectral`` command line: inspect an adapter, compress a model, plot layer spectra.

    hf-spectral inspect DIR_OR_REPO [--json]
    hf-spectral compress MODEL --fraction 0.5 --out DIR [--layout lowfreq]
    hf-spectral spectrum MODEL_OR_ADAPTER --out spectrum.png [--json spectrum.json]

Bad arguments get a one-line message and a non-zero exit (2 for usage, 1 for a failure),
never a traceback; ``--debug`` shows it. Model loading and plotting libraries are imported inside
the commands that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from typing import Optional

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class CLIError(Exception):
    """A failure the user can fix; the message says how."""


# --------------------------------------------------------------------------------------------------
# small helpers


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction in (0, 1], e.g. 0.5") from None
    if not (0.0 < value <= 1.0) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]; e.g. 0.5 keeps half of each layer's coefficients")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _image_path(text: str) -> str:
    if not text.lower().endswith(IMAGE_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({error})") from None
    return text


def _count(n: int) -> str:
    return f"{n:,}"


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def _progress(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def _quiet_libraries():
    """transformers' and PEFT's advisory warnings would bury the report; errors still surface."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)


def _load_model(name: str, revision: Optional[str], dtype: str):
    """A pretrained model from a folder or the Hub: causal LM if it is one, else the bare model."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as error:  # no such folder or repo, no config.json, an unknown model type
        raise CLIError(f"cannot load a model from {name!r}: {str(error).strip().splitlines()[0]}") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch_dtype)
    except ValueError:  # not a causal LM (an encoder, say): its body has the same linear layers
        return AutoModel.from_pretrained(name, revision=revision, dtype=torch_dtype, config=config)


# --------------------------------------------------------------------------------------------------
# inspect


def cmd_inspect(args) -> int:
    from .ecosystem.adapter_files import read_adapter

    summary = read_adapter(args.adapter, revision=args.revision)
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
        f"   spectral coefficients: {_count(summary.spectral_parameters)}"
    )
    if summary.dense_parameters:
        print(
            f"dense weights of these layers: {_count(summary.dense_parameters)} "
            f"(the coefficients are {summary.spectral_parameters / summary.dense_parameters:.2%} of them)"
        )
    if summary.other_parameters:
        print(
            f"other saved parameters: {_count(summary.other_parameters)} in {len(summary.other_tensors)} tensors "
            "(replace mode: embeddings, norms, biases, head)"
        )
    print(f"parameters in the adapter: {_count(summary.total_parameters)}")
    files = ", ".join(f"{name} {_bytes(size)}" for name, size in summary.file_sizes.items())
    print(f"size on disk: {_bytes(summary.size_on_disk)} ({files})")
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
    print(_table(rows, ["layer", "shape (out x in)", "K", "K / (out x in)", "index set"]))
    return 0


# --------------------------------------------------------------------------------------------------
# compress


@contextlib.contextmanager
def _each_new_layer(callback):
    """Call ``callback(key, dense_weight, new_layer)`` as PEFT swaps each targeted layer (for progress and errors).

    The dense weight is still referenced here while the callback runs, so the reconstruction error is
    measured layer by layer without keeping a second copy of the model.
    """
    from peft.utils.other import transpose
    from transformers.pytorch_utils import Conv1D

    from .model import SpectralModel

    original = SpectralModel._create_and_replace

    def wrapped(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        weight = transpose(base.weight, isinstance(base, Conv1D)).detach()
        original(self, config, adapter_name, target, target_name, parent, current_key, **kwargs)
        callback(current_key, weight, getattr(parent, target_name))

    SpectralModel._create_and_replace = wrapped
    try:
        yield
    finally:
        SpectralModel._create_and_replace = original


def cmd_compress(args) -> int:
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists and is not empty; pick a new folder or add --overwrite.")
    import torch
    from peft import get_peft_model

    from .config import SpectralConfig
    from .ecosystem.model_card import write_model_card

    targets = args.target_modules.split(",") if args.target_modules else None
    try:
        config = SpectralConfig(
            mode="replace", coefficient_fraction=args.fraction, layout=args.layout, basis=args.basis,
            seed=args.seed, init_weights="project", target_modules=targets,
        )
    except ValueError as error:
        raise CLIError(str(error)) from None

    print(f"loading {args.model} ...", file=sys.stderr)
    model = _load_model(args.model, args.revision, args.dtype)
    before = sum(p.numel() for p in model.parameters())

    records = []
    bar = _progress(desc="projecting layers", unit="layer")

    def measure(key, weight, layer):
        with torch.no_grad():
            rebuilt = layer.rebuild("default").to(torch.float64)
            dense = weight.to(torch.float64)
            error = float(torch.linalg.norm(rebuilt - dense) / torch.linalg.norm(dense).clamp_min(1e-30))
        k = layer.spectral_coefficients["default"].numel()
        records.append({"name": key, "shape": [layer.out_features, layer.in_features], "n_coefficients": k,
                        "relative_error": error})
        bar.update(1)

    try:
        with _each_new_layer(measure):
            peft_model = get_peft_model(model, config)
    except ValueError as error:  # no target found, a budget that does not fit, ...
        raise CLIError(str(error).splitlines()[0]) from None
    finally:
        bar.close()
    after = sum(p.numel() for p in peft_model.parameters())
    dense_targets = sum(r["shape"][0] * r["shape"][1] for r in records)
    kept = sum(r["n_coefficients"] for r in records)

    rows = [
        [r["name"], f"{r['shape'][0]} x {r['shape'][1]}", str(r["n_coefficients"]), f"{r['relative_error']:.4f}"]
        for r in records
    ]
    print(_table(rows, ["layer", "shape (out x in)", "K", "rel. error ||W - W_K|| / ||W||"]))
    total_error = math.sqrt(sum(r["relative_error"] ** 2 for r in records) / max(len(records), 1))
    print()
    print(f"compressed layers: {len(records)} (layout {args.layout}, basis {args.basis}, fraction {args.fraction})")
    print(f"mean relative error (root mean square over layers): {total_error:.4f}")
    print(
        f"those layers: {_count(dense_targets)} -> {_count(kept)} parameters "
        f"(saving {_count(dense_targets - kept)}, {1 - kept / dense_targets:.1%})"
    )
    print(
        f"whole model:  {_count(before)} -> {_count(after)} parameters "
        f"(saving {_count(before - after)}, {1 - after / before:.1%})"
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
    print(f"saved to {args.out} ({_bytes(size)}); load it with: import hf_spectral; "
          f"PeftModel.from_pretrained(<the base model>, {args.out!r})")
    return 0


# --------------------------------------------------------------------------------------------------
# spectrum


def _is_adapter(name: str, revision: Optional[str]) -> bool:
    from .ecosystem.adapter_files import CONFIG_NAME

    if os.path.isdir(name):
        return os.path.isfile(os.path.join(name, CONFIG_NAME))
    if os.path.exists(name):
        raise CLIError(f"{name!r} is a file; give a model or adapter folder, or a Hub repo id.")
    from huggingface_hub import file_exists
    from huggingface_hub.errors import HFValidationError

    try:
        return file_exists(name, CONFIG_NAME, revision=revision)
    except HFValidationError:
        raise CLIError(f"{name!r} is neither a local folder nor a valid Hub repo id (owner/name).") from None
    except Exception:  # offline or repo missing: let the model loader say what is wrong
        return False


def _model_matrices(args):
    """[(name, out x in weight)] of every linear layer of a pretrained model, head excluded."""
    from peft.utils.other import transpose
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model = _load_model(args.source, args.revision, "float32")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, transpose(module.weight, isinstance(module, Conv1D)).detach())
        for name, module in model.named_modules()
        if module is not head and isinstance(module, (nn.Linear, Conv1D))
    ]


def _analyse(matrix, bins: int) -> dict:
    import torch
    import torch.nn.functional as F

    from .dct import dct2

    w = matrix.to(torch.float64)
    m, n = w.shape
    energy = dct2(w) ** 2
    total = float(energy.sum())
    fro2 = float((w * w).sum())
    spectral = float(torch.linalg.matrix_norm(w, ord=2)) if fro2 > 0 else 0.0
    heat = F.adaptive_avg_pool2d(energy[None, None], (min(bins, m), min(bins, n)))[0, 0]
    return {
        "shape": [m, n],
        "frobenius_norm": math.sqrt(fro2),
        "stable_rank": fro2 / spectral**2 if spectral > 0 else 0.0,
        "max_rank": min(m, n),
        # a white-noise matrix puts 25% of its energy in the lowest quarter of frequencies
        "energy_share_low_quarter": float(energy[: (m + 1) // 2, : (n + 1) // 2].sum()) / total if total > 0 else 0.0,
        "heatmap": heat.float(),
    }


def _plot(results: list[tuple[str, dict]], title: str, out: str, max_panels: int) -> None:
    try:
        import matplotlib
    except ImportError:
        raise CLIError("spectrum needs matplotlib: pip install 'hf-spectral[recipes]' (or matplotlib).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if len(results) > max_panels:  # evenly spaced layers, first and last included
        picks = sorted({round(i * (len(results) - 1) / max(max_panels - 1, 1)) for i in range(max_panels)})
    else:
        picks = list(range(len(results)))
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols) + 1
    height = 2.6 * rows + 1.6
    fig = plt.figure(figsize=(3.2 * cols + 1.0, height))
    grid = fig.add_gridspec(
        rows, cols + 1, width_ratios=[1] * cols + [0.06], height_ratios=[1] * (rows - 1) + [1.2],
        left=0.08, right=0.94, top=1 - 1.05 / height, bottom=1.3 / height, hspace=0.75, wspace=0.35,
    )
    # each layer's energy as a share of its total, on one colour scale spanning five decades
    shares = [results[i][1]["heatmap"].double().numpy() for i in picks]
    shares = [h / h.sum() if h.sum() > 0 else h for h in shares]
    top = max(float(h.max()) for h in shares) or 1.0
    vmin, vmax = np.log10(top) - 5, np.log10(top)
    image = None
    for slot, (index, share) in enumerate(zip(picks, shares, strict=True)):
        name, result = results[index]
        ax = fig.add_subplot(grid[slot // cols, slot % cols])
        m, n = result["shape"]
        image = ax.imshow(np.log10(np.maximum(share, 10**vmin)), cmap="magma", vmin=vmin, vmax=vmax, aspect="auto",
                          interpolation="nearest", extent=(0, n, m, 0))  # axes in frequency index, whatever the pooling
        ax.set_title(f"{name}\n{m}x{n}, stable rank {result['stable_rank']:.1f}", fontsize=7)
        ax.set_xlabel("input frequency", fontsize=7, labelpad=1)
        ax.set_ylabel("output frequency", fontsize=7, labelpad=1)
        ax.tick_params(labelsize=6)
    bar = fig.colorbar(image, cax=fig.add_subplot(grid[: rows - 1, cols]))
    bar.set_label("log10 share of the layer's energy per bin", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    ax = fig.add_subplot(grid[rows - 1, :cols])
    ax.bar(range(len(results)), [r["stable_rank"] for _, r in results], color="tab:blue")
    ax.set_ylabel("stable rank", fontsize=8)
    ax.set_title("stable rank ||W||_F^2 / ||W||_2^2 of every layer, in model order", fontsize=8)
    if len(results) <= 64:
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([name for name, _ in results], rotation=90, fontsize=5)
    ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}\nwhere each layer's energy sits in the 2-D DCT domain (pooled), and stable ranks", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cmd_spectrum(args) -> int:
    if args.layers is not None:
        pattern = re.compile(args.layers)
    if _is_adapter(args.source, args.revision):
        from .ecosystem.adapter_files import layer_matrices, read_adapter

        summary = read_adapter(args.source, revision=args.revision)
        what = "update" if summary.mode == "delta" else "weight"
        title = f"{args.source} (spectral {summary.mode} adapter: each layer's {what})"
        count = len(summary.layers)
        source = ((layer.name, matrix) for layer, matrix in layer_matrices(summary))
    else:
        title = f"{args.source} (dense weights)"
        source = _model_matrices(args)
        count = len(source)

    results = []
    for name, matrix in _progress(source, total=count, desc="analysing layers", unit="layer"):
        if args.layers is not None and not pattern.search(name):
            continue
        results.append((name, _analyse(matrix, args.bins)))
    if not results:
        raise CLIError(f"no linear layers matched in {args.source!r}" + (f" (--layers {args.layers!r})" if args.layers else ""))
    _plot(results, title, args.out, args.max_panels)
    rows = [
        [name, f"{r['shape'][0]} x {r['shape'][1]}", f"{r['stable_rank']:.2f}", str(r["max_rank"]),
         f"{r['energy_share_low_quarter']:.1%}"]
        for name, r in results
    ]
    print(_table(rows, ["layer", "shape (out x in)", "stable rank", "max rank", "energy in lowest quarter"]))
    print(f"\nwrote {args.out}")
    if args.json:
        data = {"source": args.source, "layers": [{"name": n, **{k: v for k, v in r.items() if k != "heatmap"}}
                                                  for n, r in results]}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    from .layouts import LAYOUTS

    parser = argparse.ArgumentParser(
        prog="hf-spectral",
        description="Spectral (DCT-coefficient) adapters for Hugging Face models: inspect, compress, analyse.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect", help="what a saved adapter holds: mode, layout, K and shape per layer, sizes",
        description="Show a spectral adapter's mode, layout, K and shape per layer, parameter counts and size on disk.",
    )
    inspect.add_argument("adapter", metavar="DIR_OR_REPO", help="adapter folder, or a Hub repo id (owner/name)")
    inspect.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=cmd_inspect)

    compress = commands.add_parser(
        "compress", help="replace-mode compression of a pretrained model (projection onto kept coefficients)",
        description=(
            "Compress a pretrained model: every targeted linear layer keeps FRACTION of its DCT coefficients "
            "(the L2-best approximation on the chosen index set), and the dense weight is dropped. Prints each "
            "layer's relative reconstruction error and the parameter saving, and saves a replace-mode adapter that "
            "holds the whole compressed model."
        ),
    )
    compress.add_argument("model", metavar="MODEL", help="model folder or Hub repo id")
    compress.add_argument("--fraction", type=_fraction, required=True, help="share of each layer's coefficients kept, in (0, 1]")
    compress.add_argument("--out", required=True, metavar="DIR", help="folder for the compressed adapter")
    compress.add_argument("--layout", default="energy", choices=LAYOUTS,
                          help="which coefficients are kept (default: energy, the L2-best set for each layer)")
    compress.add_argument("--basis", default="dct", choices=("dct", "random_orthonormal"), help="default: dct")
    compress.add_argument("--target-modules", metavar="A,B", help="comma-separated module names (default: all linear layers but the head)")
    compress.add_argument("--seed", type=int, default=0, help="seed of the random and banded layouts")
    compress.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"),
                          help="dtype to load the model in (default float32)")
    compress.add_argument("--revision", help="Hub revision of MODEL")
    compress.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    compress.set_defaults(func=cmd_compress)

    spectrum = commands.add_parser(
        "spectrum", help="plot where each layer's energy sits in the DCT domain, and its stable rank",
        description=(
            "Plot, for each linear layer of a model (its weight) or of a spectral adapter (its weight in replace mode, "
            "its update in delta mode), the log energy of its 2-D DCT coefficients (pooled to --bins x --bins) and a "
            "bar chart of stable ranks ||W||_F^2 / ||W||_2^2."
        ),
    )
    spectrum.add_argument("source", metavar="MODEL_OR_ADAPTER", help="model or adapter folder, or a Hub repo id")
    spectrum.add_argument("--out", required=True, type=_image_path, metavar="FILE.png", help="the figure")
    spectrum.add_argument("--json", metavar="FILE.json", help="also write the numbers per layer as JSON")
    spectrum.add_argument("--layers", type=_regex, metavar="REGEX", help="only layers whose name matches")
    spectrum.add_argument("--max-panels", type=_positive_int, default=12, help="heatmaps drawn (default 12)")
    spectrum.add_argument("--bins", type=_positive_int, default=64, help="heatmap resolution (default 64)")
    spectrum.add_argument("--revision", help="Hub revision")
    spectrum.set_defaults(func=cmd_spectrum)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hf-spectral")
    except Exception:
        return "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``hf-spectral``; returns the exit status (0 ok, 1 failure, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and the error
        return int(exit_.code or 0)
    try:
        with _quiet_libraries():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("hf-spectral: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        kind = "" if isinstance(error, CLIError) else f"{type(error).__name__}: "
        message = str(error).strip() or repr(error)
        print(f"hf-spectral {args.command}: error: {kind}{message}", file=sys.stderr)
        if not isinstance(error, CLIError):
            print("(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
