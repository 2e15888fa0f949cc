"""Run every arm of a profile for each of its learning rates and seeds, one after another, in this process.

    python -m recipes.spectral_mixing.sweep recipes/spectral_mixing/configs/fair.yaml \
        [--seeds 0 1 2] [--arms attention mixer] [--learning-rates 1e-3 2e-3] [key=value ...]

The profile may list ``seeds`` and ``learning_rates`` (each arm is trained at every rate: each arm is then
read at its own best rate); without ``learning_rates`` every run uses the profile's ``learning_rate``.
Then ``python -m recipes.spectral_mixing.compare runs/spectral_mixing/fair`` prints the tables.
"""

from __future__ import annotations

import argparse

from recipes.common.profiles import load_profile, parse_args_with_overrides

from .train import load_settings, run


def plan(profile_path: str, seeds=None, arms=None, learning_rates=None) -> list[tuple[str, float | None, int]]:
    """The (arm, learning rate, seed) runs, in the order they run: seed-major, so a cut sweep has whole seeds."""
    profile = load_profile(profile_path)
    seeds = seeds or profile.get("seeds", [0])
    arms = arms or [a["arm"] for a in profile["arms"]]
    rates = learning_rates or profile.get("learning_rates") or [None]
    return [(arm, rate, seed) for seed in seeds for rate in rates for arm in arms]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--seeds", type=int, nargs="*", help="default: the profile's seeds")
    parser.add_argument("--arms", nargs="*", help="default: every arm of the profile")
    parser.add_argument("--learning-rates", type=float, nargs="*", help="default: the profile's learning_rates")
    parser.add_argument("overrides", nargs="*", help="key=value settings over every run's, anywhere on the line")
    args = parse_args_with_overrides(parser, argv)
    for arm, rate, seed in plan(args.profile, args.seeds, args.arms, args.learning_rates):
        overrides = list(args.overrides) + ([] if rate is None else [f"learning_rate={rate}"])
        run(load_settings(args.profile, arm, seed, overrides))


if __name__ == "__main__":
    main()
