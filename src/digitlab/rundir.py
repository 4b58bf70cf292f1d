"""The run folder's file names and readers, in one place for the training side and for everything
that reads a run (evaluate, predict, report, serve, export, ensembles)."""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from digitlab.errors import DigitlabError, missing

log = logging.getLogger(__name__)

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
    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            # A run killed mid-write leaves a cut last line; what follows a bad line is not to be
            # trusted either (train.py's MetricsLog.truncate_to drops it the same way on resume).
            log.warning("%s: line %d is cut or corrupt; read the %d records before it", path, number, len(records))
            break
        records.append(record)
    return records


def require_model_folder(path: str | Path) -> Path:
    """`path` if it holds a trained run (model.json) or an ensemble (ensemble.json); else the error
    that every command reading a model gives."""
    path = Path(path)
    if not path.is_dir():
        raise missing(path, "a run or ensemble folder", folder=True)
    if not (path / MODEL_META).is_file() and not is_ensemble(path):
        raise DigitlabError(f"{path}: neither a run folder ({MODEL_META}) nor an ensemble ({ENSEMBLE_FILE})"
                            f"{unfinished_hint(path)}")
    return path


def unfinished_hint(path: Path) -> str:
    """What to add to "no model here" when the folder is a run whose training has not finished."""
    if (path / STATE_FILE).is_file():
        return f" (its training has not finished: resume it with `digitlab train --resume {path}`)"
    return ""


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def ensemble_members(path: str | Path) -> list[Path]:
    manifest = Path(path) / ENSEMBLE_FILE
    try:
        names = json.loads(manifest.read_text())["members"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DigitlabError(f"{manifest}: corrupt ensemble manifest ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DigitlabError(f"{manifest}: members must be a list of member folder names, got {names!r}")
    members = [Path(path) / name for name in names]
    if not members:
        raise DigitlabError(f"{manifest}: lists no members")
    return members


# the process's umask, read once: mkstemp makes files 0600 and the writers give them the usual mode
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` through a temp file + rename: a reader sees the old file or the new one.

    A failed write (full disk, quota, read-only folder) is a DigitlabError that names the file
    and says the previous version is untouched.
    """
    existed = path.is_file()
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if existed else "nothing was written"
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            reason = "no space left on device"
        raise DigitlabError(f"{path}: cannot write ({reason}); {kept}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
