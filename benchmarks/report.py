"""Turn result files of ``benchmarks.run`` into the tables of benchmarks/README.md.

    python -m benchmarks.report benchmarks/results/cpu-*.json [--targets] [--full]

``--targets``: the performance targets (tokens = 4096) with the measured ratio and whether it is met.
``--full``: every layer and model table of every file.
"""

from __future__ import annotations

import argparse
import json

from .common import fmt, markdown_table
from .run import layer_markdown, model_markdown

TARGETS = {
    "replace K=mn/2": 1.10,
    "replace K=mn/8": 0.80,
    "delta vs matched LoRA": 1.2,
    "delta vs FourierFT": 0.6,
    "delta extra peak (m x n)": 1.0,
    "eval": 1.02,
    "char model": 1.10,
}


def _recompute(layers: list[dict]) -> list[dict]:
    from .layers import layer_rows

    keep = ("x_linear", "x_lora8", "x_lora_matched", "x_fourierft", "extra_peak_mn")
    return layer_rows([{k: v for k, v in r.items() if not k.startswith(keep)} for r in layers])


def _met(value, limit) -> str:
    if value is None:
        return "-"
    return "yes" if value <= limit else f"no (+{(value / limit - 1) * 100:.0f}%)" if limit > 0 else "no"


def target_rows(layers: list[dict], models: list[dict], tokens: int = 4096) -> list[list]:
    rows = []
    for r in layers:
        if r["tokens"] != tokens or r.get("forced_path", "auto") != "auto":
            continue
        shape = f"{r['m']}x{r['n']}"
        if r["kind"] == "replace":
            key = f"replace K={r['budget']}"
            rows.append([shape, f"{r['name']} [{r.get('path')}]", "x nn.Linear", r["x_linear"], r.get("x_linear_min"),
                         TARGETS[key], _met(r["x_linear"], TARGETS[key])])
        elif r["kind"] == "delta":
            name = f"{r['name']} [{r.get('path')}]"
            for label, value, low in (
                ("x matched LoRA", r.get("x_lora_matched"), r.get("x_lora_matched_min")),
                ("x FourierFT", r.get("x_fourierft"), r.get("x_fourierft_min")),
                ("extra peak, m x n buffers", r.get("extra_peak_mn"), None),
            ):
                limit = TARGETS[{"x matched LoRA": "delta vs matched LoRA", "x FourierFT": "delta vs FourierFT"}.get(label, "delta extra peak (m x n)")]
                rows.append([shape, name, label, value, low, limit, _met(value, limit)])
        elif r["kind"] in ("eval-cached", "eval-merged"):
            rows.append([shape, r["name"], "x nn.Linear (eval)", r["x_linear"], r.get("x_linear_min"), TARGETS["eval"],
                         _met(r["x_linear"], TARGETS["eval"])])
    for r in models:
        if r["name"].startswith("char: replace"):
            rows.append(["char model", f"{r['name']} [{r.get('path')}]", "x dense step", r.get("x_reference"),
                         r.get("x_reference_min"), TARGETS["char model"], _met(r.get("x_reference"), TARGETS["char model"])])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--targets", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--auto-only", action="store_true", help="leave out the rows of forced paths")
    args = parser.parse_args(argv)
    layers, models, machines = [], [], []
    for path in args.files:
        with open(path) as f:
            data = json.load(f)
        # a later file re-measuring a case (with its own nn.Linear) replaces the earlier measurement
        fresh = {(r["m"], r["n"], r["tokens"], r["name"]) for r in data["layers"]}
        layers = [r for r in layers if (r["m"], r["n"], r["tokens"], r["name"]) not in fresh] + data["layers"]
        models.extend(data["models"])
        machines.append((path, data["machine"], data["settings"]))
    if args.targets:
        headers = ["shape", "case [path]", "measure", "ratio of medians", "ratio of minima", "target", "met (medians)"]
        print(markdown_table(headers, target_rows(_recompute(layers), models, args.tokens)))
        print()
    if args.full:
        for path, machine, settings in machines:
            print(f"- `{path}`: {machine.get('gpu') or machine.get('cpu')}, torch {machine['torch']}, "
                  f"{machine['threads']} threads, load average {fmt(tuple(round(v, 1) for v in machine.get('load_average', ())))}, "
                  f"repeats {settings['repeats']}")
        print()
        if layers:
            shown = [r for r in _recompute(layers) if not args.auto_only or r.get("forced_path", "auto") == "auto"]
            print(layer_markdown(shown))
            print()
        if models:
            print(model_markdown(models))


if __name__ == "__main__":
    main()
