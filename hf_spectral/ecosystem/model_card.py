"""A model card that says what a spectral adapter is, written from the adapter's own files.

PEFT's ``save_pretrained`` writes a generic template, and ``push_to_hub`` (transformers'
``PushToHubMixin``) replaces it with a generic transformers card, so neither tells a reader that
the adapter needs ``import hf_spectral``, nor its mode, layout or K. This card does.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from .adapter_files import WEIGHTS_NAME, AdapterSummary, read_adapter

MAX_TABLE_ROWS = 200

# PEFT task types -> the transformers Auto class that loads the base model
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}

MODE_TEXT = {
    "delta": (
        "**delta**: each targeted layer computes `W0 x + scaling * IDCT2(S) x`; the pretrained weight `W0` stays "
        "frozen and only the K coefficients `S` per layer are trained and stored (a peer of LoRA and FourierFT)."
    ),
    "replace": (
        "**replace**: each targeted layer's dense weight is released and the layer computes `IDCT2(S) x` from K "
        "coefficients. The adapter holds the whole model's trained weights: the coefficients and every other "
        "saved parameter (embeddings, norms, biases, head). `merge_and_unload()` gives back a dense model."
    ),
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

# hf-spectral is not on PyPI: it installs from a checkout or from its git repository
INSTALL = (
    "Install hf-spectral (it is not on PyPI) from a checkout of its repository, `pip install -e .`, or straight "
    "from git: `pip install \"hf-spectral @ git+https://github.com/<OWNER>/hf_spectral.git\"`, where "
    "`<OWNER>/hf_spectral` is a placeholder for the repository you got it from."
)


def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and _REPO_ID.match(name) is not None and not os.path.exists(name)


def _format_count(count: int) -> str:
    return f"{count:,}"


def size_in_bytes(size: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ... (also the CLI's)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _loader_class(config: dict) -> str:
    task = config.get("task_type")
    if task in AUTO_CLASSES:
        return AUTO_CLASSES[task]
    mapping = config.get("auto_mapping") or {}
    return mapping.get("base_model_class") or "AutoModel"


def render_model_card(
    summary: AdapterSummary,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    tags: Optional[list[str]] = None,
) -> str:
    """The README.md text (YAML metadata, then markdown) for a spectral adapter."""
    from .._version import __version__

    config = summary.config
    base = base_model or summary.base_model
    mode = summary.mode
    loader = _loader_class(config)
    where = repo_id or "path/to/this/adapter"

    metadata = ["---", "library_name: peft"]
    if _is_hub_id(base):  # the Hub rejects a base_model that is not a repo id (a local path, say)
        metadata.append(f"base_model: {base}")
    all_tags = ["peft", "hf-spectral", "spectral", "dct", f"spectral-{mode}"]
    if _is_hub_id(base):
        all_tags.append(f"base_model:adapter:{base}")
    for tag in tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    metadata.append("tags:")
    metadata.extend(f"- {tag}" for tag in all_tags)
    metadata.append("---")

    ks = sorted({layer.n_coefficients for layer in summary.layers})
    k_text = str(ks[0]) if len(ks) == 1 else f"{ks[0]} to {ks[-1]}"
    dense = summary.dense_parameters
    share = f" ({summary.spectral_parameters / dense:.2%} of the {_format_count(dense)} entries of those layers' dense weights)" if dense else ""

    lines = metadata + [
        "",
        f"# Spectral adapter{' for ' + base if base else ''}",
        "",
        "A spectral (DCT-coefficient) adapter made with hf_spectral "
        f"{__version__}, a PEFT method (`peft_type: SPECTRAL`). A targeted layer's weight `W` (out x in) is written "
        "in the 2-D orthonormal DCT basis, `W = C_m^T S C_n`, and only K entries of `S` are stored and trained.",
        "",
        "## What it is",
        "",
        "| | |",
        "|---|---|",
        "| method | spectral (hf_spectral) |",
        f"| mode | {mode} |",
        f"| layout (which coefficients are kept) | {config.get('layout')} |",
        f"| basis | {config.get('basis', 'dct')} |",
        "| index set | " + (
            "saved with the adapter (it depends on the weights)"
            if any(layer.has_saved_indices for layer in summary.layers)
            else "recomputed from each layer's shape, K and the seed"
        ) + " |",
    ]
    if mode == "delta":
        lines.append(f"| scaling | {config.get('scaling')} |")
    lines += [
        f"| seed | {config.get('seed')} |",
        f"| spectral layers | {len(summary.layers)} |",
        f"| K per layer | {k_text} |",
        f"| spectral coefficients | {_format_count(summary.spectral_parameters)}{share} |",
    ]
    if summary.other_parameters:
        lines.append(f"| other saved parameters | {_format_count(summary.other_parameters)} |")
    lines += [
        f"| trainable parameters (saved) | {_format_count(summary.total_parameters)} |",
        f"| base model | {base or 'not recorded (built from a config)'} |",
        f"| weights file | `{WEIGHTS_NAME}`, {size_in_bytes(summary.file_sizes.get(WEIGHTS_NAME, 0))} |",
        "",
        MODE_TEXT.get(mode, ""),
        "",
        "## How to load it",
        "",
        INSTALL,
        "",
        "Then `import hf_spectral` first: it registers the `spectral` method with PEFT, "
        "which has no plugin discovery (an installed hf-spectral also registers itself when PEFT is imported, "
        "but the explicit import works everywhere). Without it PEFT fails with `KeyError: 'SPECTRAL'`.",
        "",
        "```python",
        "import hf_spectral  # registers the spectral PEFT method",
        f"from transformers import {loader}",
        "from peft import PeftModel",
        "",
        f"base = {loader}.from_pretrained({base or '...the base model...'!r})",
        f"model = PeftModel.from_pretrained(base, {where!r})",
    ]
    if mode == "delta":
        lines.append("model = model.merge_and_unload()  # optional: fold the update into the dense weights")
    lines += [
        "```",
        "",
        f"The package's command line lists every layer's K and shape: `hf-spectral inspect {where}`.",
        "",
        "## Layers",
        "",
        "| layer | shape (out x in) | K | K / (out x in) |",
        "|---|---|---|---|",
    ]
    for layer in summary.layers[:MAX_TABLE_ROWS]:
        shape = f"{layer.shape[0]} x {layer.shape[1]}" if layer.shape else "?"
        ratio = f"{layer.n_coefficients / layer.dense_parameters:.2%}" if layer.shape else "?"
        lines.append(f"| `{layer.name}` | {shape} | {layer.n_coefficients} | {ratio} |")
    if len(summary.layers) > MAX_TABLE_ROWS:
        lines.append(f"| ... and {len(summary.layers) - MAX_TABLE_ROWS} more | | | |")
    lines.append("")
    return "\n".join(lines)


def write_model_card(
    adapter_dir: str,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    tags: Optional[list[str]] = None,
) -> str:
    """Write README.md into a saved spectral adapter's folder (replacing PEFT's template); return its path."""
    card = render_model_card(read_adapter(adapter_dir), repo_id=repo_id, base_model=base_model, tags=tags)
    path = os.path.join(adapter_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(card)
    return path
