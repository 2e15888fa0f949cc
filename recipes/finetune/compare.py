"""Turn a profile's folder of run.json files into Markdown tables (and a summary.json).

    python -m recipes.finetune.compare runs/finetune/cls_gpu [--out results.md]

Each arm is shown at its best learning rate, chosen as the sweep chose it: the best validation metric of the first
seed. The headline is the test metric over every seed at that rate (mean ± sample standard deviation). Step times
come from the profile's ``_timing`` runs (each arm alone on the device) when there are any, else from the runs
themselves (marked "shared": measured while runs shared the device, so only roughly comparable).

Beside the score: the adapter's file size, peak memory (CUDA max allocated on a GPU, peak RSS of the process on a
CPU, sampled while the run trains and evaluates), forgetting (the loss change on general text, where the profile measures it), and the paired difference to
LoRA r=8: per seed, arm minus LoRA at their own best rates (same seed: same data order and head init), mean ± std.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..common import find_records, fmt, hardware_line, mean_std


def load_runs(folder: Path) -> tuple[list[dict], dict[str, dict]]:
    runs, timing = [], {}
    for path, record in find_records(folder):
        if "_timing" in path.relative_to(folder).parts:
            timing[record["arm"]] = record
        elif record.get("evaluated", True):
            runs.append(record)
    return runs, timing


def _metric(task: str) -> tuple[str, int]:
    """(metric name, +1 if higher is better else -1)."""
    return {"cls": ("accuracy", 1), "gen": ("exact_match", 1)}.get(task, ("perplexity", -1))


def _value(record: dict, split: str) -> float:
    name, _ = _metric(record["task"])
    value = record["results"].get(split, {}).get(name, float("nan"))
    return value if value is not None and math.isfinite(value) else float("nan")


def rank(results: dict, task: str) -> tuple[float, float]:
    """How a run ranks when a learning rate is chosen (higher is better): the validation metric (accuracy, or
    minus perplexity), then minus the validation loss to break ties. Runs without a finite metric rank last."""
    validation = (results or {}).get("validation", {})
    name, sign = _metric(task)
    value = validation.get(name) if sign > 0 else -validation.get(name, math.inf)
    loss = validation.get("loss", math.inf)
    if value is None or not math.isfinite(value):
        return (-math.inf, -math.inf)
    return (value, -loss if math.isfinite(loss) else -math.inf)


def _rank(record: dict | None, task: str) -> tuple[float, float]:
    return rank(record["results"], task) if record is not None else (-math.inf, -math.inf)


METHOD_ORDER = ("lora", "fourierft", "waveft", "vera", "c3a", "spectral", "full")
BUDGET_KEY = {"lora": "rank", "vera": "rank", "c3a": "block_size_c3a"}  # the others: n_coefficients


def _order(arm: dict) -> tuple:
    """Rows: the baselines, then spectral arms by budget and layout, then full fine-tuning."""
    return (METHOD_ORDER.index(arm["method"]), arm["budget"] or 0, arm["scaling"] or 0, arm["arm"])


def summarize(runs: list[dict], timing: dict[str, dict]) -> dict:
    by_arm: dict[str, dict[float, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for record in runs:
        by_arm[record["arm"]][record["lr"]][record["seed"]] = record
    arms = {}
    for arm, by_lr in by_arm.items():
        first_seed = min(seed for seeds in by_lr.values() for seed in seeds)
        task = next(iter(next(iter(by_lr.values())).values()))["task"]

        # the sweep's choice (train.rank on the first seed); lrs in ascending order, as the sweep sees them
        best = max(sorted(by_lr), key=lambda lr, s=first_seed, runs=by_lr, task=task: _rank(runs[lr].get(s), task))
        finals = list(by_lr[best].values())
        sample = finals[0]
        test_mean, test_std = mean_std([_value(r, "test") for r in finals])
        val_mean, val_std = mean_std([_value(r, "validation") for r in finals])
        shared_steps = [r["step_time"]["median_s"] for r in finals if r.get("step_time")]
        if arm in timing and timing[arm].get("step_time"):
            step, step_source = timing[arm]["step_time"], "alone"
        else:
            step = {"median_s": statistics.median(shared_steps)} if shared_steps else {}
            step_source = "shared"
        diagnostics = [r.get("diagnostics") or {} for r in finals]
        arms[arm] = {
            "arm": arm,
            "task": task,
            "method": sample["method"],
            "layout": sample["recipe"].get("layout") if sample["method"] == "spectral" else None,
            "scaling": sample.get("scaling"),
            "budget": sample["recipe"].get(BUDGET_KEY.get(sample["method"], "n_coefficients")),
            "best_lr": best,
            "seeds": sorted(r["seed"] for r in finals),
            "test_mean": test_mean,
            "test_std": test_std,
            "validation_mean": val_mean,
            "validation_std": val_std,
            "trainable_adapter": sample["parameters"]["trainable_adapter"],
            "trainable_head": sample["parameters"]["trainable_head"],
            "step": step,
            "step_source": step_source,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in finals),
            "steps": sample["steps"],
            "hardware": sample["hardware"],
            "sweep": {lr: _value(seeds[first_seed], "validation") for lr, seeds in sorted(by_lr.items())
                      if first_seed in seeds},
            "by_seed": {r["seed"]: _value(r, "test") for r in finals},
            "adapter_mb": _mean_of(finals, lambda r: r.get("adapter_file_bytes"), 2**20),
            "peak_memory_mb": _mean_of(finals, lambda r: r.get("peak_gpu_memory_mb") or r.get("peak_rss_run_mb")
                                       or r.get("max_rss_mb")),
            "memory_kind": "GPU max allocated" if sample.get("peak_gpu_memory_mb") else "peak RSS",
            "forgetting": _mean_of(finals, lambda r: (r.get("forgetting") or {}).get("change")),
            "calibration_seconds": _mean_of(finals, lambda r: r.get("calibration_seconds")),
            "relative_update": mean_std([d.get("relative_update_median", float("nan")) for d in diagnostics])[0],
            "stable_rank": mean_std([d.get("stable_rank_median", float("nan")) for d in diagnostics])[0],
        }
    return {a["arm"]: a for a in sorted(arms.values(), key=_order)}


def _mean_of(records: list[dict], get, divide: float = 1.0) -> float:
    values = [get(r) for r in records]
    values = [v / divide for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def paired_difference(arm: dict, reference: dict, sign: int) -> tuple[float, float, int]:
    """Mean ± sample std over the seeds both arms ran of (arm - reference) * sign (positive: the arm is better)."""
    seeds = sorted(set(arm["by_seed"]) & set(reference["by_seed"]))
    diffs = [sign * (arm["by_seed"][s] - reference["by_seed"][s]) for s in seeds]
    mean, std = mean_std(diffs)
    return mean, std, len(diffs)


def _reference(arms: dict, method: str, budget=None) -> dict | None:
    """The first arm of a method (of a given budget) in the profile's order."""
    for arm in arms.values():
        if arm["method"] == method and (budget is None or arm["budget"] == budget):
            return arm
    return None


