"""Run records: each run writes one ``run.json`` (its settings, counts, curves, timings, hardware).

A record is written whole or not at all (to ``run.json.partial``, then renamed), so a ``run.json`` that exists
can be read. A run is *finished* when its record exists and does not say ``"finished": false`` (a run stopped
at a time limit records how far it got and says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

RECORD_NAME = "run.json"


def record_path(folder_or_file: str | Path) -> Path:
    path = Path(folder_or_file)
    return path if path.suffix == ".json" else path / RECORD_NAME


def write_record(folder_or_file: str | Path, record: dict) -> Path:
    """Write ``record`` as ``run.json`` (in a folder, or at a ``.json`` path) atomically; return its path."""
    path = record_path(folder_or_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1, default=str))
    partial.replace(path)
    return path


def read_record(folder_or_file: str | Path) -> Optional[dict]:
    """The record in a run folder (or at a path), or None if there is none."""
    path = record_path(folder_or_file)
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(folder_or_file: str | Path) -> bool:
    """Whether the run has a record that does not say it stopped early."""
    record = read_record(folder_or_file)
    return record is not None and record.get("finished", True) is not False


def find_records(root: str | Path, pattern: str = f"**/{RECORD_NAME}") -> list[tuple[Path, dict]]:
    """Every record under ``root`` matching ``pattern`` (sorted by path), with its path."""
    return [(path, json.loads(path.read_text())) for path in sorted(Path(root).glob(pattern))]
