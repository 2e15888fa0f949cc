"""Run every arm x seed of a profile (skipping finished runs), then compare them.

    python -m recipes.shakespeare_char.sweep recipes/shakespeare_char/configs/quick.yaml
    python -m recipes.shakespeare_char.sweep recipes/shakespeare_char/configs/paper.yaml --jobs 16   # one GPU

Runs go seed by seed in the order of the profile's ``arms`` (the arms that have every seed of the
profile first, then those with fewer), each in its own process (``--launcher "accelerate launch"`` to run each on
several processes); ``--jobs`` runs several at once. A run that finished is skipped, an
interrupted one resumes from its last checkpoint, so a long profile can be run in chunks:
``--hours 0.15`` stops starting runs after that long and stops the running ones cleanly.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..common import is_finished, parse_overrides
from .compare import compare
from .train import load_profile, run_settings, train


def planned_runs(profile: dict, arms: list[str] | None, seeds: list[int] | None) -> list[tuple[str, int]]:
    names = [a["arm"] for a in profile["arms"]]
    unknown = sorted(set(arms or []) - set(names))
    if unknown:
        raise ValueError(f"arms {unknown} are not in profile {profile['name']!r}; choose from {names}.")
    chosen = [n for n in names if not arms or n in arms]
    profile_seeds = profile.get("seeds", [0])
    seed_list = seeds if seeds is not None else profile_seeds
    per_arm = {a["arm"]: a.get("seeds", profile_seeds) for a in profile["arms"]}
    runs = [(name, seed) for name in chosen for seed in seed_list if seed in per_arm[name]]
    # the arms with every seed first (the ones a profile's claims rest on), seed by seed; then the rest
    return sorted(
        runs, key=lambda r: (len(per_arm[r[0]]) < len(profile_seeds), seed_list.index(r[1]), chosen.index(r[0]))
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="a profile YAML under recipes/shakespeare_char/configs/")
    parser.add_argument("--arms", default=None, help="comma-separated arms (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one per core or GPU share)")
    parser.add_argument("--launcher", default=None, help='e.g. "accelerate launch" (default: python -m)')
    parser.add_argument("--hours", type=float, default=None, help="stop starting runs after this long")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for every run")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison at the end")
    parser.add_argument("--in-process", action="store_true", help="run one after another in this process")
    args = parser.parse_args(argv)

    profile = load_profile(args.profile)
    arms = args.arms.split(",") if args.arms else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    runs = planned_runs(profile, arms, seeds)
    deadline = None if args.hours is None else time.monotonic() + args.hours * 3600
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]

    def run_one(run: tuple[str, int]) -> str:
        arm, seed = run
        settings = run_settings(profile, arm, seed, args.set)
        out = Path(settings["output_dir"])
        if is_finished(out):
            return f"{arm} seed {seed}: done before"
        extra = []
        if deadline is not None:
            left = (deadline - time.monotonic()) / 60
            if left <= 0:
                return f"{arm} seed {seed}: not started (out of time)"
            extra = [f"time_limit_minutes={left:.2f}"]
        out.mkdir(parents=True, exist_ok=True)
        if args.in_process:
            start = time.monotonic()
            state = "finished" if train({**settings, **parse_overrides(extra)}) else "stopped"
            return f"{arm} seed {seed}: {state} in {time.monotonic() - start:.0f} s"
        command = [*launcher, "-m", "recipes.shakespeare_char.train", args.profile, "--arm", arm, "--seed", str(seed)]
        command += [*args.set, *extra]
        start = time.monotonic()
        with open(out / "log.txt", "a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
        state = "finished" if is_finished(out) else f"stopped (exit {code}; see {out / 'log.txt'})"
        return f"{arm} seed {seed}: {state} in {time.monotonic() - start:.0f} s"

    print(f"{len(runs)} runs of profile {profile['name']!r}, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=1 if args.in_process else args.jobs) as pool:
        for message in pool.map(run_one, runs):
            print(message, flush=True)
    if not args.no_compare:
        runs_dir = Path(run_settings(profile, runs[0][0], runs[0][1], args.set)["output_dir"]).parents[1]
        print(compare(runs_dir))


if __name__ == "__main__":
    main()
