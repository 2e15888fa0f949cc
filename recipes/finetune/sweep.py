"""Run a profile: a learning-rate sweep per arm, then more seeds at each arm's best learning rate.

    python -m recipes.finetune.sweep recipes/finetune/configs/cls_gpu.yaml --jobs 12 --timing_steps 40
    python -m recipes.finetune.compare runs/finetune/cls_gpu

For every arm: train at each of its ``lrs`` with the first seed; pick the learning rate with the best validation
metric (accuracy up, perplexity down); if it sits at the edge of the grid, try one step further out (``--extend``
times at most); then train the remaining ``seeds`` at the chosen rate. The test split is never looked at to choose.

Runs go to ``{runs_dir}/{profile}/{arm}/lr{lr}/seed{seed}/run.json``; a run whose run.json exists is not run again,
so an interrupted sweep resumes where it stopped. ``--jobs N`` runs N runs at once in worker processes (on one GPU
they share it; on a CPU give each ``--threads``); arms earlier in the profile go first. ``--timing_steps N`` first
times every arm alone (one process, nothing else running) for N steps into ``{profile}/_timing``, because step times
measured while runs share a device are not comparable. ``--deadline_minutes`` stops starting new runs after that
long; what finished is kept. ``--fresh_process`` runs every run in a process of its own (even with ``--jobs 1``),
so that a run's peak memory on a CPU is its own and not also what earlier runs of the same worker left behind.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path


def _init_worker(threads: int) -> None:
    import torch

    from ..common import quiet_loading

    quiet_loading()
    torch.set_num_threads(threads)


def _run_task(settings: dict, lr: float, seed: int) -> dict:
    """In a worker: one run; a failure is returned (and written) instead of raised, so the sweep goes on."""
    from .train import parse_settings, run

    try:
        record = run(settings, lr, seed)
        return {"ok": True, "arm": record["arm"], "lr": lr, "seed": seed, "results": record["results"],
                "wall_seconds": record["wall_seconds"]}
    except Exception as error:  # noqa: BLE001 - reported in the sweep's log and in error.json
        _, training = parse_settings(settings, lr, seed)
        folder = Path(training.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.json").write_text(json.dumps({"error": repr(error), "traceback": traceback.format_exc()}))
        return {"ok": False, "arm": settings["arm"], "lr": lr, "seed": seed, "error": repr(error)}


def score(result: dict, task: str) -> tuple[float, float]:
    """compare.rank of a finished task; a failed run ranks last."""
    from .compare import rank

    return rank(result.get("results"), task) if result.get("ok") else (-math.inf, -math.inf)


def next_lr(lr: float, up: bool) -> float:
    """Half a decade up or down, on the 1-3-10 grid (3e-3 -> 1e-2, 1e-4 -> 3e-5)."""
    target = math.log10(lr) + (0.5 if up else -0.5)
    decade = math.floor(target)
    candidates = (float(f"{m}e{d}") for d in (decade, decade + 1) for m in (1, 3))
    return min(candidates, key=lambda x: abs(math.log10(x) - target))


class Sweep:
    """Which runs to start next: an arm's lr grid first, edge extensions, then its other seeds at the best lr."""

    def __init__(self, profile: dict, extend: int):
        from .train import arm_settings

        self.profile = profile
        self.seeds = profile.get("seeds", [0])
        self.extend = extend
        self.arms = []
        for index, arm in enumerate(profile["arms"]):
            settings = arm_settings(profile, arm["arm"])
            lrs = sorted(float(x) for x in settings.get("lrs", [settings.get("learning_rate", 1e-3)]))
            seeds = settings.get("seeds", self.seeds)
            self.arms.append({"index": index, "settings": settings, "lrs": lrs, "seeds": seeds,
                              "results": {}, "extended": 0, "best": None, "finals": False})
        self.ready = [(a["index"], 0, lr, a["seeds"][0]) for a in self.arms for lr in a["lrs"]]
        self.running = 0

    def next(self):
        if not self.ready:
            return None
        self.ready.sort()
        index, _, lr, seed = self.ready.pop(0)
        self.running += 1
        return self.arms[index]["settings"], lr, seed, index

    def done(self, index: int, lr: float, seed: int, result: dict) -> None:
        self.running -= 1
        arm = self.arms[index]
        if seed != arm["seeds"][0]:
            return
        arm["results"][lr] = result
        if any(x not in arm["results"] for x in arm["lrs"]):
            return
        task = arm["settings"].get("task", "cls")
        best = max(arm["lrs"], key=lambda x: score(arm["results"][x], task))
        if len(arm["lrs"]) > 1 and arm["extended"] < self.extend and best in (arm["lrs"][0], arm["lrs"][-1]):
            new = next_lr(best, up=best == arm["lrs"][-1])
            arm["lrs"] = sorted(arm["lrs"] + [new])
            arm["extended"] += 1
            self.ready.append((index, 0, new, seed))
            return
        arm["best"] = best
        self.ready.extend((index, 1, best, s) for s in arm["seeds"][1:])


