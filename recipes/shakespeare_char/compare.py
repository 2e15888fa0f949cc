"""Turn a folder of runs into a table, two plots and samples.

    python -m recipes.shakespeare_char.compare runs/shakespeare_char/quick

Reads every ``*/seed*/run.json`` under the folder and writes, beside them: ``table.md`` (one
row per arm: mean and standard deviation over seeds), ``val_loss.png`` (validation loss against
tokens, one panel per K), ``stable_rank.png`` (mean stable rank of the block layers against K,
one line per layout) and ``samples.md`` (characters sampled from each final model).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..common import find_records, hardware_line, mean_std

KIND_ORDER = {"dense": 0, "spectral": 1, "lowrank": 2}
FRACTION_NAMES = {1.0: "mn", 0.5: "mn/2", 0.25: "mn/4", 0.1: "mn/10", 0.05: "mn/20"}


def load_runs(runs_dir: str | Path, unfinished: bool = False) -> dict[str, list[dict]]:
    """Runs grouped by arm: the finished ones, and with ``unfinished`` also those stopped early."""
    groups = defaultdict(list)
    for _, run in find_records(runs_dir, "*/seed*/run.json"):
        if run.get("finished") or unfinished:
            groups[run["arm"]].append(run)
    return dict(groups)


def _fraction_name(fraction: float) -> str:
    return FRACTION_NAMES.get(round(fraction, 4), f"{fraction:g} mn")


def _arm_key(runs: list[dict]):
    r = runs[0]
    fraction = 1.0 if r["kind"] == "dense" else r["fraction"]
    return (-fraction, KIND_ORDER[r["kind"]], r["layout"], r["basis"], r["optimizer"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean, std = mean_std(values)
    return mean, std if math.isfinite(std) else 0.0  # one seed: shown as ± 0.000


def _describe(run: dict) -> tuple[str, str, str, str]:
    if run["kind"] == "dense":
        return "dense", "-", "-", "mn"
    if run["kind"] == "lowrank":
        return "low rank (LoRA B A)", "-", "-", _fraction_name(run["fraction"])
    basis = "DCT" if run["basis"] == "dct" else "random orthonormal"
    return f"spectral {run['layout']}", basis, run["optimizer"], _fraction_name(run["fraction"])


def _val_at(run: dict, step: Optional[int]) -> Optional[float]:
    """Validation loss at ``step`` (None: the run's last evaluation), or None if it has no evaluation there."""
    if step is None:
        return run["final_val_loss"]
    tokens = step * run["tokens"] // run["steps"]
    return next((loss for t, loss in run["curves"]["val"] if t == tokens), None)


def _best_until(run: dict, step: Optional[int]) -> float:
    limit = float("inf") if step is None else step * run["tokens"] // run["steps"]
    return min(loss for t, loss in run["curves"]["val"] if t <= limit)


def table(groups: dict[str, list[dict]], at_step: Optional[int] = None) -> str:
    """One row per arm: mean ± std over seeds of the final validation loss (or the one at ``at_step``)."""
    groups = {arm: [r for r in runs if _val_at(r, at_step) is not None] for arm, runs in groups.items()}
    groups = {arm: runs for arm, runs in groups.items() if runs}
    dense = groups.get("dense")
    dense_mean = _mean_std([_val_at(r, at_step) for r in dense])[0] if dense else None
    header = (
        "| arm | storage | basis | optimizer | K per layer | block params | checkpoint | seeds | tokens "
        "| val loss (mean ± std) | vs dense | best val so far | stable rank | tokens/s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for arm, runs in sorted(groups.items(), key=lambda item: _arm_key(item[1])):
        first = runs[0]
        storage, basis, optimizer, k = _describe(first)
        mean, std = _mean_std([_val_at(r, at_step) for r in runs])
        best = statistics.fmean(_best_until(r, at_step) for r in runs)
        delta = "" if dense_mean is None or arm == "dense" else f"{mean - dense_mean:+.3f}"
        ranks = statistics.fmean(r["mean_stable_rank"] for r in runs)
        speed = statistics.fmean(r["tokens_per_second"] for r in runs)
        checkpoint = first.get("checkpoint_bytes")
        size = f"{checkpoint / 2**20:.2f} MiB" if checkpoint else "-"
        tokens = sorted({r["tokens"] if at_step is None else at_step * r["tokens"] // r["steps"] for r in runs})
        lines.append(
            f"| {arm} | {storage} | {basis} | {optimizer} | {k} | {first['params']['block']:,} "
            f"({first['params']['block_share']:.0%}) | {size} | {len(runs)} | "
            f"{'/'.join(f'{t / 1e6:.1f}M' for t in tokens)} | {mean:.3f} ± {std:.3f} | {delta} | {best:.3f} | "
            f"{ranks:.1f} | {speed:,.0f} |"
        )
    return "\n".join(lines)


def hardware_note(groups: dict[str, list[dict]]) -> str:
    runs = [r for rs in groups.values() for r in rs]
    names = sorted({hardware_line(r["hardware"]) for r in runs})
    walls = [r["wall_seconds"] for r in runs]
    return (
        f"{len(runs)} runs on {', '.join(names)}; wall time per run {min(walls):.0f}-{max(walls):.0f} s "
        f"(mean {statistics.fmean(walls):.0f} s, {sum(walls) / 60:.1f} run-minutes in all)."
    )


def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    by_tokens = defaultdict(list)
    for run in runs:
        for tokens, loss in run["curves"][key]:
            by_tokens[tokens].append(loss)
    # the mean of the runs that got that far (runs stopped early end sooner; the legend gives the seed count)
    xs = sorted(by_tokens)
    return xs, [statistics.fmean(by_tokens[t]) for t in xs]


def plot_val_loss(groups: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r[0]["fraction"] for r in groups.values() if r[0]["kind"] != "dense"}, reverse=True)
    fractions = fractions or [1.0]
    fig, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 4), sharey=True, squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        for arm, runs in sorted(groups.items(), key=lambda item: _arm_key(item[1])):
            first = runs[0]
            if first["kind"] != "dense" and first["fraction"] != fraction:
                continue
            xs, ys = _mean_curve(runs, "val")
            style = {"color": "black", "linewidth": 2} if first["kind"] == "dense" else {}
            if first["kind"] == "lowrank":
                style = {"color": "grey", "linestyle": "--"}
            ax.plot([x / 1e6 for x in xs], ys, label=f"{arm} ({len(runs)})", **style)
        ax.set_title(f"K = {_fraction_name(fraction)}")
        ax.set_xlabel("training tokens (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation loss (mean over seeds)")
    # from a quarter of the way in: the first evaluations would squash the differences that matter
    curves = [c for c in (_mean_curve(runs, "val")[1] for runs in groups.values()) if c]
    axes[0][0].set_ylim(min(min(c) for c in curves) - 0.05, max(c[len(c) // 4] for c in curves) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stable_rank(groups: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    dense_rank = None
    for runs in groups.values():
        first = runs[0]
        rank = statistics.fmean(r["mean_stable_rank"] for r in runs)
        if first["kind"] == "dense":
            dense_rank = rank
            continue
        if first["kind"] == "lowrank":
            label = "low rank"
        else:
            basis = "" if first["basis"] == "dct" else ", random orthonormal"
            label = f"{first['layout']}{basis} ({first['optimizer']})"
        lines[label].append((first["fraction"], rank))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, points in sorted(lines.items()):
        points.sort()
        style = {"color": "grey", "linestyle": "--"} if label == "low rank" else {"marker": "o"}
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
    if dense_rank is not None:
        ax.axhline(dense_rank, color="black", linewidth=2, label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("K / (m n) per layer")
    ax.set_ylabel("stable rank ||W||_F^2 / ||W||_2^2 (mean of block layers)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def samples(groups: dict[str, list[dict]]) -> str:
    parts = ["# Samples from each final model (seed of the first run, temperature 1)\n"]
    for arm, runs in sorted(groups.items(), key=lambda item: _arm_key(item[1])):
        run = min(runs, key=lambda r: r["seed"])
        parts.append(
            f"## {arm} (seed {run['seed']}, val loss {run['final_val_loss']:.3f})\n\n```\n{run['sample']}\n```\n"
        )
    return "\n".join(parts)


def compare(runs_dir: str | Path, plots: bool = True, unfinished: bool = False, at_step: Optional[int] = None) -> str:
    """Write table.md, samples.md and the plots under ``runs_dir``; return the table with its note.

    With ``unfinished``, runs stopped before their last step are included, at the tokens they reached
    (the ``tokens`` column says how far each arm got); ``at_step`` compares every run at that step (an
    evaluation step) instead of at its end. Stable ranks, samples and speeds are always at the run's end."""
    runs_dir = Path(runs_dir)
    groups = load_runs(runs_dir, unfinished)
    if not groups:
        return f"No finished runs under {runs_dir}."
    text = table(groups, at_step) + "\n\n" + hardware_note(groups) + "\n"
    (runs_dir / ("table.md" if at_step is None else f"table_step{at_step}.md")).write_text(text)
    (runs_dir / "samples.md").write_text(samples(groups))
    if plots:
        plot_val_loss(groups, runs_dir / "val_loss.png")
        plot_stable_rank(groups, runs_dir / "stable_rank.png")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", help="a profile's folder, e.g. runs/shakespeare_char/quick")
    parser.add_argument("--no-plots", action="store_true", help="only the table and the samples")
    parser.add_argument("--unfinished", action="store_true", help="include runs stopped early, at their tokens")
    parser.add_argument("--at-step", type=int, default=None, help="compare at this evaluation step, not the end")
    args = parser.parse_args(argv)
    print(compare(args.runs_dir, plots=not args.no_plots, unfinished=args.unfinished, at_step=args.at_step))


if __name__ == "__main__":
    main()
