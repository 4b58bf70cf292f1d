"""A table of the run and ensemble folders under one directory (`digitlab runs`).

Only the small JSON files and the checkpoint's header are read, never the weights, so listing
is quick and a damaged or foreign folder becomes a row that says so instead of an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from digitlab.errors import DigitlabError, missing
from digitlab.rundir import CONFIG_FILE, ENSEMBLE_FILE, MEMBER_PREFIX, MODEL_FILE, MODEL_META, STATE_FILE


@dataclass
class RunRow:
    """One folder: a run, an ensemble, an ensemble's member, or something else."""

    name: str  # path relative to the listed directory (a member: ENSEMBLE/member-N)
    kind: str  # run | ensemble | member | other
    state: str  # finished | interrupted | not started | broken | not a run
    preset: str | None = None
    model: str | None = None
    data: str | None = None  # the training source
    fingerprint: str | None = None  # of the training images actually used (after the split)
    epochs_done: int | None = None  # complete epochs
    epochs_planned: int | None = None
    val_acc: float | None = None  # the last evaluated epoch's (an ensemble: none, members differ in split)
    # `digitlab evaluate` stores no result in the run folder, so there is nothing to read yet.
    test_acc: float | None = None
    train_seconds: float | None = None  # optimisation time (an ensemble: summed over members)
    started: str | None = None
    members: int | None = None  # an ensemble: how many members it lists / has started
    resume: str | None = None  # the command that continues an interrupted run
    problem: str | None = None  # why a folder is broken or not listed as a run
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(RunRow))


