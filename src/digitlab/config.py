"""The resolved training recipe as typed dataclasses, written to every run's config.json.

Kept free of torch so the CLI can list presets and parse flags instantly.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, get_type_hints

from digitlab.errors import DigitlabError

OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
SCHEDULES = ("constant", "onecycle", "cosine", "exponential")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
FILLS = ("nearest", "constant")
MAX_SEED = 2**63 - 1  # torch.manual_seed's limit for a non-negative seed
MAX_LR = 10.0  # past this every optimiser here diverges at once (1e300 even overflows the schedule)


def _close_names(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    return f"valid keys: {', '.join(valid)}"


def _check_keys(where: str, data: Any, valid: list[str]) -> dict[str, Any]:
    """`data` as a dict whose keys are all in `valid`; the first unknown key is named with its likely intent."""
    if not isinstance(data, dict):
        raise DigitlabError(f"{where} must be a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in valid:
            raise DigitlabError(f"{where}: unknown key {key!r}; {_close_names(str(key), valid)}")
    return dict(data)


def _check_types(obj: Any, where: str) -> None:
    """Every field of dataclass `obj` holds a value of its annotated type (int is accepted for float)."""
    for name, hint in get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        label = f"{where}{name}"
        if hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            expected = "an integer"
        elif hint is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            expected = "a finite number"
        elif hint is str:
            ok = isinstance(value, str)
            expected = "a string"
        elif hint == str | None:
            ok = value is None or isinstance(value, str)
            expected = "a string or null"
        elif hint == int | None:
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
            expected = "an integer or null"
        elif hint == dict[str, Any]:
            ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
            expected = "an object with string keys"
        else:
            continue  # nested configs check themselves
        if not ok:
            raise DigitlabError(f"{label} must be {expected}, got {value!r}")


def _as_floats(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """JSON writes 1.0 as 1: give float fields floats (torch's OneCycleLR insists on a float)."""
    hints = get_type_hints(cls)
    return {k: float(v) if hints.get(k) is float and type(v) is int else v for k, v in data.items()}


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; zero disables a transform."""

    rotation: float = 0.0  # degrees: angle uniform in [-rotation, +rotation]
    # zoom: scale factors uniform in [1 - zoom, 1 + zoom], drawn independently for x and y
    # (Keras 2 `zoom_range` semantics: a factor > 1 samples a larger area, so the digit
    # shrinks). zoom=1 means factors in [0, 2], the seed notebook's extreme setting.
    zoom: float = 0.0
    shift: float = 0.0  # fraction of the image side: offsets uniform in [-shift, +shift]
    shear: float = 0.0  # degrees: shear angle uniform in [-shear, +shear]
    elastic_alpha: float = 0.0  # pixels: scale of the Simard displacement field
    elastic_sigma: float = 4.0  # pixels: Gaussian width smoothing that field
    fill: str = "nearest"  # outside pixels: "nearest" (Keras fill_mode) or "constant" (0)
    # Photometric transforms real writing needs (issue 13). Each is the probability that an
    # image gets it; 0 (the default) leaves every existing recipe's batches bit-for-bit as before.
    thickness: float = 0.0  # pen width: a 2x2 or 3x3 dilation, or a 2x2 erosion, equally likely
    blur: float = 0.0  # Gaussian blur, sigma uniform in [0.5, 1.2] pixels
    low_resolution: float = 0.0  # area-downsampled to 10-16 pixels, bilinear back up
    noise: float = 0.0  # Gaussian noise (std up to 0.15) or salt and pepper (up to 10% of pixels)
    background: float = 0.0  # a grey or ramped background (paper, uneven light) under the ink

    @property
    def photometric(self) -> bool:
        return any((self.thickness, self.blur, self.low_resolution, self.noise, self.background))

    @property
    def enabled(self) -> bool:
        return any((self.rotation, self.zoom, self.shift, self.shear, self.elastic_alpha)) or self.photometric

    def validate(self, where: str = "augment.") -> AugmentConfig:
        _check_types(self, where)
        for name in ("rotation", "shear", "elastic_alpha"):
            if getattr(self, name) < 0:
                raise DigitlabError(f"{where}{name} must be at least 0, got {getattr(self, name)}")
        if not 0 <= self.zoom <= 1:
            raise DigitlabError(f"{where}zoom must be in [0, 1], got {self.zoom}")
        if not 0 <= self.shift <= 1:
            raise DigitlabError(f"{where}shift must be in [0, 1], got {self.shift}")
        if self.shear >= 90:
            raise DigitlabError(f"{where}shear must be below 90 degrees, got {self.shear}")
        if self.elastic_sigma <= 0:
            raise DigitlabError(f"{where}elastic_sigma must be positive, got {self.elastic_sigma}")
        if self.fill not in FILLS:
            raise DigitlabError(f"{where}fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "augment") -> AugmentConfig:
        data = _check_keys(where, data, [f.name for f in fields(cls)])
        return cls(**_as_floats(cls, data))


# fields that change how fast training runs but not what it computes: a resume or an ensemble's
# rerun may change them (tests/test_cudagraph.py checks that graphs give the eager weights)
SPEED_ONLY_FIELDS = frozenset({"cuda_graphs"})


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "custom"
    model: str = "seed2017"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: str = "mnist:train"
    val_split: float = 0.2  # fraction held out, stratified; the seed notebook's 80/20
    val_data: str | None = None  # a separate labelled source instead of a split
    epochs: int = 20
    # share of the training set drawn (a fresh random subset) for each epoch; <1 buys
    # shorter epochs, which speed-runs trade for a larger learning rate
    epoch_fraction: float = 1.0
    batch_size: int = 256  # images per optimizer step
    optimizer: str = "rmsprop"
    lr: float = 1e-3  # peak learning rate (one-cycle's maximum)
    momentum: float = 0.9  # sgd momentum (Nesterov), or rmsprop's rho / adam's beta1
    weight_decay: float = 0.0
    schedule: str = "constant"
    lr_decay: float = 0.95  # exponential schedule: lr multiplied by this after every epoch
    warmup_fraction: float = 0.25  # one-cycle: share of steps spent rising to the peak
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # >0 keeps an exponential moving average of the weights for eval
    # Outlier exposure (digitlab.outliers): non-digit images added to each batch, as a share of
    # the batch size, trained towards the uniform distribution with this weight on their loss.
    # 0 leaves every recipe without it bit-for-bit as before.
    outliers: float = 0.0
    outlier_weight: float = 0.5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    # seed of the train/validation split; None: `seed`. An ensemble fixes it for all its members
    # so that they hold out the same images, which then measure the ensemble honestly.
    split_seed: int | None = None
    precision: str = "auto"
    device: str = "auto"
    eval_batch_size: int = 1024
    eval_every: int = 1  # epochs between validation passes (the last epoch is always evaluated)
    # write TensorBoard event files into the run folder (needs `pip install digitlab[tensorboard]`)
    tensorboard: bool = False
    # replay each training step as CUDA graphs (digitlab.cudagraph). None: wherever they can be used
    # (one CUDA device, torch >= 2.11; 3x faster on an H100, benchmarks/RESULTS.md), eager elsewhere
    # without a word; True: asked for, so a run that cannot use them says why; False: eager
    cuda_graphs: bool | None = None  # one of SPEED_ONLY_FIELDS

    def validate(self) -> TrainConfig:
        def bad(msg: str) -> DigitlabError:
            return DigitlabError(f"{self.preset}: {msg}")

        _check_types(self, f"{self.preset}: ")
        if not isinstance(self.augment, AugmentConfig):
            raise bad(f"augment must be an AugmentConfig, got {type(self.augment).__name__}")
        self.augment.validate(f"{self.preset}: augment.")
        if not self.model or not self.data:
            raise bad("model and data must not be empty")
        if self.epochs < 1:
            raise bad(f"epochs must be at least 1, got {self.epochs}")
        if not 0 < self.epoch_fraction <= 1:
            raise bad(f"epoch fraction must be in (0, 1], got {self.epoch_fraction}")
        if self.batch_size < 1:
            raise bad(f"batch size must be at least 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise bad(f"eval batch size must be at least 1, got {self.eval_batch_size}")
        if self.eval_every < 1:
            raise bad(f"eval_every must be at least 1 (epochs between validation passes), got {self.eval_every}")
        if not 0 <= self.val_split < 1:
            raise bad(f"val split must be in [0, 1), got {self.val_split}")
        if not 0 < self.lr <= MAX_LR:
            raise bad(f"learning rate must be in (0, {MAX_LR:g}], got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise bad(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise bad(f"weight decay must be at least 0, got {self.weight_decay}")
        if not 0 < self.lr_decay <= 1:
            raise bad(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if not 0 < self.warmup_fraction < 1:
            raise bad(f"warmup fraction must be in (0, 1), got {self.warmup_fraction}")
        if not 0 <= self.ema_decay < 1:
            raise bad(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.outliers <= 1:
            raise bad(f"outliers must be in [0, 1] (non-digits per batch, as a share of it), got {self.outliers}")
        if self.outlier_weight < 0:
            raise bad(f"outlier_weight must be at least 0, got {self.outlier_weight}")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if self.split_seed is not None and not 0 <= self.split_seed <= MAX_SEED:
            raise bad(f"split_seed must be in 0..{MAX_SEED} or null, got {self.split_seed}")
        from digitlab.models import list_models, model_parameters  # models import torch: only when validating

        if self.model not in list_models():
            raise bad(f"unknown model {self.model!r}; choose one of {', '.join(list_models())}")
        unknown = sorted(set(self.model_args) - set(model_parameters(self.model)))
        if unknown:
            raise bad(f"model_args {', '.join(map(repr, unknown))} not accepted by model {self.model!r} "
                      f"(it takes: {', '.join(model_parameters(self.model)) or 'no arguments'})")
        if self.optimizer not in OPTIMIZERS:
            raise bad(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise bad(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise bad(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise bad(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        for name in ("thickness", "blur", "low_resolution", "noise", "background"):
            if not 0 <= getattr(self.augment, name) <= 1:
                raise bad(f"augment {name} is a probability in [0, 1], got {getattr(self.augment, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise bad(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not isinstance(self.tensorboard, bool):
            raise bad(f"tensorboard must be true or false, got {self.tensorboard!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise bad(f"cuda_graphs must be true, false or null (where usable), got {self.cuda_graphs!r}")
        return self

    @property
    def data_split_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """Replace the fields given (None means: keep the preset's value)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise DigitlabError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def changes_from(self, recorded: Any) -> list[tuple[str, Any, Any]]:
        """(field, recorded value, this config's value) for every field in which a recorded config
        (a checkpoint's, a run folder's config.json) differs from this one. A field the record
        lacks was added to digitlab since it was written and is not a change; so are the
        augmentation's fields added since (off by default). SPEED_ONLY_FIELDS are never a change:
        they change how fast the steps run, not what they compute."""
        if not isinstance(recorded, dict):
            return []
        current = json.loads(json.dumps(self.to_dict()))  # tuples as JSON lists, as records hold them
        if isinstance(recorded.get("augment"), dict):
            recorded = {**recorded, "augment": {**AugmentConfig().to_dict(), **recorded["augment"]}}
        return [(k, recorded[k], v) for k, v in current.items()
                if k in recorded and recorded[k] != v and k not in SPEED_ONLY_FIELDS]

    @classmethod
    def from_dict(cls, data: Any) -> TrainConfig:
        """The config a JSON object describes; unknown keys are refused (a typo must not pass silently).

        Call `validate()` on the result to check types and ranges.
        """
        data = _check_keys("config", data, [f.name for f in fields(cls)])
        data["augment"] = AugmentConfig.from_dict(data.get("augment", {}), "config.augment")
        return cls(**_as_floats(cls, data))