def markdown(arms: dict, title: str) -> str:
    if not arms:
        return f"# {title}\n\nNo finished runs.\n"
    task = next(iter(arms.values()))["task"]
    name, sign = _metric(task)
    scale = 100.0 if sign > 0 else 1.0  # accuracy and exact match in percent
    unit = " (%)" if sign > 0 else ""
    lora = _reference(arms, "lora", 8) or _reference(arms, "lora")
    lines = [f"# {title}", ""]
    hw = next(iter(arms.values()))["hardware"]
    lines.append(
        f"Hardware: {hardware_line(hw)}. Each arm at its best learning rate (best validation {name} of the "
        f"first seed); test {name} over the seeds at that rate, mean ± std."
    )
    lines += ["", f"| arm | trainable (adapter) | × LoRA r=8 | best lr | scaling | val {name}{unit} | test {name}{unit} "
              "| seeds | s/step | × LoRA step | train s/run |", "|" + "---|" * 11]
    for arm in arms.values():
        ratio = arm["trainable_adapter"] / lora["trainable_adapter"] if lora else float("nan")
        step = arm["step"].get("median_s", float("nan"))
        lora_step = lora["step"].get("median_s", float("nan")) if lora else float("nan")
        spread = f" ± {fmt(scale * arm['test_std'], 2)}" if math.isfinite(arm["test_std"]) else ""
        lines.append(
            f"| {arm['arm']} | {arm['trainable_adapter']:,} | {fmt(ratio, 3)} | {arm['best_lr']:g} | "
            f"{arm['scaling'] if arm['scaling'] is not None else '–'} | "
            f"{fmt(scale * arm['validation_mean'], 2)} | {fmt(scale * arm['test_mean'], 2)}{spread} | "
            f"{len(arm['seeds'])} | {fmt(step, 4)} ({arm['step_source']}) | {fmt(step / lora_step, 2)} | "
            f"{fmt(arm['train_seconds'], 0)} |"
        )
    lines.append("")
    memory_kind = next(iter(arms.values()))["memory_kind"]
    lines += [f"## Cost and forgetting, and the paired difference to {lora['arm'] if lora else 'LoRA'}", "",
              f"Paired: per seed, arm minus LoRA at each one's best rate, signed so + is better; mean ± std (n seeds). "
              f"Memory: {memory_kind} during the run. Forgetting: loss on general text after training minus the "
              "base model's (lower is better; – where not measured).", "",
              f"| arm | adapter file (MiB) | peak memory (MiB) | forgetting | calibration s | paired Δ test {name}{unit} |",
              "|" + "---|" * 6]
    for arm in arms.values():
        if lora and arm is not lora:
            mean, std, count = paired_difference(arm, lora, sign)
            paired = f"{fmt(scale * mean, 2)} ± {fmt(scale * std, 2)} (n={count})" if count else "–"
        else:
            paired = "reference" if lora else "–"
        lines.append(f"| {arm['arm']} | {fmt(arm['adapter_mb'], 3)} | {fmt(arm['peak_memory_mb'], 0)} | "
                     f"{fmt(arm['forgetting'], 4)} | {fmt(arm['calibration_seconds'], 2)} | {paired} |")
    lines.append("")
    lines.append(f"Trainable (adapter) leaves out the task head every arm trains alike "
                 f"({next(iter(arms.values()))['trainable_head']:,} parameters).")

    # the learning-rate sweep
    lrs = sorted({lr for arm in arms.values() for lr in arm["sweep"]})
    lines += ["", f"## Learning-rate sweep (validation {name}{unit}, first seed; * = chosen)", "",
              "| arm | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|" + "---|" * (len(lrs) + 1)]
    for arm in arms.values():
        cells = []
        for lr in lrs:
            value = arm["sweep"].get(lr)
            cells.append("" if value is None else fmt(scale * value, 2) + ("*" if lr == arm["best_lr"] else ""))
        lines.append(f"| {arm['arm']} | " + " | ".join(cells) + " |")

    # the update each adapter learned
    lines += ["", "## What the adapters learned (median over layers, mean over seeds)", "",
              "| arm | lr × scaling | ‖ΔW‖/‖W0‖ | stable rank of ΔW |", "|---|---|---|---|"]
    for arm in arms.values():
        if arm["method"] == "full":
            continue
        product = arm["best_lr"] * arm["scaling"] if arm["scaling"] is not None else float("nan")
        lines.append(f"| {arm['arm']} | {fmt(product, 4)} | {fmt(arm['relative_update'], 4)} | "
                     f"{fmt(arm['stable_rank'], 1)} |")

    # the targets
    lines += ["", "## Targets", ""]
    fourier = {a["budget"]: a for a in arms.values() if a["method"] == "fourierft"}
    for arm in arms.values():
        if arm["method"] != "spectral" or not lora:
            continue
        ratio = arm["trainable_adapter"] / lora["trainable_adapter"]
        diff = sign * (arm["test_mean"] - lora["test_mean"]) * scale
        text = (f"- {arm['arm']}: {ratio:.3f} of LoRA's parameters ({'≤' if ratio <= 1 / 8 else '>'} 1/8); "
                f"vs LoRA r=8 {diff:+.2f}{'' if sign > 0 else ' (perplexity, lower is better: + means better)'}")
        if arm["budget"] in fourier:
            diff_f = sign * (arm["test_mean"] - fourier[arm["budget"]]["test_mean"]) * scale
            text += f"; vs FourierFT at the same K {diff_f:+.2f}"
        met = ratio <= 1 / 8 and diff >= 0
        lines.append(text + (" → LoRA target met" if met else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="A profile's run folder, e.g. runs/finetune/cls_gpu.")
    parser.add_argument("--out", help="Markdown file to write (default: FOLDER/results.md).")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    runs, timing = load_runs(folder)
    arms = summarize(runs, timing)
    text = markdown(arms, f"Fine-tuning comparison: {folder.name}")
    (Path(args.out) if args.out else folder / "results.md").write_text(text)
    (folder / "summary.json").write_text(json.dumps(arms, indent=1, default=str))
    print(text)
    return text


if __name__ == "__main__":
    main()