def run_timing(profile: dict, steps: int) -> None:
    """Every arm alone for ``steps`` steps in this process: comparable step times."""
    from .train import arm_settings, run

    failed = 0
    for arm in profile["arms"]:
        settings = arm_settings(profile, arm["arm"])
        if settings.get("skip_timing"):
            continue
        settings.update(max_steps=steps, evaluate=False, diagnostics=False, eval_strategy="no")
        settings["profile"] = f"{profile['name']}/_timing"
        lr = float(settings.get("lrs", [1e-3])[0])
        try:
            record = run(settings, lr, 0)
        except Exception:  # noqa: BLE001 - the sweep records the same failure per run; go on timing the others
            failed += 1
            print(f"[timing] {arm['arm']} failed:\n{traceback.format_exc()}", flush=True)
            continue
        print(f"[timing] {arm['arm']}: {record['step_time'].get('median_s', float('nan')):.4f} s/step", flush=True)
    if failed and failed == len(profile["arms"]):
        raise SystemExit("every timing run failed: the setup is broken (see above); no sweep started")


def main(argv=None) -> None:
    from ..common import quiet_loading

    quiet_loading()  # before the first import of PEFT, whose optional backends log at import
    from .train import load_profile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--jobs", type=int, default=1, help="Runs at once (worker processes).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (CPU).")
    parser.add_argument("--extend", type=int, default=2, help="Edge extensions of an arm's lr grid at most.")
    parser.add_argument("--timing_steps", type=int, default=0, help="First time each arm alone for N steps.")
    parser.add_argument("--deadline_minutes", type=float, default=None, help="Start no run after this long.")
    parser.add_argument("--arms", nargs="*", help="Only these arms.")
    parser.add_argument("--fresh_process", action="store_true",
                        help="Each run in a new process (clean per-run peak memory; costs the start-up each time).")
    parser.add_argument("overrides", nargs="*", help="key=value settings over every arm's.")
    from ..common import parse_args_with_overrides, parse_overrides

    args = parse_args_with_overrides(parser, argv)  # "--arms a b key=value" keeps key=value an override

    profile = load_profile(args.profile)
    overrides = parse_overrides(args.overrides)
    profile["defaults"].update(overrides)
    if args.arms:
        profile["arms"] = [a for a in profile["arms"] if a["arm"] in args.arms]
    started = time.time()
    if args.timing_steps:
        run_timing(profile, args.timing_steps)

    sweep = Sweep(profile, args.extend)
    failures = 0

    def report(index, lr, seed, result):
        nonlocal failures
        sweep.done(index, lr, seed, result)
        failures += not result["ok"]
        if result["ok"]:
            shown = {k: round(v, 4) for k, v in result["results"].get("validation", {}).items()
                     if k in ("accuracy", "perplexity", "exact_match")}
        else:
            shown = result["error"]
        print(f"[{time.time() - started:6.0f}s] {result['arm']} lr={lr:g} seed={seed}: {shown}", flush=True)

    def late():
        return args.deadline_minutes is not None and time.time() - started > 60 * args.deadline_minutes

    if args.jobs == 1 and not args.fresh_process:  # in this process: no start-up cost per worker (the tests' smoke profiles)
        if args.threads:
            _init_worker(args.threads)
        while not late() and (task := sweep.next()) is not None:
            settings, lr, seed, index = task
            report(index, lr, seed, _run_task(settings, lr, seed))
    else:
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker, initargs=(threads,),
                                   max_tasks_per_child=1 if args.fresh_process else None)
        with pool:
            in_flight = {}
            while True:
                while not late() and len(in_flight) < args.jobs and (task := sweep.next()) is not None:
                    settings, lr, seed, index = task
                    in_flight[pool.submit(_run_task, settings, lr, seed)] = (index, lr, seed)
                if not in_flight:
                    break
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    index, lr, seed = in_flight.pop(future)
                    report(index, lr, seed, future.result())
    left = len(sweep.ready)
    print(f"sweep done in {time.time() - started:.0f}s; {failures} failed; {left} not started (deadline)", flush=True)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
