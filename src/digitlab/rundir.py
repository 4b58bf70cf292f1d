"""The run folder's file names and readers, in one place for the training side and for everything
that reads a run (evaluate, predict, report, serve, export, ensembles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from digitlab.errors import DigitlabError

CONFIG_FILE = "config.json"  # the resolved config, versions and data fingerprints, written at the start
METRICS_FILE = "metrics.jsonl"  # every batch's loss and one record per epoch
MODEL_FILE = "model.safetensors"  # the final weights
MODEL_META = "model.json"  # what rebuilds the model from MODEL_FILE, with its sha256
STATE_FILE = "checkpoint.safetensors"  # the resumable training state, rewritten atomically every epoch
ONNX_FILE = "model.onnx"  # `digitlab export`
TRAIN_HASHES_FILE = "train_hashes.npy"  # sorted unique uint64 hashes of every training image (.npy, no pickle)
ENSEMBLE_FILE = "ensemble.json"  # an ensemble folder's manifest: its member run folders
MEMBER_PREFIX = "member-"  # an ensemble's member folders: member-0, member-1, ...


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def ensemble_members(path: str | Path) -> list[Path]:
    manifest = Path(path) / ENSEMBLE_FILE
    try:
        names = json.loads(manifest.read_text())["members"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DigitlabError(f"{manifest}: corrupt ensemble manifest ({exc})") from None
    members = [Path(path) / name for name in names]
    if not members:
        raise DigitlabError(f"{manifest}: lists no members")
    return members
