"""Trainer checkpoints that a kill cannot turn into a broken resume.

``Trainer`` writes ``checkpoint-N`` in place, file by file, and ``resume_from_checkpoint=True``
takes the highest-numbered folder without checking it: a process killed during a save leaves a
half-written folder that the next run resumes from (and fails on, or worse, loads half of).

The fix has two halves:

- :class:`CompleteCheckpointCallback` writes a manifest, ``checkpoint_complete.json`` (every file's
  size and SHA-256), into each checkpoint once everything in it is written and flushed to disk,
  after all processes have finished their part. The manifest is written to a temporary name and
  renamed, so it is there whole or not at all.
- :func:`last_complete_checkpoint` returns the newest checkpoint whose manifest matches its files,
  and moves newer, incomplete folders aside (to ``incomplete-checkpoint-N``, which neither
  Trainer's resume nor its checkpoint rotation will pick up).

::

    trainer = Trainer(model, args, ..., callbacks=[CompleteCheckpointCallback()])
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))  # None: start fresh

Resuming this way ends with the same coefficients as an uninterrupted run with the same seed
(``tests/test_resume.py`` kills a real training process with SIGKILL mid-save to check it). A
checkpoint whose model weights are a pickle (``*.bin``) is never chosen: adapters are read from
safetensors only. (Trainer's optimizer, scheduler and RNG files are torch pickles, which
transformers loads with ``torch.load(weights_only=True)``, a loader that runs no code.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Optional

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_complete.json"
QUARANTINE_PREFIX = "incomplete-"
PICKLED_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 1 << 20


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.relpath(os.path.join(root, name), folder)
            if path != MANIFEST_NAME and not path.startswith(MANIFEST_NAME + "."):
                found.append(path)
    return sorted(found)


def write_manifest(folder: str, hash_files: bool = True) -> str:
    """Flush every file of ``folder`` to disk and record it in the manifest; return the manifest's path."""
    entries = {}
    for relative in _files(folder):
        path = os.path.join(folder, relative)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        entries[relative] = {"size": os.path.getsize(path), **({"sha256": _sha256(path)} if hash_files else {})}
    for root, _, _ in os.walk(folder):
        _fsync_dir(root)
    manifest = os.path.join(folder, MANIFEST_NAME)
    temporary = f"{manifest}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"files": entries}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, manifest)  # atomic: the manifest is whole or absent
    _fsync_dir(folder)
    return manifest


def verify_checkpoint(folder: str, check_hashes: bool = True) -> Optional[str]:
    """None if ``folder`` is a complete checkpoint, else why it is not (a sentence)."""
    manifest = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return f"it has no {MANIFEST_NAME}: its save did not finish (or it was not written with CompleteCheckpointCallback)"
    try:
        with open(manifest, encoding="utf-8") as handle:
            entries = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST_NAME} is unreadable ({error})"
    if not entries:
        return "its manifest lists no files"
    pickled = [name for name in entries if os.path.basename(name) in PICKLED_WEIGHTS]
    if pickled:
        return f"its weights are pickles ({', '.join(pickled)}); only safetensors checkpoints are resumed"
    for relative, entry in entries.items():
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            return f"{relative} is missing"
        if os.path.getsize(path) != entry.get("size"):
            return f"{relative} has {os.path.getsize(path)} bytes, the manifest says {entry.get('size')}"
        if check_hashes and "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{relative} does not match its SHA-256 in the manifest"
    return None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _quarantine(output_dir: str, name: str) -> str:
    target = os.path.join(output_dir, QUARANTINE_PREFIX + name)
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(output_dir, f"{QUARANTINE_PREFIX}{name}.{suffix}")
        suffix += 1
    os.replace(os.path.join(output_dir, name), target)
    return target


def last_complete_checkpoint(
    output_dir: str, quarantine: bool = True, check_hashes: bool = True
) -> Optional[str]:
    """The newest complete ``checkpoint-N`` in ``output_dir``, or None (then training starts fresh).

    Newer folders that are incomplete are logged and, with ``quarantine=True`` (on the main process
    only), renamed to ``incomplete-checkpoint-N`` so that neither ``resume_from_checkpoint=True`` nor
    Trainer's checkpoint rotation picks them up. Pass the result to
    ``trainer.train(resume_from_checkpoint=...)``; every process computes the same answer.
    """
    if not os.path.isdir(output_dir):
        return None
    numbered = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            numbered.append((int(match.group(1)), name))
    for _, name in sorted(numbered, reverse=True):
        folder = os.path.join(output_dir, name)
        problem = verify_checkpoint(folder, check_hashes=check_hashes)
        if problem is None:
            return folder
        if quarantine and _is_main_process():
            moved = _quarantine(output_dir, name)
            logger.warning("Skipping %s: %s. Moved it to %s.", folder, problem, moved)
        else:
            logger.warning("Skipping %s: %s.", folder, problem)
    return None


class CompleteCheckpointCallback(TrainerCallback):
    """Marks each Trainer checkpoint complete once all of it is on disk (see the module docstring).

    Args:
        hash_files: record each file's SHA-256 as well as its size (reads every file once per save;
            turn off for checkpoints of many gigabytes, and sizes alone are checked).
    """

    def __init__(self, hash_files: bool = True):
        self.hash_files = hash_files

    def on_train_begin(self, args, state, control, **kwargs):
        if args.save_total_limit == 1:
            raise ValueError(
                "save_total_limit=1 lets Trainer delete the last complete checkpoint right after writing a new one "
                "and before it is marked complete, so a kill at that moment leaves nothing to resume from. Use "
                "save_total_limit=2 or more (or None) with CompleteCheckpointCallback."
            )

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        _barrier()  # every process has written its part (its RNG state, its shards)
        if state.is_world_process_zero and os.path.isdir(folder):
            write_manifest(folder, hash_files=self.hash_files)
        _barrier()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
