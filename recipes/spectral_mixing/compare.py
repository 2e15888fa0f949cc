"""Turn folders of run.json files into the comparison tables (markdown) and a plot of the loss curves.

    python -m recipes.spectral_mixing.compare runs/spectral_mixing/fair [more folders ...]
        [--plot recipes/spectral_mixing/results/curves.png] [--json recipes/spectral_mixing/results/fair.json]

Three readings, each arm at its own best learning rate (the lowest best-validation loss, mean over seeds):
- the sweep: one row per (context, arm, learning rate): final and best validation loss (mean over seeds,
  min-max when there are several), training tokens/s and training time (validation left out);
- equal tokens: validation loss of each arm at each evaluation point, and the difference to attention;
- equal wall-clock: each arm's validation loss after the training time of the faster-finishing arm
  (linear interpolation along its validation curve against training seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from itertools import pairwise
from pathlib import Path

ORDER = {"attention": 0, "mixer": 1, "mixer_spectral": 2}


def collect(folders: list[str]) -> list[dict]:
    runs = []
    for folder in folders:
        paths = sorted(Path(folder).glob("*/lr*/seed*/run.json")) + sorted(Path(folder).glob("*/seed*/run.json"))
        runs.extend(json.loads(path.read_text()) for path in paths)
    if not runs:
        raise FileNotFoundError(f"no */lr*/seed*/run.json under {folders}: run recipes.spectral_mixing.sweep first")
    return runs


def _best_val(run: dict) -> float:
    return run.get("best_val_loss", min(point[1] for point in run["val_curve"]))


def rows(runs: list[dict]) -> list[dict]:
    """One row per (context, arm, learning rate), attention first; ``best_lr`` marks each arm's best rate."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        s = run["settings"]
        groups.setdefault((s["block_size"], s["arm"], s["learning_rate"]), []).append(run)
    table = []
    for (context, arm, lr), group in sorted(groups.items(), key=lambda kv: (kv[0][0], ORDER.get(kv[0][1], 9), kv[0][2])):
        losses = [r["val_loss"] for r in group]
        table.append({
            "context": context,
            "arm": arm,
            "learning_rate": lr,
            "seeds": len(group),
            "parameters": group[0]["parameters"]["total"],
            "mixing_parameters": group[0]["parameters"]["mixing"],
            "n_atoms": group[0].get("n_atoms"),
            "tokens": group[0]["tokens"],
            "val_loss": statistics.mean(losses),
            "val_min": min(losses),
            "val_max": max(losses),
            "best_val_loss": statistics.mean(_best_val(r) for r in group),
            # the rate is chosen on the first seed alone, as the sweep ran it (other seeds run at the chosen rate only)
            "selection_loss": _best_val(min(group, key=lambda r: r["settings"]["seed"])),
            "word_perplexity": statistics.mean(r["val_word_perplexity"] for r in group)
            if all("val_word_perplexity" in r for r in group) else None,
            "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in group),
            "train_seconds": statistics.mean(r["train_seconds"] for r in group),
        })
    for row in table:
        peers = [r for r in table if r["context"] == row["context"] and r["arm"] == row["arm"]]
        row["best_lr"] = row is min(peers, key=lambda r: r["selection_loss"])
    for row in table:
        base = [r for r in table if r["context"] == row["context"] and r["arm"] == "attention" and r["best_lr"]]
        row["vs_attention"] = row["val_loss"] - base[0]["val_loss"] if base else None
    return table


