"""What the commands share: the error type, argument checks, tables, progress bars, model loading."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import threading
from typing import Optional

from hf_spectral_cli import OPTIONAL_EXTRAS_LOGGERS  # the entry point quiets them before the package's import

from ..ecosystem.model_card import size_in_bytes  # noqa: F401  (the one byte formatter; the commands import it here)

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
def quiet_libraries(verbose: bool = False):
    """transformers', PEFT's and optional libraries' advisory output would bury the report; errors still surface.

    With ``verbose`` nothing is silenced. If transformers is not loaded yet, ``TRANSFORMERS_VERBOSITY`` tells it
    its level when a command loads it.
    """
    if verbose:
        yield
        return
    import logging
    import warnings

    loggers = {name: logging.getLogger(name) for name in OPTIONAL_EXTRAS_LOGGERS}
    levels = {name: logger.level for name, logger in loggers.items()}
    env = os.environ.get("TRANSFORMERS_VERBOSITY")
    loaded = "transformers" in sys.modules
    if loaded:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    for logger in loggers.values():
        logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # PEFT's notes about the base it saves from (no config.json beside a .gguf, ...): not the user's to act on
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
        try:
            yield
        finally:
            for name, logger in loggers.items():
                logger.setLevel(levels[name])
            if env is None:
                os.environ.pop("TRANSFORMERS_VERBOSITY", None)
            else:
                os.environ["TRANSFORMERS_VERBOSITY"] = env
            if "transformers" in sys.modules:
                from transformers.utils import logging as hf_logging

                before = verbosity if loaded else hf_logging.log_levels.get(env or "", hf_logging.WARNING)
                hf_logging.set_verbosity(before)


def model_order(name: str) -> tuple:
    """Sort key for the layers of a saved adapter: numbers compare as numbers (layers.2 before layers.10).

    An adapter lists its tensors alphabetically (layers.0, layers.1, layers.10, ...) and keeps no record of the
    model's order; this restores the order of the blocks, and within a block sorts by name.
    """
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


# --------------------------------------------------------------------------------------------------
# where a model or adapter comes from: a local path, or a Hub repo id (and whether the Hub is reachable)

NETWORK_TIMEOUT_S = 3.0


def _looks_like_a_path(name: str) -> bool:
    """A name that cannot be a Hub repo id (owner/name has one slash at most) is meant as a path."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", ".."):
        return True
    if name.count("/") > 1 or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return True
    return name.endswith((".gguf", ".json", ".safetensors", ".bin", ".pt"))


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = NETWORK_TIMEOUT_S) -> Optional[str]:
    """None if a TCP connection to the Hub's endpoint opens within ``timeout`` seconds, else why not.

    Runs in a daemon thread, so a resolver that hangs cannot hang the command.
    """
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{type(error).__name__}: {error}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:.0f} s"


def check_source(name: str, revision: Optional[str], expected_file: str, what: str) -> str:
    """Say in one line what is wrong with ``name`` before any library tries (and answers with a side issue).

    Returns ``"local"`` for an existing path and ``"hub"`` for a Hub repo id that can be fetched (online, or
    in the local cache: then the Hub libraries are switched to offline mode for this command). Raises
    :class:`CLIError` for a path that does not exist, a name that is no repo id, and a repo id without
    network that is not in the cache.
    """
    if os.path.exists(name):
        return "local"
    if _looks_like_a_path(name):
        raise CLIError(f"{name!r}: no such file or folder. Give an existing {what} folder, or a Hub repo id (owner/name).")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CLIError(
            f"{name!r} is neither a local folder nor a valid Hub repo id (owner/name: letters, digits, '-', '_', '.'); "
            f"check the spelling, or give an existing {what} folder."
        ) from None
    cached = isinstance(try_to_load_from_cache(name, expected_file, revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise CLIError(
                f"{name!r} is not a local folder, and HF_HUB_OFFLINE is set while the Hub cache has no copy of it: "
                "unset HF_HUB_OFFLINE to download it, or give a local folder."
            )
        return "hub"
    problem = hub_reachable()
    if problem is None:
        return "hub"
    if cached:
        constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub: use the cache, do not retry
        print(f"no network ({_hub_endpoint()} unreachable): using the cached copy of {name!r}", file=sys.stderr)
        return "hub"
    raise CLIError(
        f"no network: {name!r} is not a local folder, and the Hub ({_hub_endpoint()}) cannot be reached "
        f"({problem}). Download the {what} where there is network and give its folder, or check the connection."
    )


def load_model(name: str, revision: Optional[str], dtype: str):
    """A pretrained model from a folder, a ``.gguf`` file or the Hub: causal LM if it is one, else the bare model."""
    check_source(name, revision, "config.json", "model")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kwargs = {"revision": revision}
    if os.path.isfile(name):
        if not name.endswith(".gguf"):
            raise CLIError(f"{name!r} is a file; give a model folder (with config.json), a .gguf file or a Hub repo id.")
        # transformers reads a GGUF from its folder and file name, and dequantizes it (tens of seconds)
        name, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:  # no config.json, an unknown model type
        raise CLIError(f"cannot load a model from {name!r}: {str(error).strip().splitlines()[0]}") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    except ValueError:  # not a causal LM (an encoder, say): its body has the same linear layers
        return AutoModel.from_pretrained(name, dtype=torch_dtype, config=config, **kwargs)

