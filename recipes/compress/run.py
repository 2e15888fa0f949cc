"""Compress SmolLM2-135M every way the profile lists, measure held-out perplexity before and after healing.

    python -m recipes.compress.run recipes/compress/configs/smollm2_cpu.yaml [key=value ...]
    python -m recipes.compress.compare recipes/compress/results/smollm2_cpu

Each (method, fraction) writes ``{results}/{profile}/{method}/f{fraction}.json`` (storage in bytes, perplexity on
each text, wall time), each healing run ``.../f{fraction}_heal_{optimizer}_s{seed}.json``; a JSON that exists is
skipped, so a killed run resumes where it stopped. The order is the profile's: ``fractions_first`` before the
others, compression before healing, so the most wanted numbers come first. ``key=value`` overrides a top-level key
of the profile (values are YAML: ``eval_windows=4 fractions=[0.5]``).

Online, use the Hub's model by name: ``model=HuggingFaceTB/SmolLM2-135M``.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.common import quiet_loading
from recipes.common.machine import cpu_name
from recipes.common.profiles import parse_args_with_overrides, parse_overrides, read_yaml
from recipes.finetune.data import resolve_model

from .evaluate import evenly_spaced, held_out, resolve_data, text_blocks
from .heal import heal, training_batches
from .methods import ACTIVATION_AWARE, Method, calibration_grams, compress


def hardware() -> str:
    return f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def load_profile(path: str, overrides: list[str]) -> dict:
    """The profile's settings (one flat dict), with ``key=value`` overrides, read by the recipes' one parser."""
    profile = read_yaml(path)
    for key, value in parse_overrides(overrides).items():
        if key not in profile:
            raise ValueError(f"override {key}={value!r}: give key=value with a key of the profile ({sorted(profile)}).")
        profile[key] = value
    return profile


class Recipe:
    """The data, the calibration statistics and the result folder, shared by every run of a profile."""

    def __init__(self, profile: dict, results: Path):
        self.profile = profile
        self.folder = results / profile["name"]
        self.path = resolve_model(profile["model"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        block = profile["block_size"]
        splits = {name: text_blocks(name, resolve_data(src), self.tokenizer, block) for name, src in profile["texts"].items()}
        self.windows = {name: evenly_spaced(s["test"], profile["eval_windows"]) for name, s in splits.items()}
        self.train = {name: s["train"] for name, s in splits.items()}
        per_text = max(1, profile["calibration_windows"] // len(splits))
        # calibration windows come from the training split (never the held-out one), evenly spaced over it
        self.calibration = [evenly_spaced(s["train"], per_text) for s in splits.values()]
        self._grams = None
        self.methods = {m["name"]: Method(**m) for m in profile["methods"]}

    def dense(self):
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)

    def grams(self):
        if self._grams is None:
            start = time.perf_counter()
            self._grams = calibration_grams(self.dense(), self.calibration)
            print(f"calibration statistics: {time.perf_counter() - start:.0f} s", flush=True)
        return self._grams

    def compressed(self, method: Method, fraction: float):
        model = self.dense()
        grams = self.grams() if method.kind in ACTIVATION_AWARE else None
        return compress(model, method, fraction, grams)

    def write(self, path: Path, record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.rename(path)
        print(f"{path}: {json.dumps({k: record[k] for k in ('perplexity', 'wall_seconds') if k in record})}", flush=True)

    def common(self) -> dict:
        p = self.profile
        return dict(profile=p["name"], model=p["model"], block_size=p["block_size"], eval_windows=p["eval_windows"],
                    eval_tokens_per_text=p["eval_windows"] * p["block_size"], hardware=hardware())

    def base(self) -> None:
        path = self.folder / "dense.json"
        if path.exists():
            return
        start = time.perf_counter()
        model = self.dense()
        ppl = held_out(model, self.windows)
        params = sum(p.numel() for p in model.parameters())
        self.write(path, dict(self.common(), method="dense", fraction=1.0, perplexity=ppl, parameters=params,
                              wall_seconds=time.perf_counter() - start))

    def compress_one(self, name: str, fraction: float) -> None:
        path = self.folder / name / f"f{fraction:g}.json"
        if path.exists():
            return
        start = time.perf_counter()
        model, storage = self.compressed(self.methods[name], fraction)
        built = time.perf_counter() - start
        ppl = held_out(model, self.windows)
        self.write(path, dict(self.common(), method=name, settings=vars(self.methods[name]), fraction=fraction,
                              storage=storage, perplexity=ppl, compress_seconds=built,
                              wall_seconds=time.perf_counter() - start))

    def heal_one(self, name: str, fraction: float, optimizer: str, seed: int) -> None:
        h = self.profile["heal"]
        path = self.folder / name / f"f{fraction:g}_heal_{optimizer}_s{seed}.json"
        if path.exists():
            return
        start = time.perf_counter()
        torch.manual_seed(seed)
        model, storage = self.compressed(self.methods[name], fraction)
        batches = training_batches(self.train, h["steps"], h["batch_size"], seed)
        batches = [b[:, : h["block_size"]] for b in batches]
        trained = heal(model, batches, h["lr"], optimizer)
        ppl = held_out(model, self.windows)
        self.write(path, dict(self.common(), method=name, settings=vars(self.methods[name]), fraction=fraction,
                              storage=storage, perplexity=ppl, seed=seed,
                              heal=dict(h, tokens=h["steps"] * h["batch_size"] * h["block_size"], **trained),
                              wall_seconds=time.perf_counter() - start))

    def storage_audit(self, name: str, fraction: float) -> None:
        """What hf_spectral itself takes today for one compressed model: memory (tensors, weight cache), disk."""
        path = self.folder / "storage_audit" / f"{name}_f{fraction:g}.json"
        if path.exists():
            return
        start = time.perf_counter()
        model, storage = self.compressed(self.methods[name], fraction)
        tensors = {}
        for kind, items in (("parameters", model.named_parameters()), ("buffers", model.named_buffers())):
            seen = set()
            for _, t in items:
                if t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                key = f"{kind} {t.dtype}"
                tensors[key] = tensors.get(key, 0) + t.numel() * t.element_size()
        dense_dir = Path(self.path)
        dense_disk = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            files = {f.name: f.stat().st_size for f in Path(tmp).iterdir() if f.is_file()}
        # the evaluation weight cache: one dense weight per spectral layer after a forward in eval mode
        cache = 0
        model.eval()
        with torch.inference_mode():
            model(input_ids=self.windows[next(iter(self.windows))][:1, :16])
        for module in model.modules():
            cached = getattr(module, "_weight_cache", None)
            if cached is not None and getattr(cached, "weight", None) is not None:
                cache += cached.weight.numel() * cached.weight.element_size()
        self.write(path, dict(self.common(), method=name, fraction=fraction, counted_storage=storage,
                              in_memory_bytes=tensors, eval_weight_cache_bytes=cache, saved_files=files,
                              saved_bytes=sum(files.values()), dense_safetensors_bytes=dense_disk,
                              wall_seconds=time.perf_counter() - start))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("overrides", nargs="*", help="key=value (YAML values) over the profile's top-level keys")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--stage", default="all", choices=("all", "compress", "heal", "audit"))
    parser.add_argument("--only", default="", help="comma-separated method names: run only these (compress stage)")
    args = parse_args_with_overrides(parser, argv)
    quiet_loading()
    profile = load_profile(args.profile, args.overrides)
    torch.manual_seed(0)
    recipe = Recipe(profile, Path(args.results))
    first = [f for f in profile["fractions"] if f in profile.get("fractions_first", [])]
    order = first + [f for f in profile["fractions"] if f not in first]
    if args.stage in ("all", "compress"):
        recipe.base()
        for fraction in order:
            for name in recipe.methods:
                if args.only and name not in args.only.split(","):
                    continue
                if fraction in profile.get("skip", {}).get(name, []):
                    continue
                recipe.compress_one(name, fraction)
                gc.collect()
    if args.stage in ("all", "audit"):
        for item in profile.get("audit", []):
            recipe.storage_audit(item["method"], item["fraction"])
    if args.stage in ("all", "heal"):
        h = profile["heal"]
        for seed in h["seeds"]:
            for fraction in h["fractions"]:
                for arm in h["arms"]:
                    recipe.heal_one(arm["method"], fraction, arm["optimizer"], seed)
                    gc.collect()


if __name__ == "__main__":
    main()