def markdown(table: list[dict]) -> str:
    lines = [
        "| context | arm | K | lr | params (mixing) | tokens | final val | best val | vs attention (its best lr) | word ppl | train tokens/s | train time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        loss = f"{r['val_loss']:.3f}" + (f" ({r['val_min']:.3f}-{r['val_max']:.3f}, {r['seeds']} seeds)" if r["seeds"] > 1 else "")
        diff = "" if r["arm"] == "attention" or r["vs_attention"] is None else f"{r['vs_attention']:+.3f}"
        mark = " (best)" if r["best_lr"] else ""
        lines.append(
            f"| {r['context']:,} | {r['arm']} | {r['n_atoms'] or ''} | {r['learning_rate']:g}{mark} | "
            f"{r['parameters']:,} ({r['mixing_parameters']:,}) | {r['tokens']:,} | {loss} | {r['best_val_loss']:.3f} | "
            f"{diff} | {'' if r['word_perplexity'] is None else format(r['word_perplexity'], '.1f')} | "
            f"{r['tokens_per_second']:,.0f} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def _best_runs(runs: list[dict], table: list[dict]) -> dict[tuple, list[dict]]:
    """(context, arm) -> the runs (all seeds) at that arm's best learning rate."""
    best = {(r["context"], r["arm"]): r["learning_rate"] for r in table if r["best_lr"]}
    chosen: dict[tuple, list[dict]] = {}
    for run in runs:
        s = run["settings"]
        if best.get((s["block_size"], s["arm"])) == s["learning_rate"]:
            chosen.setdefault((s["block_size"], s["arm"]), []).append(run)
    return chosen


def equal_tokens(runs: list[dict], table: list[dict]) -> list[dict]:
    """Validation loss of each arm (best lr, mean over seeds) at each evaluation point it shares with attention."""
    out = []
    for (context, arm), group in sorted(_best_runs(runs, table).items(), key=lambda kv: (kv[0][0], ORDER.get(kv[0][1], 9))):
        curves = [{tokens: loss for tokens, loss, *_ in r["val_curve"]} for r in group]
        for tokens in sorted(set.intersection(*(set(c) for c in curves))):
            out.append({"context": context, "arm": arm, "tokens": tokens,
                        "val_loss": statistics.mean(c[tokens] for c in curves)})
    for row in out:
        base = [r for r in out if r["context"] == row["context"] and r["tokens"] == row["tokens"] and r["arm"] == "attention"]
        row["vs_attention"] = row["val_loss"] - base[0]["val_loss"] if base else None
    return out


def paired(runs: list[dict], table: list[dict]) -> list[dict]:
    """Each arm against attention seed by seed, both at their best rates: the mean and spread of the differences
    in final validation loss over the seeds both have (the comparison a seed-to-seed spread cannot blur)."""
    chosen = _best_runs(runs, table)
    out = []
    for (context, arm), group in sorted(chosen.items(), key=lambda kv: (kv[0][0], ORDER.get(kv[0][1], 9))):
        base = {r["settings"]["seed"]: r["val_loss"] for r in chosen.get((context, "attention"), [])}
        diffs = [r["val_loss"] - base[r["settings"]["seed"]] for r in group if r["settings"]["seed"] in base]
        if arm == "attention" or not diffs:
            continue
        out.append({"context": context, "arm": arm, "seeds": len(diffs), "mean": statistics.mean(diffs),
                    "std": statistics.stdev(diffs) if len(diffs) > 1 else None, "max": max(diffs), "min": min(diffs)})
    return out


def paired_markdown(rows_: list[dict]) -> str:
    lines = ["| context | arm | seeds | mixer - attention, mean | std | range |", "|---|---|---|---|---|---|"]
    for r in rows_:
        std = "" if r["std"] is None else f"{r['std']:.3f}"
        lines.append(f"| {r['context']:,} | {r['arm']} | {r['seeds']} | {r['mean']:+.3f} | {std} | "
                     f"{r['min']:+.3f} to {r['max']:+.3f} |")
    return "\n".join(lines)


def interpolate(curve: list[list[float]], seconds: float) -> float | None:
    """Validation loss at ``seconds`` of training along [tokens, loss, seconds] points (None before the first)."""
    points = [(p[2], p[1]) for p in curve if len(p) > 2]
    if not points or seconds < points[0][0]:
        return None
    for (t0, v0), (t1, v1) in pairwise(points):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / (t1 - t0) if t1 > t0 else v1
    return points[-1][1]


def equal_time(runs: list[dict], table: list[dict]) -> list[dict]:
    """Each arm (best lr) at the training time of the arm that finished first, per context."""
    chosen = _best_runs(runs, table)
    out = []
    for context in sorted({c for c, _ in chosen}):
        arms = {arm: group for (c, arm), group in chosen.items() if c == context}
        budget = min(statistics.mean(r["train_seconds"] for r in group) for group in arms.values())
        for arm, group in sorted(arms.items(), key=lambda kv: ORDER.get(kv[0], 9)):
            values = [interpolate(r["val_curve"], budget) for r in group]
            loss = statistics.mean(values) if None not in values else None
            out.append({"context": context, "arm": arm, "train_seconds": budget, "val_loss": loss})
    for row in out:
        base = [r for r in out if r["context"] == row["context"] and r["arm"] == "attention"]
        ok = base and base[0]["val_loss"] is not None and row["val_loss"] is not None
        row["vs_attention"] = row["val_loss"] - base[0]["val_loss"] if ok else None
    return out


def reading_markdown(rows_: list[dict], key: str, label: str) -> str:
    lines = [f"| context | {label} | arm | val loss | vs attention |", "|---|---|---|---|---|"]
    for r in rows_:
        loss = "" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        diff = "" if r["arm"] == "attention" or r["vs_attention"] is None else f"{r['vs_attention']:+.3f}"
        amount = f"{r[key]:,.0f}" + (" s" if key == "train_seconds" else "")
        lines.append(f"| {r['context']:,} | {amount} | {r['arm']} | {loss} | {diff} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["settings"]["block_size"] for r in runs})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=True):
        for run in sorted((r for r in runs if r["settings"]["block_size"] == context),
                          key=lambda r: (ORDER.get(r["settings"]["arm"], 9), r["settings"]["learning_rate"], r["settings"]["seed"])):
            tokens, losses = zip(*run["train_curve"], strict=True)
            window = 10
            smooth = [statistics.mean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
            s = run["settings"]
            line, = ax.plot(tokens, smooth, label=f"{s['arm']} lr {s['learning_rate']:g} (seed {s['seed']})")
            ax.plot([p[0] for p in run["val_curve"]], [p[1] for p in run["val_curve"]], "o", color=line.get_color())
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
    parser.add_argument("--json", help="write the tables and every run (full curves) to this JSON")
    args = parser.parse_args(argv)
    runs = collect(args.folders)
    table = rows(runs)
    tokens, time, pairs = equal_tokens(runs, table), equal_time(runs, table), paired(runs, table)
    print(markdown(table))
    if pairs:
        print("\nPaired over seeds (final validation loss, each arm at its best learning rate):\n")
        print(paired_markdown(pairs))
    print("\nEqual tokens (each arm at its best learning rate):\n")
    print(reading_markdown(tokens, "tokens", "tokens"))
    print("\nEqual wall-clock (training time of the arm that finished first):\n")
    print(reading_markdown(time, "train_seconds", "training time"))
    if args.plot:
        plot(runs, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "paired": pairs, "equal_tokens": tokens, "equal_time": time, "runs": runs},
                                              indent=1))
    return table


if __name__ == "__main__":
    main()
