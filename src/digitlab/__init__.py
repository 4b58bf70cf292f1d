"""digitlab: train, evaluate, explain and serve CNNs for handwritten digits.

The public Python API; names load on first use so `import digitlab` (and the CLI) stays fast.

    import digitlab
    result = digitlab.fit(digitlab.get_preset("seed2017").with_overrides(epochs=5), "runs/s5")
    print(digitlab.evaluate_run(result.run_dir).accuracy)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "DigitlabError": "digitlab.errors",
    "DigitData": "digitlab.data",
    "load_source": "digitlab.data",
    "split": "digitlab.data",
    "TrainConfig": "digitlab.config",
    "AugmentConfig": "digitlab.config",
    "get_preset": "digitlab.presets",
    "list_presets": "digitlab.presets",
    "create_model": "digitlab.models",
    "list_models": "digitlab.models",
    "summary_text": "digitlab.models",
    "register_model": "digitlab.models",
    "fit": "digitlab.train",
    "RunResult": "digitlab.train",
    "TrainingInterrupted": "digitlab.train",
    "train_ensemble": "digitlab.ensemble",
    "load_model": "digitlab.checkpoint",
    "load_predictor": "digitlab.inference",
    "read_metrics": "digitlab.rundir",
    "ProgressBar": "digitlab.progress",
    "TensorBoardLogger": "digitlab.tensorboard",
    "evaluate_run": "digitlab.evaluate",
    "evaluate_predictions": "digitlab.evaluate",
    "predict_inputs": "digitlab.predict",
    "predict_proba": "digitlab.inference",
    "submission_csv": "digitlab.predict",
    "read_submission": "digitlab.predict",
    # figures (matplotlib Figures; a notebook shows them inline, the HTML report embeds them)
    "sample_grid_figure": "digitlab.figures",
    "batch_loss_figure": "digitlab.figures",
    "epoch_curves_figure": "digitlab.figures",
    "training_curves_figure": "digitlab.figures",
    "confusion_figure": "digitlab.figures",
    "per_class_error_figure": "digitlab.figures",
    "mistakes_figure": "digitlab.figures",
    "mnist_style": "digitlab.data.preprocess",
    "export_onnx": "digitlab.export",
    "create_app": "digitlab.serve",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'digitlab' has no attribute {name!r}")
