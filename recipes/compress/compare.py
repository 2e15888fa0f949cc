"""Turn a folder of compression runs into the README's tables (markdown) and plot.

    python -m recipes.compress.compare recipes/compress/results/smollm2_cpu [--plot out.png]

Tables: perplexity on each text by method and fraction (with the compressed model's bytes), then healing (before
and after, same method and fraction). The plot: perplexity (log) against the model's stored bytes, one line per
method, dashed before healing, points after.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

MIB = 2**20


def load(folder: Path) -> tuple[dict, list[dict], list[dict]]:
    dense = json.loads((folder / "dense.json").read_text()) if (folder / "dense.json").exists() else None
    compressed, healed = [], []
    for path in sorted(folder.glob("*/f*.json")):
        if path.parent.name == "storage_audit":
            continue
        record = json.loads(path.read_text())
        (healed if "heal" in record else compressed).append(record)
    return dense, compressed, healed


def _ppl(value: float) -> str:
    if value >= 1e5:
        return f"{value:.1e}"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def method_order(records: list[dict]) -> list[str]:
    seen = []
    for r in records:
        if r["method"] not in seen:
            seen.append(r["method"])
    preferred = ["dct_energy", "dct_act", "rand_energy", "dct_lowfreq", "rand_lowfreq", "svd", "svd_act", "prune",
                 "prune_act"]
    return [m for m in preferred if m in seen] + [m for m in seen if m not in preferred]


def compression_table(dense: dict, records: list[dict]) -> str:
    texts = list(dense["perplexity"]) if dense else sorted({t for r in records for t in r["perplexity"]})
    fractions = sorted({r["fraction"] for r in records}, reverse=True)
    by = {(r["method"], r["fraction"]): r for r in records}
    head = "| method | " + " | ".join(f"{f:g}: {t_short(t)}" for f in fractions for t in texts) + " |"
    lines = [head, "|---|" + "---|" * (len(fractions) * len(texts))]
    if dense:
        lines.append("| dense | " + " | ".join(_ppl(dense["perplexity"][t]) for f in fractions for t in texts) + " |")
    for method in method_order(records):
        cells = []
        for f in fractions:
            for t in texts:
                r = by.get((method, f))
                cells.append(_ppl(r["perplexity"][t]) if r else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def storage_table(dense: dict, records: list[dict]) -> str:
    fractions = sorted({r["fraction"] for r in records}, reverse=True)
    by = {(r["method"], r["fraction"]): r for r in records}
    lines = ["| method | index set | " + " | ".join(f"{f:g}" for f in fractions) + " |",
             "|---|---|" + "---|" * len(fractions)]
    if records:
        d = records[0]["storage"]["dense_model_bytes"]
        lines.append("| dense | | " + " | ".join(f"{d / MIB:.0f} MiB" for _ in fractions) + " |")
    for method in method_order(records):
        cells, index = [], ""
        for f in fractions:
            r = by.get((method, f))
            if r:
                s = r["storage"]
                index = s["index"]
                cells.append(f"{s['model_bytes'] / MIB:.0f} MiB ({s['model_bytes'] / s['dense_model_bytes']:.0%})")
            else:
                cells.append("")
        lines.append(f"| {method} | {index} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def t_short(text: str) -> str:
    return {"shakespeare": "Shak.", "rotten_tomatoes": "RT"}.get(text, text)


def heal_table(compressed: list[dict], healed: list[dict]) -> str:
    before = {(r["method"], r["fraction"]): r for r in compressed}
    groups = defaultdict(list)
    for r in healed:
        groups[(r["method"], r["fraction"], r["heal"]["optimizer"])].append(r)
    texts = sorted({t for r in healed for t in r["perplexity"]}, key=lambda t: t != "shakespeare")
    lines = ["| method | fraction | optimiser | seeds | " + " | ".join(f"{t_short(t)} before | {t_short(t)} after" for t in texts)
             + " | first / last loss | s/step | wall |",
             "|---|---|---|---|" + "---|---|" * len(texts) + "---|---|---|"]
    for (method, fraction, optimizer), runs in sorted(groups.items(), key=lambda kv: (-kv[0][1], method_order(healed).index(kv[0][0]), kv[0][2])):
        b = before.get((method, fraction))
        cells = []
        for t in texts:
            after = [r["perplexity"][t] for r in runs]
            cells += [_ppl(b["perplexity"][t]) if b else "", " / ".join(_ppl(a) for a in after)]
        losses = " ; ".join(f"{r['heal']['losses'][0]:.2f} / {r['heal']['losses'][-1]:.2f}" for r in runs)
        steps = sorted(s for r in runs for s in r["heal"]["step_seconds"])  # median over every run's steps
        walls = " / ".join(f"{r['wall_seconds']:.0f}" for r in runs)
        lines.append(
            f"| {method} | {fraction:g} | {optimizer} | {len(runs)} | " + " | ".join(cells)
            + f" | {losses} | {steps[len(steps) // 2]:.1f} | {walls} s |"
        )
    return "\n".join(lines)


def plot(dense: dict, compressed: list[dict], healed: list[dict], out: Path, text: str = "shakespeare") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    colours = {}
    for method in method_order(compressed):
        rows = sorted((r for r in compressed if r["method"] == method), key=lambda r: r["storage"]["model_bytes"])
        xs = [r["storage"]["model_bytes"] / MIB for r in rows]
        ys = [r["perplexity"][text] for r in rows]
        (line,) = ax.plot(xs, ys, "o--", label=f"{method} (before)", alpha=0.8)
        colours[method] = line.get_color()
    for (method, optimizer) in sorted({(r["method"], r["heal"]["optimizer"]) for r in healed}):
        rows = sorted((r for r in healed if r["method"] == method and r["heal"]["optimizer"] == optimizer),
                      key=lambda r: r["storage"]["model_bytes"])
        ax.plot([r["storage"]["model_bytes"] / MIB for r in rows], [r["perplexity"][text] for r in rows],
                "*" if optimizer == "spectral_adamw" else "s", markersize=11, color=colours.get(method),
                label=f"{method} healed ({optimizer})", linestyle="-")
    if dense:
        ax.axhline(dense["perplexity"][text], color="black", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("stored bytes of the model (MiB; embeddings dense, fp32)")
    ax.set_ylabel(f"held-out perplexity ({text})")
    ax.set_title("SmolLM2-135M compressed: perplexity against storage")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines fill the axes
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--plot", default=None, help="where to write the plot (default: FOLDER/perplexity_vs_bytes.png)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    dense, compressed, healed = load(folder)
    print("Perplexity (held-out) by fraction of stored numbers per layer:\n")
    print(compression_table(dense, compressed))
    print("\nStored bytes of the whole model (values + index sets; embeddings and norms dense):\n")
    print(storage_table(dense, compressed))
    if healed:
        print("\nHealing:\n")
        print(heal_table(compressed, healed))
    if compressed:
        plot(dense, compressed, healed, Path(args.plot) if args.plot else folder / "perplexity_vs_bytes.png")


if __name__ == "__main__":
    main()
