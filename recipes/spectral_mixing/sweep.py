"""Run every arm of a profile for each of its seeds, one after another, in this process.

    python -m recipes.spectral_mixing.sweep recipes/spectral_mixing/configs/quick.yaml [--seeds 0 1 2] [key=value ...]

Then ``python -m recipes.spectral_mixing.compare runs/spectral_mixing/quick`` prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .train import load_settings, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--seeds", type=int, nargs="*", help="default: the profile's seeds")
    parser.add_argument("--arms", nargs="*", help="default: every arm of the profile")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    profile = yaml.safe_load(Path(args.profile).read_text())
    seeds = args.seeds or profile.get("seeds", [0])
    arms = args.arms or [a["arm"] for a in profile["arms"]]
    for seed in seeds:
        for arm in arms:
            run(load_settings(args.profile, arm, seed, args.overrides))


if __name__ == "__main__":
    main()
