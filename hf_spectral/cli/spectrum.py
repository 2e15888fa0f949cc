"""``hf-spectral spectrum``: where each layer's energy sits in the 2-D DCT domain, and its stable rank."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from typing import Optional

from .common import CLIError, check_source, image_path, load_model, model_order, positive_int, progress, regex, table

# The smaller side up to which ||W||_2 comes from an exact eigensolve of the Gram matrix; above it, LOBPCG.
EXACT_GRAM_UP_TO = 2048


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "spectrum", help="plot where each layer's energy sits in the DCT domain, and its stable rank",
        description=(
            "Plot, for each linear layer of a model (its weight) or of a spectral adapter (its weight in replace mode, "
            "its update in delta mode), the log energy of its 2-D DCT coefficients (pooled to --bins x --bins) and a "
            "bar chart of stable ranks ||W||_F^2 / ||W||_2^2."
        ),
    )
    parser.add_argument("source", metavar="MODEL_OR_ADAPTER", help="model or adapter folder, or a Hub repo id")
    parser.add_argument("--out", required=True, type=image_path, metavar="FILE.png", help="the figure")
    parser.add_argument("--json", metavar="FILE.json", help="also write the numbers per layer as JSON")
    parser.add_argument("--layers", type=regex, metavar="REGEX", help="only layers whose name matches")
    parser.add_argument("--max-panels", type=positive_int, default=12, help="heatmaps drawn (default 12)")
    parser.add_argument("--bins", type=positive_int, default=64, help="heatmap resolution (default 64)")
    parser.add_argument("--revision", help="Hub revision")
    parser.set_defaults(func=run)


def _is_adapter(name: str, revision: Optional[str]) -> bool:
    from ..ecosystem.adapter_files import CONFIG_NAME

    if check_source(name, revision, CONFIG_NAME, "model or adapter") == "local":
        if os.path.isdir(name):
            return os.path.isfile(os.path.join(name, CONFIG_NAME))
        if name.endswith(".gguf"):
            return False
        raise CLIError(f"{name!r} is a file; give a model or adapter folder, a .gguf file, or a Hub repo id.")
    from huggingface_hub import constants, file_exists, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:  # check_source found a cached copy
        return isinstance(try_to_load_from_cache(name, CONFIG_NAME, revision=revision), str)
    try:
        return file_exists(name, CONFIG_NAME, revision=revision)
    except RepositoryNotFoundError:
        raise CLIError(f"the Hub has no repo {name!r} (or it is private: log in with `hf auth login`).") from None


def _model_matrices(args):
    """[(name, out x in weight)] of every linear layer of a pretrained model, head excluded."""
    from peft.utils.other import transpose
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model = load_model(args.source, args.revision, "float32")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, transpose(module.weight, isinstance(module, Conv1D)).detach())
        for name, module in model.named_modules()
        if module is not head and isinstance(module, (nn.Linear, Conv1D))
    ]


@contextlib.contextmanager
def _one_thread():
    """Per-layer linear algebra on one thread: a Gram eigensolve of a few hundred rows gains nothing from more,
    and on a busy machine OpenMP threads that wait for each other make it many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spectral_norm(matrix, exact_up_to: int = EXACT_GRAM_UP_TO) -> float:
    """``||W||_2``, the largest singular value, without an SVD.

    ``sigma_max(W)^2`` is the largest eigenvalue of the Gram matrix of W's smaller side (k x k, k = min(m, n)).
    For k <= ``exact_up_to`` an eigensolve in float64 gives it to rounding (its relative error is about
    1e-15, squared singular values are well conditioned at the top); for larger k, LOBPCG on the same Gram
    matrix, to a relative residual of 1e-10 (``tests/test_cli.py`` checks both against numpy's SVD).
    """
    import torch

    w = matrix.detach().to(torch.float64)
    m, n = w.shape
    if w.numel() == 0:
        return 0.0
    gram = w @ w.T if m <= n else w.T @ w
    if min(m, n) <= max(exact_up_to, 2):
        top = float(torch.linalg.eigvalsh(gram)[-1])
    else:
        start = torch.randn(gram.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        values, _ = torch.lobpcg(gram, k=1, X=start, largest=True, tol=1e-10, niter=1000)
        top = float(values[0])
    return math.sqrt(max(top, 0.0))


def _analyse(matrix, bins: int) -> dict:
    import torch
    import torch.nn.functional as F

    from ..coefficient_space import CoefficientSpace

    w = matrix.to(torch.float64)
    m, n = w.shape
    energy = CoefficientSpace(m, n, block=(m, n)).all_coefficients(w) ** 2
    total = float(energy.sum())
    fro2 = float((w * w).sum())
    spectral = spectral_norm(w) if fro2 > 0 else 0.0
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
        raise CLIError("spectrum needs matplotlib: pip install matplotlib (in a checkout: pip install -e '.[recipes]').") from None
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


def run(args) -> int:
    if args.layers is not None:
        pattern = re.compile(args.layers)
    if _is_adapter(args.source, args.revision):
        from ..ecosystem.adapter_files import layer_matrices, read_adapter

        summary = read_adapter(args.source, revision=args.revision)
        summary.layers.sort(key=lambda layer: model_order(layer.name))  # the file lists them alphabetically
        what = "update" if summary.mode == "delta" else "weight"
        title = f"{args.source} (spectral {summary.mode} adapter: each layer's {what})"
        count = len(summary.layers)
        source = ((layer.name, matrix) for layer, matrix in layer_matrices(summary))
    else:
        title = f"{args.source} (dense weights)"
        source = _model_matrices(args)
        count = len(source)

    results = []
    with _one_thread():
        for name, matrix in progress(source, total=count, desc="analysing layers", unit="layer"):
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
    print(table(rows, ["layer", "shape (out x in)", "stable rank", "max rank", "energy in lowest quarter"]))
    print(f"\nwrote {args.out}")
    if args.json:
        data = {"source": args.source, "layers": [{"name": n, **{k: v for k, v in r.items() if k != "heatmap"}}
                                                  for n, r in results]}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        print(f"wrote {args.json}")
    return 0