def _read_json(path: Path) -> dict[str, Any] | None:
    """The object in `path`, None if the file is absent; DigitlabError if it is not a JSON object."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DigitlabError(f"{path.name}: corrupt JSON ({exc})") from None
    except OSError as exc:
        raise DigitlabError(f"{path.name}: unreadable ({exc.strerror})") from None
    if not isinstance(value, dict):
        raise DigitlabError(f"{path.name}: expected a JSON object")
    return value


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _last_val_acc(history: list[Any]) -> float | None:
    for record in reversed(history):
        if isinstance(record, dict) and (acc := _number(record.get("val_acc"))) is not None:
            return acc
    return None


def is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in (CONFIG_FILE, MODEL_META, STATE_FILE))


def read_run(path: Path, name: str, kind: str = "run") -> RunRow:
    """The row of one run folder; any damage is reported in the row, never raised."""
    row = RunRow(name=name, kind=kind, state="broken", path=str(path))
    try:
        _fill_run(row, path)
    except DigitlabError as exc:
        row.state, row.problem = "broken", str(exc)
    return row


def _fill_config(row: RunRow, record: dict[str, Any]) -> None:
    """What config.json (or model.json, which repeats it) says about the recipe and the data."""
    config, data = _dict(record.get("config")), _dict(record.get("data"))
    row.preset, row.model = _str(config.get("preset")), _str(config.get("model"))
    row.data = _str(data.get("train_source")) or _str(config.get("data"))
    row.fingerprint = _str(data.get("train_fingerprint"))
    row.epochs_planned = _int(config.get("epochs"))
    row.started = _str(record.get("started"))


def _check_weights(path: Path, meta: dict[str, Any]) -> None:
    """A finished run is one whose weights are there and are the ones model.json names (a copy cut
    short or replaced is broken). Hashing a few MB per run keeps the table quick."""
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise DigitlabError(f"{MODEL_FILE}: missing")
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != meta.get("weights_sha256"):
        raise DigitlabError(f"{MODEL_FILE}: does not match the sha256 in {MODEL_META} (cut short or replaced)")


def _fill_run(row: RunRow, path: Path) -> None:
    config_file = _read_json(path / CONFIG_FILE) or {}
    _fill_config(row, config_file)  # first: a damaged model.json still shows the recipe
    meta = _read_json(path / MODEL_META)
    if not config_file and meta is not None:
        _fill_config(row, meta)
    if meta is not None:
        metrics = _dict(meta.get("metrics"))
        _check_weights(path, meta)
        row.state = "finished"
        row.preset = _str(meta.get("preset")) or row.preset
        row.model = _str(meta.get("model")) or row.model
        row.epochs_done = _int(metrics.get("epoch"))
        row.val_acc = _number(metrics.get("val_acc"))
        row.train_seconds = _number(meta.get("train_seconds"))
        return
    if (path / STATE_FILE).is_file():
        from digitlab.checkpoint import read_state_header  # torch: only when a checkpoint is there

        header = read_state_header(path / STATE_FILE)
        info = _dict(header.get("info"))
        position = _dict(info.get("position"))
        raw_history = info.get("history")
        history: list[Any] = raw_history if isinstance(raw_history, list) else []
        epoch, step = _int(position.get("epoch")), _int(position.get("step"))
        if epoch is None or step is None:
            raise DigitlabError(f"{STATE_FILE}: its header has no training position")
        row.state = "interrupted"
        row.epochs_done = epoch if step == 0 else epoch - 1  # step > 0: stopped inside `epoch`
        row.val_acc = _last_val_acc(history)
        seconds = [_number(_dict(r).get("train_seconds")) for r in history]
        seconds.append(_number(position.get("train_seconds")) if step else 0.0)
        row.train_seconds = sum(s for s in seconds if s is not None)
        row.resume = f"digitlab train --resume {path}"
        if step:
            row.problem = f"stopped in epoch {epoch} after step {step}"
        return
    if config_file:
        row.state = "not started"
        row.problem = f"no {STATE_FILE}: it stopped before its first epoch ended, nothing to resume"
        return
    raise DigitlabError(f"no {CONFIG_FILE}, {MODEL_META} or {STATE_FILE}")


def read_ensemble(path: Path, name: str) -> list[RunRow]:
    """The ensemble's row, then one row per member folder."""
    row = RunRow(name=name, kind="ensemble", state="broken", path=str(path))
    member_dirs = sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith(MEMBER_PREFIX))
    listed: list[str] = []
    manifest: dict[str, Any] | None = None
    try:
        manifest = _read_json(path / ENSEMBLE_FILE)
        if manifest is not None:
            members = manifest.get("members")
            listed = members if isinstance(members, list) else []
            if not listed or not all(isinstance(m, str) for m in listed):
                raise DigitlabError(f"{ENSEMBLE_FILE}: lists no members")
            row.preset = _str(manifest.get("preset"))
            config = _dict(manifest.get("config"))
            row.epochs_planned = _int(config.get("epochs"))
            row.data = _str(config.get("data"))
            member_dirs = [path / m for m in listed]
    except DigitlabError as exc:
        row.problem = str(exc)
    members = [read_run(m, f"{name}/{m.name}", kind="member") for m in member_dirs]
    row.members = len(members)
    if members:
        first = members[0]
        row.preset = row.preset or first.preset
        row.model = first.model
        row.data = row.data or first.data
        row.epochs_planned = row.epochs_planned or first.epochs_planned
        row.started = min((m.started for m in members if m.started), default=None)
        done = [m.epochs_done for m in members if m.epochs_done is not None]
        row.epochs_done = min(done) if len(done) == len(members) else None
        times = [m.train_seconds for m in members if m.train_seconds is not None]
        row.train_seconds = sum(times) if times else None
        prints = {m.fingerprint for m in members}
        row.fingerprint = prints.pop() if len(prints) == 1 else None  # members' splits differ by seed
    if row.problem is None:
        finished = sum(m.state == "finished" for m in members)
        if manifest is not None and finished == len(members):
            row.state = "finished"
        elif any(m.state == "broken" for m in members):
            row.problem = "a member folder is broken"
        else:
            row.state = "interrupted"
            row.problem = f"{finished} of {len(members)} member(s) finished"
            row.resume = f"the same `digitlab ensemble ... --out {path}` command"
    return [row, *members]


