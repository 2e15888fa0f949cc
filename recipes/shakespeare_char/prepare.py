"""Prepare character-level tiny Shakespeare (nanoGPT's convention).

    python -m recipes.shakespeare_char.prepare [--input PATH] [--out runs/shakespeare_char/data]

65 characters, sorted; the first 90% of the text is the training split, the last 10% validation.
Writes train.bin and val.bin (uint16 token ids) and meta.json (the vocabulary). The text is, in order:
``--input``; the shared copy ``../shared/data/tinyshakespeare/input.txt`` beside the repository, if it is
there (``$HF_SPECTRAL_SHARED`` names another shared folder); the copy shipped with the recipe
(``data/input.txt.bz2``, checked against its sha256: MIT-licensed, from karpathy/char-rnn, see
``data/README.md``); and only if that is missing or damaged, a download from the canonical address. So a
fresh clone works offline and never waits on the network.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
import urllib.request
from pathlib import Path

import numpy as np

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # of the canonical input.txt
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_COPY = Path(__file__).resolve().parent / "data" / "input.txt.bz2"
DEFAULT_OUT = REPO_ROOT / "runs" / "shakespeare_char" / "data"
TRAIN_SHARE = 0.9


def shared_copy() -> Path:
    """Where a shared copy would be: ``$HF_SPECTRAL_SHARED`` (default ``../shared`` beside the repository)
    ``/data/tinyshakespeare/input.txt``. It need not exist."""
    shared = Path(os.environ.get("HF_SPECTRAL_SHARED", REPO_ROOT.parent / "shared"))
    return shared / "data" / "tinyshakespeare" / "input.txt"


def shipped_text() -> str | None:
    """The copy shipped with the recipe, or None if it is missing or not the canonical file."""
    if not SHIPPED_COPY.is_file():
        return None
    raw = bz2.decompress(SHIPPED_COPY.read_bytes())
    return raw.decode("utf-8") if hashlib.sha256(raw).hexdigest() == SHA256 else None


def read_text(input_path: str | None) -> tuple[str, str]:
    """The raw text and where it came from: ``--input``, the shared copy, the shipped copy, a download."""
    if input_path:
        path = Path(input_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"--input {input_path!r} is not a file. Give the path of tiny Shakespeare's input.txt."
            )
        return path.read_text(encoding="utf-8"), str(path)
    shared = shared_copy()
    if shared.is_file():
        return shared.read_text(encoding="utf-8"), str(shared)
    text = shipped_text()
    if text is not None:
        return text, f"{SHIPPED_COPY.relative_to(REPO_ROOT)} (shipped with the recipe)"
    try:
        with urllib.request.urlopen(URL, timeout=30) as response:
            return response.read().decode("utf-8"), URL
    except OSError as error:
        raise RuntimeError(
            f"{SHIPPED_COPY} is missing or damaged and {URL} could not be downloaded ({error}). Restore the file "
            "(git checkout recipes/shakespeare_char/data) or pass --input PATH/input.txt."
        ) from error


def prepare(input_path: str | None = None, out: str | Path = DEFAULT_OUT) -> dict:
    """Write train.bin, val.bin and meta.json under ``out`` (skipped if they match the text); return meta."""
    out = Path(out)
    text, source = read_text(input_path)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    meta_path = out / "meta.json"
    if meta_path.is_file() and (out / "train.bin").is_file() and (out / "val.bin").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") == digest:
            return meta
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    split = int(TRAIN_SHARE * len(ids))
    out.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(out / "train.bin")
    ids[split:].tofile(out / "val.bin")
    meta = {
        "vocab_size": len(chars),
        "chars": "".join(chars),
        "train_tokens": int(split),
        "val_tokens": int(len(ids) - split),
        "source": source,
        "sha256": digest,
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    return np.fromfile(Path(data_dir) / f"{split}.bin", dtype=np.uint16)


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run `python -m recipes.shakespeare_char.prepare [--input PATH]` first."
        )
    return json.loads(path.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", default=None, help="path of input.txt (default: the shared copy, else the shipped one)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for train.bin, val.bin, meta.json")
    args = parser.parse_args(argv)
    meta = prepare(args.input, args.out)
    print(
        f"{meta['vocab_size']} characters; {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
        f"from {meta['source']} -> {args.out}"
    )


if __name__ == "__main__":
    main()
