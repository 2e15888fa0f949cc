"""Turn folders of run.json files into the comparison table (markdown) and a plot of the loss curves.

    python -m recipes.spectral_mixing.compare runs/spectral_mixing/quick [runs/spectral_mixing/quick_1024 ...]
        [--plot recipes/spectral_mixing/results/curves.png] [--json recipes/spectral_mixing/results/quick.json]

One row per (context, arm): parameters (all, and those of the token mixers), validation loss (mean over seeds,
min-max when there are several), the difference to attention at the same context, training tokens/s and wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ORDER = {"attention": 0, "mixer": 1, "mixer_spectral": 2}


def collect(folders: list[str]) -> list[dict]:
    runs = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*/seed*/run.json")):
            runs.append(json.loads(path.read_text()))
    if not runs:
        raise FileNotFoundError(f"no */seed*/run.json under {folders}: run recipes.spectral_mixing.sweep first")
    return runs


def rows(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        s = run["settings"]
        groups.setdefault((s["block_size"], s["arm"]), []).append(run)
    table = []
    for (context, arm), group in sorted(groups.items(), key=lambda kv: (kv[0][0], ORDER.get(kv[0][1], 9))):
        losses = [r["val_loss"] for r in group]
        table.append({
            "context": context,
            "arm": arm,
            "seeds": len(group),
            "parameters": group[0]["parameters"]["total"],
            "mixing_parameters": group[0]["parameters"]["mixing"],
            "n_atoms": group[0].get("n_atoms"),
            "tokens": group[0]["tokens"],
            "val_loss": statistics.mean(losses),
            "val_min": min(losses),
            "val_max": max(losses),
            "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in group),
            "train_seconds": statistics.mean(r["train_seconds"] for r in group),
        })
    for row in table:
        base = [r for r in table if r["context"] == row["context"] and r["arm"] == "attention"]
        row["vs_attention"] = row["val_loss"] - base[0]["val_loss"] if base else None
    return table


def markdown(table: list[dict]) -> str:
    lines = [
        "| context | arm | K | params (mixing) | tokens | val loss | vs attention | train tokens/s | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        loss = f"{r['val_loss']:.3f}" + (f" ({r['val_min']:.3f}-{r['val_max']:.3f}, {r['seeds']} seeds)" if r["seeds"] > 1 else "")
        diff = "" if r["arm"] == "attention" or r["vs_attention"] is None else f"{r['vs_attention']:+.3f}"
        lines.append(
            f"| {r['context']:,} | {r['arm']} | {r['n_atoms'] or ''} | {r['parameters']:,} ({r['mixing_parameters']:,}) | "
            f"{r['tokens']:,} | {loss} | {diff} | {r['tokens_per_second']:,.0f} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["settings"]["block_size"] for r in runs})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for run in sorted((r for r in runs if r["settings"]["block_size"] == context),
                          key=lambda r: (ORDER.get(r["settings"]["arm"], 9), r["settings"]["seed"])):
            tokens, losses = zip(*run["train_curve"])
            window = 10
            smooth = [statistics.mean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
            label = f"{run['settings']['arm']} (seed {run['settings']['seed']})"
            line, = ax.plot(tokens, smooth, label=label)
            vt, vl = zip(*run["val_curve"])
            ax.plot(vt, vl, "o", color=line.get_color())
        ax.set_title(f"context {context}: train loss (10-step mean), validation (dots)")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss (nats/char)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--plot", help="write the loss curves to this PNG")
    parser.add_argument("--json", help="write the table's rows to this JSON")
    args = parser.parse_args(argv)
    runs = collect(args.folders)
    table = rows(runs)
    print(markdown(table))
    if args.plot:
        plot(runs, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "runs": runs}, indent=1))
    return table


if __name__ == "__main__":
    main()