def _is_ensemble(path: Path) -> bool:
    if (path / ENSEMBLE_FILE).is_file() or (path / "member-config.json").is_file():
        return True
    # An ensemble stopped before writing ensemble.json: only member folders inside.
    return not is_run_folder(path) and any(
        p.is_dir() and p.name.startswith(MEMBER_PREFIX) and is_run_folder(p) for p in path.iterdir()
    )


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _rows_of(path: Path, name: str, nested: bool = True) -> list[RunRow]:
    """The rows of one folder: a run, an ensemble (and its members), or, one level down, a folder
    that groups runs or ensembles (`digitlab kaggle`'s OUT holds fold/ and full/)."""
    try:
        if _is_ensemble(path):
            return read_ensemble(path, name)
        if is_run_folder(path):
            return [read_run(path, name)]
        if nested:
            inner = [_rows_of(sub, f"{name}/{sub.name}", nested=False) for sub in _subfolders(path)]
            if any(rows[0].kind != "other" for rows in inner):
                return [row for rows in inner for row in rows]
    except OSError as exc:  # an unreadable folder (permissions...) is a row too
        return [RunRow(name=name, kind="other", state="broken", path=str(path),
                       problem=f"unreadable ({exc.strerror or exc})")]
    return [RunRow(name=name, kind="other", state="not a run", path=str(path),
                   problem=f"no {CONFIG_FILE}, {MODEL_META}, {STATE_FILE} or {ENSEMBLE_FILE}")]


def list_runs(directory: str | Path = "runs", sort: str = "name", reverse: bool = False) -> list[RunRow]:
    """Rows for every sub-folder of `directory` (or for `directory` itself if it is a run or an
    ensemble), sorted by the column `sort`; rows without a value in it come last."""
    directory = Path(directory)
    if sort not in COLUMNS:
        raise DigitlabError(f"unknown column {sort!r} to sort by; choose one of {', '.join(COLUMNS)}")
    if not directory.is_dir():
        raise missing(directory, "a folder of runs (runs are written to runs/ by default)", folder=True)
    if _is_ensemble(directory) or is_run_folder(directory):
        rows = _rows_of(directory, directory.name)
    else:
        rows = [row for path in _subfolders(directory) for row in _rows_of(path, path.name)]
    present = [r for r in rows if getattr(r, sort) is not None]
    absent = [r for r in rows if getattr(r, sort) is None]
    present.sort(key=lambda r: (_sort_key(getattr(r, sort)), r.name), reverse=reverse)
    return present + absent


def _sort_key(value: Any) -> tuple[int, Any]:
    # numbers before text, so a column never compares the two
    return (0, value) if isinstance(value, int | float) else (1, str(value))


# ---------------------------------------------------------------- the text table


def _cell(row: RunRow, column: str) -> str:
    if column == "epochs":
        if row.epochs_done is None and row.epochs_planned is None:
            return "-"
        return f"{'?' if row.epochs_done is None else row.epochs_done}/{row.epochs_planned or '?'}"
    if column in ("val_acc", "test_acc"):
        value = getattr(row, column)
        return "-" if value is None else f"{100 * value:.2f}%"
    if column == "train_seconds":
        s = row.train_seconds
        return "-" if s is None else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"
    if column == "fingerprint":
        return (row.fingerprint or "-")[:12]
    if column == "state":
        text = row.state
        if row.resume:
            text += f": {row.resume}"
        elif row.problem and row.state not in ("finished",):
            text += f": {row.problem}"
        return text
    value = getattr(row, column)
    return "-" if value is None else str(value)


TABLE = (("name", "name"), ("preset", "preset"), ("data", "data"), ("fingerprint", "fingerprint"),
         ("epochs", "epochs"), ("val_acc", "val acc"), ("test_acc", "test acc"),
         ("train_seconds", "train time"), ("state", "state"))


def runs_table(rows: list[RunRow]) -> str:
    """Aligned plain-text columns, one line per row; the last column (state) is not padded."""
    if not rows:
        return "no runs"
    cells = [[title for _, title in TABLE]] + [[_cell(r, column) for column, _ in TABLE] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)), line[-1]]) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


# The preset `serve` and `predict` use when no run folder is named: trained for real handwriting
# (pen widths, scans, photos; non-digits flagged), see README "Robustness to real writing".
SERVING_PRESET = "robust"


def newest_finished_run(directory: str | Path = "runs", preset: str = SERVING_PRESET) -> Path:
    """The most recently started finished run (or ensemble) of `preset` under `directory`."""
    directory = Path(directory)
    rows = list_runs(directory) if directory.is_dir() else []
    done = [r for r in rows if r.kind in ("run", "ensemble") and r.state == "finished" and r.preset == preset]
    if not done:
        raise DigitlabError(f"no finished {preset!r} run in {directory}/ to use; name a run folder, or train one "
                            f"with `digitlab train --preset {preset}`")
    newest = max(done, key=lambda r: (r.started or "", r.name))
    return Path(newest.path)
