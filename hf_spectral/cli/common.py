"""What the commands share: the error type, argument checks, tables, progress bars, model loading."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from typing import Optional

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class CLIError(Exception):
    """A failure the user can fix; the message says how."""


# --------------------------------------------------------------------------------------------------
# small helpers


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction in (0, 1], e.g. 0.5") from None
    if not (0.0 < value <= 1.0) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]; e.g. 0.5 keeps half of each layer's coefficients")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def image_path(text: str) -> str:
    if not text.lower().endswith(IMAGE_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    return text


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({error})") from None
    return text


def count(n: int) -> str:
    return f"{n:,}"


def size_in_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def progress(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def quiet_libraries():
    """transformers' and PEFT's advisory warnings would bury the report; errors still surface."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)


def load_model(name: str, revision: Optional[str], dtype: str):
    """A pretrained model from a folder or the Hub: causal LM if it is one, else the bare model."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as error:  # no such folder or repo, no config.json, an unknown model type
        raise CLIError(f"cannot load a model from {name!r}: {str(error).strip().splitlines()[0]}") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch_dtype)
    except ValueError:  # not a causal LM (an encoder, say): its body has the same linear layers
        return AutoModel.from_pretrained(name, revision=revision, dtype=torch_dtype, config=config)

