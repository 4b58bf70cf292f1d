"""Ensembles: N members trained with different seeds (and recipes) into one folder.

Member i uses recipe i mod len(recipes), so `best,wide` over 4 members gives best, wide,
best, wide. `ensemble.json` lists the members and, optionally, weights; every consumer
(evaluate, predict, report, serve, export) loads it through `digitlab.inference.load_predictor`,
which averages the members' probabilities with those weights. Members train one after
another in this process, or in `jobs` parallel processes that split the CPU cores. A rerun
skips finished members and resumes interrupted ones, so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digitlab.checkpoint import (
    TRAIN_HASHES_FILE,
    atomic_write_json,
    read_model_meta,
    read_train_hashes,
    write_train_hashes,
)
from digitlab.config import SPEED_ONLY_FIELDS, TrainConfig
from digitlab.errors import DigitlabError
from digitlab.rundir import CONFIG_FILE, ENSEMBLE_FILE, MEMBER_PREFIX, MODEL_META, STATE_FILE

if TYPE_CHECKING:
    from digitlab.data import DigitData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberPlan:
    index: int
    seed: int
    run_dir: Path
    recipe: int = 0  # index into the ensemble's list of recipes

    @property
    def done(self) -> bool:
        return (self.run_dir / MODEL_META).is_file()

    @property
    def started(self) -> bool:
        return (self.run_dir / STATE_FILE).is_file()


def plan_members(out_dir: Path, members: int, first_seed: int, recipes: int = 1) -> list[MemberPlan]:
    if members < 1:
        raise DigitlabError(f"an ensemble needs at least 1 member, got {members}")
    return [MemberPlan(i, first_seed + i, out_dir / f"{MEMBER_PREFIX}{i}", i % recipes) for i in range(members)]


WEIGHTINGS = ("equal", "logloss", "greedy")


def logloss_weights(run_dirs: Sequence[Path]) -> list[float]:
    """Weights proportional to 1 / validation log-loss, each member's loss measured on the
    validation data it held out (never on test); they sum to 1."""
    losses = []
    for run_dir in run_dirs:
        loss = read_model_meta(run_dir).get("metrics", {}).get("val_loss")
        if loss is None or not np.isfinite(loss) or loss <= 0:
            raise DigitlabError(f"{run_dir}: no validation log-loss recorded (val_loss {loss!r}); "
                                "--weights logloss needs members trained with validation data")
        losses.append(float(loss))
    inverse = 1 / np.asarray(losses)
    return [float(w) for w in inverse / inverse.sum()]


def calibrated_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Log-loss after the temperature that minimises it: how well `probs` rank the truth, whatever
    their confidence scale (label smoothing leaves a net under-confident, outlier exposure does not)."""
    from digitlab.calibration import apply_temperature, fit_temperature, nll

    return nll(apply_temperature(probs, fit_temperature(probs, labels)), labels)


def forward_selection(val_probs: np.ndarray, labels: np.ndarray, max_picks: int) -> list[int]:
    """Caruana et al. (2004): add, one at a time and with replacement, the member whose addition
    most lowers the validation log-loss of the running mean (temperature-scaled, see
    `calibrated_nll`); stop after `max_picks` or when no addition helps. `val_probs` is
    (members, N, 10); returns the picked indices in order."""
    picks: list[int] = []
    total = np.zeros(val_probs.shape[1:], dtype=np.float64)
    best = np.inf
    for _ in range(max_picks):
        losses = [calibrated_nll((total + p) / (len(picks) + 1), labels) for p in val_probs]
        pick = int(np.argmin(losses))
        if losses[pick] >= best:
            break
        best = losses[pick]
        picks.append(pick)
        total += val_probs[pick]
    return picks


def shared_validation(run_dirs: Sequence[Path]) -> DigitData:
    """The labelled validation images every run held out: the first run's, refused if another run
    held out other images, less any image a run trained on (a duplicate elsewhere in the data)."""
    from digitlab.overlap import check_seen, run_train_hashes, validation_data, validation_key

    val = validation_data(run_dirs[0])
    if val is None or len(val) == 0:
        raise DigitlabError(f"{run_dirs[0]}: no validation split; fitting on validation needs members trained "
                            "with validation data")
    key = validation_key(run_dirs[0])
    for run_dir in run_dirs[1:]:
        if validation_key(run_dir) != key:
            raise DigitlabError(f"{run_dir}: trained on images of the ensemble's validation split; fitting on "
                                "validation needs members that all held out the same images")
    val.require_labels("fitting on validation needs labelled validation data")
    hashes = [h for h in (run_train_hashes(r) for r in run_dirs) if h is not None]
    if hashes:
        val = val.subset(check_seen(val, np.concatenate(hashes)).keep, val.source)
    return val


