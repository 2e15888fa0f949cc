"""Plumbing the recipes share, so that each ``train.py`` holds only what its comparison is about.

=====================  ==========================================================================================
``profiles``           ``load_profile(path)`` (YAML: ``name``, ``defaults``, ``arms``), ``arm_settings(profile,
                       arm)`` (defaults, then the arm's keys), ``parse_overrides(["k=v", ...])`` and
                       ``parse_value(text)``: the one ``key=value`` parser (``no`` stays ``"no"``, ``1e-3`` is a
                       float; the rules are pinned by ``tests/test_recipes_common.py``);
                       ``parse_args_with_overrides(parser, argv)``: key=value items anywhere on a command line
``records``            ``write_record(folder, record)`` (atomic ``run.json``), ``read_record(folder)``,
                       ``is_finished(folder)`` (a record that does not say ``"finished": false``),
                       ``find_records(root, pattern)``
``machine``            ``hardware(device, world_size)`` (the dict for a record), ``hardware_line(info)`` (one
                       line for a table's caption), ``cpu_name()``
``metrics``            ``stable_rank(weight)`` (||W||_F^2 / ||W||_2^2), ``parameter_counts(model, head_names)``
``optim``              ``OPTIMIZERS`` (adamw / wadam / wfactored -> SpectralAdamW's ``moments``),
                       ``check_optimizer(name, spectral, arm)``
``progress``           ``quiet(trainer, label)``: one tqdm bar per run instead of printed log dicts
``noise``              ``quiet_loading()``: transformers logs errors only (no LOAD REPORT table per run), no bars
                       per dataset map or weight file, no import-time notes of optional libraries
``compare``            ``mean_std(values)``, ``fmt(value, digits)``, ``markdown_table(header, rows)``
=====================  ==========================================================================================

Everything is importable from here: ``from recipes.common import load_profile, write_record, stable_rank``; the
submodules load on first use, so a script that only compares records does not import torch or transformers.
"""

import importlib

_HOMES = {
    "fmt": "compare",
    "markdown_table": "compare",
    "mean_std": "compare",
    "cpu_name": "machine",
    "hardware": "machine",
    "hardware_line": "machine",
    "parameter_counts": "metrics",
    "stable_rank": "metrics",
    "OPTIMIZERS": "optim",
    "check_optimizer": "optim",
    "RecipeLoader": "profiles",
    "arm_settings": "profiles",
    "load_profile": "profiles",
    "parse_args_with_overrides": "profiles",
    "parse_overrides": "profiles",
    "parse_value": "profiles",
    "ProgressBar": "progress",
    "quiet": "progress",
    "quiet_loading": "noise",
    "RECORD_NAME": "records",
    "find_records": "records",
    "is_finished": "records",
    "read_record": "records",
    "record_path": "records",
    "write_record": "records",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
