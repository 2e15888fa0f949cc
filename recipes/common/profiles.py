"""Profiles (YAML) and ``key=value`` overrides: one reader and one parser for every recipe.

A profile is a YAML file with ``defaults`` (settings every run shares) and a list of ``arms`` (each a dict with
an ``arm`` name and the keys it changes); ``name`` defaults to the file's stem::

    name: smoke
    defaults: {max_steps: 4, save_strategy: no}
    arms:
      - {arm: dense, kind: dense}

Profiles and overrides are read with the same YAML rules, YAML 1.1 with two changes that make a setting mean
what it says:

- only ``true`` and ``false`` (any case) are booleans; ``no``, ``yes``, ``on`` and ``off`` stay words, so
  ``save_strategy=no`` is the string ``"no"`` that ``TrainingArguments`` expects;
- ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3`` and reads ``1e-3`` as a string).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

_BOOL = "tag:yaml.org,2002:bool"


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with booleans only from true/false and floats without a dot (1e-3)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """One override's value: ``4`` -> 4, ``1e-3`` -> 0.001, ``no`` -> "no", ``true`` -> True, ``[1, 2]`` -> a list,
    ``null`` or nothing -> None, anything else -> the text itself."""
    return yaml.load(text, Loader=RecipeLoader)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["max_steps=100", "save_strategy=no"]`` -> ``{"max_steps": 100, "save_strategy": "no"}`` (later wins)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key=value, e.g. max_steps=100.")
        overrides[key.strip()] = parse_value(value)
    return overrides


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser``'s arguments, with every ``key=value`` item of ``argv`` in ``args.overrides`` wherever it stands.

    argparse alone lets an option of many values (``--learning-rates 8e-3 4e-3 max_steps=1500``) swallow the
    overrides after it; here they are taken out first, so they may come before, between or after the options.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [item for item in argv if _OVERRIDE.match(item)]
    args = parser.parse_intermixed_args([item for item in argv if not _OVERRIDE.match(item)])
    args.overrides = list(getattr(args, "overrides", None) or []) + overrides
    return args


def read_yaml(path: str | Path) -> Any:
    """A YAML file of any shape, read with the rules above (for recipes whose settings are one flat dict)."""
    return yaml.load(Path(path).read_text(), Loader=RecipeLoader)


def load_profile(path: str | Path) -> dict:
    """The profile at ``path``, with ``name`` (default: the file's stem) and ``defaults`` (default: empty)."""
    path = Path(path)
    profile = read_yaml(path)
    if not isinstance(profile, dict) or not isinstance(profile.get("arms"), list):
        raise ValueError(f"{path} is not a profile: it needs `defaults:` and a list of `arms:`.")
    missing = [i for i, arm in enumerate(profile["arms"]) if not isinstance(arm, dict) or "arm" not in arm]
    if missing:
        raise ValueError(f"{path}: arms number {missing} have no `arm:` name; write each as {{arm: NAME, ...}}.")
    profile.setdefault("name", path.stem)
    profile.setdefault("defaults", {})
    return profile


def arm_settings(profile: dict, arm: str) -> dict:
    """The flat settings of ``arm``: the profile's defaults, then the arm's own keys, and ``profile: NAME``."""
    arms = {a["arm"]: a for a in profile["arms"]}
    if arm not in arms:
        raise ValueError(f"arm {arm!r} is not in profile {profile['name']!r}; choose from {sorted(arms)}.")
    settings = copy.deepcopy(profile.get("defaults") or {})
    settings.update(copy.deepcopy(arms[arm]))
    settings["profile"] = profile["name"]
    return settings
