"""The Kaggle "Digit Recognizer" recipe end to end: an honest forecast, then the submission.

1. **Forecast.** The ensemble is trained with a fold of train.csv held out (the same images for
   every member, see `TrainConfig.split_seed`) and measured on that fold with test-time
   augmentation: the accuracy to expect on the leaderboard, with its 95% Wilson interval.
2. **Submission.** The same ensemble is trained again on all of train.csv and test.csv is
   predicted with TTA into `submission.csv` (ImageId,Label).

Both ensembles live under one folder and resume where they stopped when the recipe runs again.
The forecast is of the fold ensemble, which saw `1 - holdout` of the data; the submitted one saw
it all, so the forecast is, if anything, slightly pessimistic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from digitlab.config import TrainConfig
from digitlab.errors import DigitlabError, missing

FOLD_DIR, FULL_DIR = "fold", "full"
SUBMISSION_FILE, FORECAST_FILE = "submission.csv", "forecast.json"


@dataclass(frozen=True)
class KaggleResult:
    forecast: dict[str, Any]  # accuracy, low95, high95, images (the held-out fold), members, tta
    submission: Path
    rows: int


def fold_recipes(recipes: Sequence[TrainConfig], train_csv: str | Path, holdout: float,
                 seed: int) -> list[TrainConfig]:
    """The recipes with train.csv as data and `holdout` of it held out, one split for all members."""
    if not 0 < holdout < 1:
        raise DigitlabError(f"holdout must be in (0, 1), got {holdout}")
    return [r.with_overrides(data=f"kaggle:{train_csv}", val_split=holdout, split_seed=seed).validate()
            for r in recipes]


def full_recipes(recipes: Sequence[TrainConfig], train_csv: str | Path) -> list[TrainConfig]:
    """The recipes on all of train.csv: nothing held out (`replace`, since `with_overrides` keeps a None)."""
    return [replace(r, data=f"kaggle:{train_csv}", val_split=0.0, val_data=None).validate() for r in recipes]


def kaggle_recipe(
    train_csv: str | Path,
    test_csv: str | Path,
    recipes: Sequence[TrainConfig],
    out: str | Path,
    members: int = 3,
    holdout: float = 0.1,
    tta: bool = True,
    jobs: int = 1,
    seed: int = 0,
    callbacks: Iterable[Callable[[dict[str, Any]], None]] = (),
    progress: bool = True,
) -> KaggleResult:
    """Train the fold ensemble and forecast, then the full ensemble and write OUT/submission.csv."""
    from digitlab.data.kaggle import load_kaggle_csv
    from digitlab.ensemble import emitter, train_ensemble
    from digitlab.evaluate import evaluate_run
    from digitlab.predict import predict_inputs, render, write_output

    out = Path(out)
    if not Path(train_csv).is_file():
        raise missing(train_csv, "a Kaggle train.csv", folder=False)
    # Checked before hours of training, not after: a train.csv given as TEST_CSV would
    # otherwise be predicted into a submission of the wrong length.
    load_kaggle_csv(test_csv, expect_labels=False)
    callbacks = list(callbacks)
    emit = emitter(callbacks)

    emit({"event": "stage", "stage": "forecast", "out": str(out / FOLD_DIR)})
    fold = train_ensemble(fold_recipes(recipes, train_csv, holdout, seed), out / FOLD_DIR, members, jobs=jobs,
                          first_seed=seed, callbacks=callbacks, progress=progress)
    # the default evaluation of a Kaggle-trained ensemble: its shared held-out fold, less any
    # image that also occurs (a duplicate) among the training rows
    measured = evaluate_run(fold, tta=tta)
    forecast = {**measured.extra["expected_leaderboard"], "members": members, "tta": tta, "holdout": holdout,
                "source": measured.source, "presets": [r.preset for r in recipes],
                "left_out_as_seen": measured.extra.get("seen_in_training") or 0}
    out.mkdir(parents=True, exist_ok=True)
    (out / FORECAST_FILE).write_text(json.dumps(forecast, indent=1) + "\n")
    emit({"event": "forecast", **forecast})

    emit({"event": "stage", "stage": "submission", "out": str(out / FULL_DIR)})
    full = train_ensemble(full_recipes(recipes, train_csv), out / FULL_DIR, members, jobs=jobs, first_seed=seed,
                          callbacks=callbacks, progress=progress)
    result = predict_inputs(full, [f"kaggle:{test_csv}"], tta=tta)
    if result.errors:  # test.csv changed since it was checked: say how, not just that it failed
        raise DigitlabError("; ".join(result.errors))
    text = render(result, "kaggle")  # refuses anything but one readable test.csv
    submission = write_output(text, out / SUBMISSION_FILE)
    return KaggleResult(forecast, submission, len(result.predictions))