def greedy_weights(run_dirs: Sequence[Path], max_picks: int | None = None) -> list[float]:
    """Weights fitted on the validation images every member held out (`shared_validation`): each
    member's share of the picks of `forward_selection` (at most `max_picks`, default twice the
    number of members), so a member that adds nothing gets 0."""
    from digitlab.inference import load_predictor

    val = shared_validation(run_dirs)
    labels = val.require_labels("--weights greedy needs labelled validation data")
    probs = np.stack([load_predictor(r, calibrated=False).predict_proba(val.images) for r in run_dirs])
    picks = forward_selection(probs, labels, max_picks or 2 * len(run_dirs))
    counts = np.bincount(picks, minlength=len(run_dirs)).astype(np.float64)
    return [float(c) for c in counts / counts.sum()]


def emitter(callbacks: Iterable[Callable[[dict[str, Any]], None]]) -> Callable[[dict[str, Any]], None]:
    """One function that hands an event to every callback."""
    callbacks = list(callbacks)

    def emit(event: dict[str, Any]) -> None:
        for callback in callbacks:
            callback(event)

    return emit


def _check_folder_takes(out_dir: Path, plans: list[MemberPlan], recipes: list[TrainConfig]) -> None:
    """A rerun finishes the ensemble it started; it must not adopt a run folder or members of another recipe."""
    if any((out_dir / name).is_file() for name in (CONFIG_FILE, MODEL_META, STATE_FILE)):
        raise DigitlabError(f"{out_dir}: holds a training run; give the ensemble a folder of its own (--out)")
    for plan in plans:
        try:
            trained = json.loads((plan.run_dir / CONFIG_FILE).read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not started, or damaged: resuming it says what is wrong
        changed = recipes[plan.recipe].with_overrides(seed=plan.seed).changes_from(trained)
        if changed:
            k, was, wanted = changed[0]
            raise DigitlabError(f"{plan.run_dir}: was trained with {k} {was!r}, this command asks for "
                                f"{wanted!r}; an ensemble folder finishes the recipe it started: use another --out")


def _train_in_process(config: TrainConfig, plan: MemberPlan, callbacks: Iterable[Callable],
                      progress: bool = True) -> None:
    from digitlab.train import fit

    if plan.started:  # a rerun's --cuda-graphs/--no-cuda-graphs holds for its resumed members; none: their own
        fit(None, resume=plan.run_dir, callbacks=callbacks, progress=progress, cuda_graphs=config.cuda_graphs)
    else:
        fit(config.with_overrides(seed=plan.seed), plan.run_dir, callbacks=callbacks, progress=progress)


def _member_command(config_path: Path, plan: MemberPlan, cuda_graphs: bool | None = None) -> list[str]:
    """The `digitlab train` that trains a member; config_path holds the plan's recipe."""
    base = [sys.executable, "-m", "digitlab", "train", "--quiet"]
    if plan.started:
        graphs = [] if cuda_graphs is None else ["--cuda-graphs" if cuda_graphs else "--no-cuda-graphs"]
        return [*base, "--resume", str(plan.run_dir), *graphs]
    return [*base, "--config", str(config_path), "--seed", str(plan.seed), "--out", str(plan.run_dir)]


def _train_in_processes(recipes: list[TrainConfig], plans: list[MemberPlan], jobs: int, out_dir: Path,
                        on_event: Callable[[dict[str, Any]], None]) -> None:
    config_paths = []
    for k, recipe in enumerate(recipes):
        config_paths.append(out_dir / f"member-config-{k}.json")
        atomic_write_json(config_paths[-1], {"config": recipe.to_dict()})
    threads = max(1, (os.cpu_count() or 1) // jobs)  # split the cores, no oversubscription
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = list(plans)
    running: list[tuple[MemberPlan, subprocess.Popen]] = []
    failures: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                plan = pending.pop(0)
                plan.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log_file = (out_dir / f"member-{plan.index}.log").open("a")
                command = _member_command(config_paths[plan.recipe], plan, recipes[plan.recipe].cuda_graphs)
                proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
                log_file.close()
                running.append((plan, proc))
                on_event({"event": "member_start", "member": plan.index, "seed": plan.seed})
            time.sleep(0.2)
            for plan, proc in list(running):
                if proc.poll() is None:
                    continue
                running.remove((plan, proc))
                if proc.returncode != 0:
                    failures.append(f"member {plan.index} exited {proc.returncode} "
                                    f"(see {out_dir / f'member-{plan.index}.log'})")
                on_event({"event": "member_end", "member": plan.index, "returncode": proc.returncode})
    except KeyboardInterrupt:
        for _, proc in running:
            proc.send_signal(2)  # SIGINT: each member saves its state before exiting
        for _, proc in running:
            proc.wait()
        raise
    if failures:
        raise DigitlabError("; ".join(failures))


def _write_union_hashes(out_dir: Path, plans: list[MemberPlan]) -> None:
    """The ensemble saw every image any member trained on; members from before hashes were kept: none."""
    parts = [h for h in (read_train_hashes(p.run_dir) for p in plans) if h is not None]
    if parts and len(parts) == len(plans):
        write_train_hashes(out_dir, np.concatenate(parts))
    else:
        (out_dir / TRAIN_HASHES_FILE).unlink(missing_ok=True)


def train_ensemble(
    config: TrainConfig | Sequence[TrainConfig],
    out_dir: str | Path,
    members: int,
    jobs: int = 1,
    first_seed: int | None = None,
    callbacks: Iterable[Callable[[dict[str, Any]], None]] = (),
    weights: str = "equal",
    progress: bool = True,
) -> Path:
    """Train (or finish training) the members, then write ensemble.json; returns the folder.

    `config` is one recipe or a list (member i trains recipe i mod len); seeds run from
    `first_seed` (default: the first recipe's), and every member holds out the same validation
    images (split seed: the first seed, unless the recipe sets `split_seed`). `weights="logloss"` weights the average by
    1 / each member's validation log-loss (see `logloss_weights`); `weights="greedy"` fits the
    weights on that shared split by forward selection (see `greedy_weights`). `progress` shows fit's
    progress bars for members trained in this process (jobs=1).
    """
    out_dir = Path(out_dir)
    recipes = [c.validate() for c in ([config] if isinstance(config, TrainConfig) else config)]
    if not recipes:
        raise DigitlabError("an ensemble needs at least one recipe")
    if weights not in WEIGHTINGS:
        raise DigitlabError(f"unknown weighting {weights!r}; choose one of {', '.join(WEIGHTINGS)}")
    if weights != "equal" and any(r.val_split <= 0 and not r.val_data for r in recipes):
        # said now, not after hours of training when the weights are fitted
        raise DigitlabError(f"--weights {weights} needs validation data: give --val-split (e.g. 0.1) or val_data")
    if any(r.tensorboard for r in recipes):
        from digitlab.tensorboard import require_tensorboard

        require_tensorboard()  # once here, not once per member process
    first = recipes[0].seed if first_seed is None else first_seed
    # one train/validation split for every member: the held-out images then measure the ensemble
    # (and fit its log-loss weights) without any member having trained on them
    recipes = [r if r.split_seed is not None else r.with_overrides(split_seed=first) for r in recipes]
    plans = plan_members(out_dir, members, first, len(recipes))
    _check_folder_takes(out_dir, plans, recipes)
    callbacks = list(callbacks)
    emit = emitter(callbacks)

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in plans if not p.done]
    emit({"event": "ensemble_start", "members": members, "todo": len(todo), "jobs": jobs, "out": str(out_dir)})
    if jobs <= 1:
        for plan in todo:
            emit({"event": "member_start", "member": plan.index, "seed": plan.seed})
            _train_in_process(recipes[plan.recipe], plan, callbacks, progress)
            emit({"event": "member_end", "member": plan.index, "returncode": 0})
    else:
        _train_in_processes(recipes, todo, jobs, out_dir, emit)
    _write_union_hashes(out_dir, plans)
    atomic_write_json(out_dir / ENSEMBLE_FILE, _manifest(recipes, plans, weights))
    emit({"event": "ensemble_end", "out": str(out_dir)})
    return out_dir


def _recipe_record(recipe: TrainConfig) -> dict[str, Any]:
    """A recipe as ensemble.json keeps it: what the members compute, not how fast the last rerun ran."""
    return {k: v for k, v in recipe.to_dict().items() if k not in SPEED_ONLY_FIELDS}


def _manifest(recipes: list[TrainConfig], plans: list[MemberPlan], weights: str) -> dict[str, Any]:
    """ensemble.json: members, their seeds and recipes, and how their probabilities are averaged."""
    manifest: dict[str, Any] = {
        "kind": "ensemble",
        "preset": ",".join(dict.fromkeys(r.preset for r in recipes)),
        "members": [p.run_dir.name for p in plans],
        "seeds": [p.seed for p in plans],
        "presets": [recipes[p.recipe].preset for p in plans],
        "config": _recipe_record(recipes[0]),
        "weighting": weights,
    }
    if len(recipes) > 1:
        manifest["configs"] = [_recipe_record(r) for r in recipes]
    if weights == "logloss":
        manifest["weights"] = logloss_weights([p.run_dir for p in plans])
    elif weights == "greedy":
        manifest["weights"] = greedy_weights([p.run_dir for p in plans])
    return manifest
