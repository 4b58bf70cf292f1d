"""The training loop: data as one uint8 tensor, batched augmentation, bf16 autocast where the
CPU supports it, an atomic resumable checkpoint every epoch, and bit-exact resume.

`fit(config, out_dir)` is the whole story; `train_one_epoch` and `predict_logits` are its parts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from digitlab import checkpoint as ckpt
from digitlab import distributed
from digitlab.augment import augment_batch
from digitlab.config import TrainConfig
from digitlab.data import DigitData, load_source, split
from digitlab.distributed import DistContext
from digitlab.errors import DigitlabError
from digitlab.models import count_parameters, create_model

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the state is safely on disk; carries how to resume."""

    def __init__(self, run_dir: Path, epoch: int, step: int) -> None:
        self.run_dir, self.epoch, self.step = run_dir, epoch, step
        super().__init__(f"interrupted in epoch {epoch} at step {step}; state saved in {run_dir}")

    @property
    def resume_command(self) -> str:
        return f"digitlab train --resume {self.run_dir}"


@dataclass
class RunResult:
    run_dir: Path
    config: TrainConfig
    final: dict[str, Any]  # the last epoch's record
    history: list[dict[str, Any]]  # one record per epoch
    model: nn.Module = field(repr=False)
    train_seconds: float = 0.0  # optimisation time only, evaluation excluded


# ---------------------------------------------------------------- devices and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DigitlabError("--device cuda: no CUDA device is available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DigitlabError("--device mps: no Apple MPS device is available on this machine")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 convolutions natively (about 2x fp32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flags() & {
            "avx512_bf16",
            "amx_bf16",
        } != set()
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise DigitlabError("--precision bf16: this CPU has no bf16 support in oneDNN")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cpu":
        # oneDNN's convolutions are fastest in NHWC (channels_last) on x86 CPUs
        model = model.to(memory_format=torch.channels_last)
    return model


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255.0)


# ---------------------------------------------------------------- optimisation parts


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "rmsprop":
        # Keras RMSprop: rho=0.9, epsilon=1e-7 (torch calls rho `alpha`, default 0.99)
        return torch.optim.RMSprop(params, lr=config.lr, alpha=config.momentum, eps=1e-7,
                                   weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(config.momentum, 0.999),
                                weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.momentum, 0.999),
                                 weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


def steps_per_epoch(train_count: int, config: TrainConfig) -> int:
    """Optimizer steps per epoch: the ragged tail is dropped, as Keras' steps_per_epoch does."""
    return int(train_count * config.epoch_fraction) // config.batch_size


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch_steps: int):
    """Returns (scheduler or None, 'step' | 'epoch'): when the scheduler is advanced."""
    total = config.epochs * epoch_steps
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=config.warmup_fraction,
            cycle_momentum=config.optimizer in ("sgd", "adam", "adamw"),
        ), "step"
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), "step"
    if config.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay), "epoch"
    return None, "step"


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA's decay after `updates` averaging steps: min(decay, (1 + n) / (10 + n)).

    With a fixed 0.999 the average is still mostly the random initial weights for the first
    thousand steps, so validation reads ~10% for several epochs; the warm-up lets it follow
    the model early and reach the full decay after ~9,000 steps (timm/TF's EMA do the same).
    """
    return min(decay, (1 + updates) / (10 + updates))


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    if decay <= 0:
        return None

    @torch.no_grad()
    def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        d = ema_decay_at(decay, int(num_averaged))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:  # integer buffers (BatchNorm's batch counter), as torch's own EMA treats them
            for ema_param, param in zip(ema_params, params, strict=True):
                ema_param.copy_(ema_param * d + param * (1.0 - d))

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


# ---------------------------------------------------------------- evaluation


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images_u8: torch.Tensor, batch_size: int = 1024, precision: str = "fp32",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Float32 logits `(N, 10)` for uint8 images `(N, 28, 28)`, in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images_u8), batch_size):
            x = to_input(images_u8[start : start + batch_size].to(device))
            with autocast(device, precision):
                out.append(model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 10)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return loss, acc


# ---------------------------------------------------------------- run folder


def _default_run_dir(preset: str) -> Path:
    return Path("runs") / f"{preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class MetricsLog:
    """metrics.jsonl: every batch's loss and one record per epoch; kept in step with checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: list[str] = []

    def add(self, record: dict[str, Any]) -> None:
        self._pending.append(json.dumps(record))

    def flush(self) -> None:
        """Append and fsync the pending records. Called before each checkpoint is renamed into
        place, so the metrics are never behind the checkpoint (records past it are dropped by
        `truncate_to` on resume)."""
        if self._pending:
            with self.path.open("a") as fh:
                fh.write("\n".join(self._pending) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._pending.clear()

    def truncate_to(self, epoch: int, step: int) -> None:
        """Keep only records before step `step + 1` of `epoch`: later ones are work the checkpoint lacks."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is lost work
            if rec["epoch"] < epoch or (rec["epoch"] == epoch and rec["type"] == "batch" and rec["step"] <= step):
                kept.append(line)
        ckpt.atomic_write_bytes(self.path, ("\n".join(kept) + "\n").encode() if kept else b"")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def _sigint_flag():
    """First Ctrl-C sets a flag the loop checks between steps; a second one aborts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- the loop


@dataclass
class EpochState:
    """Position inside an epoch, enough to continue it bit-exactly after an interruption."""

    epoch: int  # 1-based
    perm: torch.Tensor  # this epoch's order of all training indices (identical on every rank)
    step: int = 0  # steps already done
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_seconds: float = 0.0


@dataclass
class Trainer:
    """What one optimisation step needs, built once per run."""

    model: nn.Module  # possibly wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scheduler_per_step: bool
    ema: torch.optim.swa_utils.AveragedModel | None
    config: TrainConfig
    precision: str
    device: torch.device
    augment_generator: torch.Generator
    ctx: DistContext = field(default_factory=DistContext)

    @property
    def local_batch(self) -> int:
        return self.config.batch_size // self.ctx.world_size

    @property
    def bare_model(self) -> nn.Module:
        """The model without its DDP wrapper: what is evaluated and saved."""
        return self.model.module if self.ctx.enabled else self.model

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.bare_model


def train_one_epoch(
    trainer: Trainer,
    images: torch.Tensor,
    labels: torch.Tensor,
    state: EpochState,
    stop: threading.Event | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> bool:
    """Advance `state` through its epoch; returns False if stopped early by `stop`.

    Each rank takes every world_size-th index of the shared permutation, so the ranks'
    shards are disjoint and together cover the epoch.
    """
    config, ctx = trainer.config, trainer.ctx
    shard = state.perm[ctx.rank :: ctx.world_size]
    batch = trainer.local_batch
    steps = steps_per_epoch(len(state.perm), config)
    trainer.model.train()
    while state.step < steps:
        t0 = time.perf_counter()
        index = shard[state.step * batch : (state.step + 1) * batch]
        x = to_input(images[index])  # (B, 1, 28, 28)
        y = labels[index]
        if config.augment.enabled:
            x = augment_batch(x, config.augment, trainer.augment_generator)
        if trainer.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(trainer.device, trainer.precision):
            logits = trainer.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        if trainer.scheduler is not None and trainer.scheduler_per_step:
            trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update_parameters(trainer.bare_model)
        batch_loss = loss.item()
        batch_correct = int((logits.argmax(1) == y).sum())
        dt = time.perf_counter() - t0
        state.step += 1
        state.loss_sum += batch_loss * len(y)
        state.correct += batch_correct
        state.seen += len(y)
        state.train_seconds += dt
        if on_batch is not None:
            on_batch({
                "step": state.step, "steps": steps, "loss": batch_loss, "acc": batch_correct / len(y),
                "lr": trainer.optimizer.param_groups[0]["lr"], "images_per_s": len(y) * ctx.world_size / dt,
            })
        stopping = stop is not None and stop.is_set()
        if ctx.enabled:
            stopping = distributed.any_rank(ctx, stopping, trainer.device)
        if stopping and state.step < steps:
            return False
    return True


def _load_training_data(config: TrainConfig) -> tuple[DigitData, DigitData | None]:
    data = load_source(config.data)
    if not data.has_labels:
        raise DigitlabError(f"{config.data}: has no labels; training needs a labelled source "
                            "(Kaggle train.csv, not test.csv)")
    if config.val_data:
        val = load_source(config.val_data)
        if not val.has_labels:
            raise DigitlabError(f"{config.val_data}: validation data has no labels")
        return data, val
    if config.val_split == 0:
        return data, None
    train_idx, val_idx = split(data.labels, config.val_split, config.seed)
    return data.subset(train_idx, f"{config.data}[train]"), data.subset(val_idx, f"{config.data}[val]")


def _augment_seed(seed: int, rank: int) -> int:
    # a different stream per rank, so ranks do not apply identical augmentations
    return seed * 7919 + 104729 * rank + 1


def _build_trainer(config: TrainConfig, ctx: DistContext, device: torch.device, precision: str,
                   epoch_steps: int) -> Trainer:
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = prepare_model(create_model(config.model, **config.model_args), device)
    ema = build_ema(model, config.ema_decay)
    if ctx.enabled:
        torch.manual_seed(config.seed + ctx.rank)  # but different dropout masks
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, config)
    scheduler, when = build_scheduler(optimizer, config, epoch_steps)
    return Trainer(model, optimizer, scheduler, when == "step", ema, config, precision, device,
                   torch.Generator().manual_seed(_augment_seed(config.seed, ctx.rank)), ctx)


def _rng_tensors(trainer: Trainer, order_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """RNG states of every rank (gathered to all), so any rank can be resumed exactly."""
    out = {"order": order_generator.get_state()}
    for name, state in (("torch", torch.get_rng_state()), ("augment", trainer.augment_generator.get_state())):
        for rank, tensor in enumerate(distributed.gather_tensor(trainer.ctx, state, trainer.device)):
            out[f"{name}.{rank}"] = tensor
    return out


def fit(
    config: TrainConfig | None,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    data: tuple[DigitData, DigitData | None] | None = None,
) -> RunResult:
    """Train `config` into a run folder (or continue the run in `resume`); returns the result.

    `data` may pass preloaded (train, val) sets (tests, benchmarks); otherwise the config's
    sources are loaded. Ctrl-C saves the state and raises TrainingInterrupted. Under
    torchrun, every rank calls fit and only rank 0 writes files or emits events.
    """
    ctx = distributed.context_from_env()
    callbacks = list(callbacks) if ctx.is_main else []

    def emit(event: dict[str, Any]) -> None:
        for cb in callbacks:
            cb(event)

    restart = False  # a fresh run in a folder left by a run that failed before its first checkpoint
    if resume is not None:
        run_dir = Path(resume)
        config = _read_run_config(run_dir)
        if not (run_dir / ckpt.STATE_FILE).exists() and not (run_dir / ckpt.MODEL_FILE).exists():
            raise DigitlabError(f"{run_dir}: no checkpoint to resume from (the run stopped before its first "
                                f"epoch ended); start it afresh with --out {run_dir}")
    else:
        if config is None:
            raise DigitlabError("fit needs a config or a run folder to resume")
        config = config.validate()
        run_dir = Path(out_dir) if out_dir is not None else _default_run_dir(config.preset)
        restart = _unstarted_run(run_dir)
    if config.batch_size % ctx.world_size:
        raise DigitlabError(f"batch size {config.batch_size} does not split evenly over {ctx.world_size} processes")

    device = distributed.init(ctx, resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    train_data, val_data = data if data is not None else _load_training_data(config)
    epoch_steps = steps_per_epoch(len(train_data), config)
    if epoch_steps == 0:
        share = f" x epoch fraction {config.epoch_fraction}" if config.epoch_fraction < 1 else ""
        raise DigitlabError(
            f"{config.data}: {len(train_data)} training images{share} is fewer than one batch of {config.batch_size}"
        )
    trainer = _build_trainer(config, ctx, device, precision, epoch_steps)
    order_generator = torch.Generator().manual_seed(config.seed)  # same epoch order on every rank

    images = torch.from_numpy(train_data.images).to(device)
    labels = torch.from_numpy(train_data.labels).to(device)
    val_images = torch.from_numpy(val_data.images) if val_data is not None else None
    val_labels = torch.from_numpy(val_data.labels) if val_data is not None else None

    metrics = MetricsLog(run_dir / METRICS_FILE)
    history: list[dict[str, Any]] = []
    state: EpochState | None = None
    start_epoch = 1
    data_info = {
        "train_source": config.data,
        "train_fingerprint": train_data.fingerprint,
        "train_count": len(train_data),
        "val_source": val_data.source if val_data is not None else None,
        "val_fingerprint": val_data.fingerprint if val_data is not None else None,
        "val_count": len(val_data) if val_data is not None else 0,
    }

    if resume is not None:
        tensors, header = ckpt.load_state(run_dir / ckpt.STATE_FILE)
        info = header["info"]
        if info["data"]["train_fingerprint"] != data_info["train_fingerprint"]:
            raise DigitlabError(
                f"{run_dir}: training data changed since the run started (fingerprint "
                f"{data_info['train_fingerprint']} != {info['data']['train_fingerprint']})"
            )
        if info.get("world_size", 1) != ctx.world_size:
            raise DigitlabError(f"{run_dir}: was trained by {info.get('world_size', 1)} process(es); "
                                f"resume it with the same number, not {ctx.world_size}")
        rng = ckpt.restore_state(tensors, header, trainer.bare_model, trainer.optimizer, trainer.scheduler)
        extra = ckpt.extra_tensors(tensors)
        if trainer.ema is not None:
            trainer.ema.load_state_dict({k[4:]: v for k, v in extra.items() if k.startswith("ema.")})
        torch.set_rng_state(rng[f"torch.{ctx.rank}"])
        trainer.augment_generator.set_state(rng[f"augment.{ctx.rank}"])
        order_generator.set_state(rng["order"])
        history = info["history"]
        pos = info["position"]
        if pos["step"] > 0:  # mid-epoch stop (Ctrl-C): continue that very epoch
            state = EpochState(epoch=pos["epoch"], perm=extra["perm"].to(device), step=pos["step"],
                               loss_sum=pos["loss_sum"], correct=pos["correct"], seen=pos["seen"],
                               train_seconds=pos["train_seconds"])
            start_epoch = pos["epoch"]
        else:
            start_epoch = pos["epoch"] + 1
        if ctx.is_main:
            metrics.truncate_to(start_epoch, pos["step"])
        log.info("resuming %s at epoch %d step %d", run_dir, start_epoch, pos["step"])
    elif ctx.is_main:
        if restart:
            log.warning("%s: holds a config.json but no checkpoint (a run that stopped before its first epoch "
                        "ended); starting afresh there", run_dir)
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(run_dir / CONFIG_FILE, {
            "config": config.to_dict(),
            "resolved": {"device": str(device), "precision": precision, "threads": torch.get_num_threads(),
                         "steps_per_epoch": epoch_steps, "world_size": ctx.world_size},
            "data": data_info,
            "parameters": count_parameters(trainer.bare_model),
            "versions": ckpt.versions(),
            "started": datetime.now().isoformat(timespec="seconds"),
        })

    emit({"event": "start", "run_dir": str(run_dir), "config": config, "device": str(device),
          "precision": precision, "train_count": len(train_data), "val_count": data_info["val_count"],
          "steps_per_epoch": epoch_steps, "start_epoch": start_epoch, "world_size": ctx.world_size})

    def save_state(position: dict[str, Any], perm: torch.Tensor | None) -> None:
        rng = _rng_tensors(trainer, order_generator)  # a collective: every rank takes part
        if not ctx.is_main:
            return
        extra = {}
        if perm is not None:
            extra["perm"] = perm
        if trainer.ema is not None:
            extra.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
        ckpt.save_state(run_dir / ckpt.STATE_FILE, trainer.bare_model, trainer.optimizer, trainer.scheduler, rng,
                        {"position": position, "history": history, "data": data_info,
                         "config": config.to_dict(), "world_size": ctx.world_size}, extra)

    with _sigint_flag() as stop:
        for epoch in range(start_epoch, config.epochs + 1):
            if state is None or state.epoch != epoch:
                state = EpochState(epoch=epoch, perm=torch.randperm(len(images), generator=order_generator).to(device))
            emit({"event": "epoch_start", "epoch": epoch, "epochs": config.epochs, "steps": epoch_steps,
                  "step": state.step})

            def on_batch(rec: dict[str, Any], epoch: int = epoch) -> None:
                metrics.add({"type": "batch", "epoch": epoch, "step": rec["step"], "loss": rec["loss"],
                             "lr": rec["lr"]})
                emit({"event": "batch", "epoch": epoch, **rec})

            finished = train_one_epoch(trainer, images, labels, state, stop, on_batch if ctx.is_main else None)
            if not finished:
                if ctx.is_main:
                    metrics.flush()  # before the checkpoint: a kill between the two loses no record
                save_state({"epoch": epoch, "step": state.step, "loss_sum": state.loss_sum,
                            "correct": state.correct, "seen": state.seen,
                            "train_seconds": state.train_seconds}, state.perm)
                emit({"event": "interrupted", "epoch": epoch, "step": state.step})
                distributed.shutdown(ctx)
                raise TrainingInterrupted(run_dir, epoch, state.step)
            lr = trainer.optimizer.param_groups[0]["lr"]
            if trainer.scheduler is not None and not trainer.scheduler_per_step:
                trainer.scheduler.step()
            loss_sum, correct, seen, seconds = distributed.sum_values(
                ctx, [state.loss_sum, state.correct, state.seen, state.train_seconds], device)
            seconds /= ctx.world_size  # ranks run side by side: wall time is their mean
            record: dict[str, Any] = {
                "type": "epoch", "epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                "lr": lr, "train_seconds": seconds, "images_per_s": seen / seconds,
            }
            if ctx.is_main and val_images is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
                t0 = time.perf_counter()
                logits = predict_logits(trainer.eval_model, val_images, config.eval_batch_size, precision, device)
                record["val_loss"], record["val_acc"] = loss_and_accuracy(logits, val_labels)
                record["eval_seconds"] = time.perf_counter() - t0
            history.append(record)
            if ctx.is_main:
                metrics.add(record)
                metrics.flush()  # before the checkpoint: a kill between the two loses no record
            save_state({"epoch": epoch, "step": 0}, None)
            emit({"event": "epoch", **record, "epochs": config.epochs})

    final_model = trainer.eval_model
    final = history[-1]
    train_seconds = sum(r["train_seconds"] for r in history)
    if ctx.is_main:
        ckpt.save_model(run_dir, final_model, {
            "preset": config.preset,
            "model": config.model,
            "model_args": config.model_args,
            "config": config.to_dict(),
            "metrics": {k: v for k, v in final.items() if k != "type"},
            "data": data_info,
            "parameters": count_parameters(final_model),
            "train_seconds": train_seconds,
            "precision": precision,
            "world_size": ctx.world_size,
        })
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    emit({"event": "end", "run_dir": str(run_dir), "final": final, "train_seconds": train_seconds})
    return RunResult(run_dir, config, final, history, final_model, train_seconds)


def _unstarted_run(run_dir: Path) -> bool:
    """True when `run_dir` holds a run that failed before its first checkpoint (it may be reused
    as --out); refuses a folder with a checkpoint or a trained model, which --resume continues."""
    if not (run_dir / CONFIG_FILE).exists():
        return False
    if (run_dir / ckpt.STATE_FILE).exists() or (run_dir / ckpt.MODEL_FILE).exists():
        raise DigitlabError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
    return True


def _read_run_config(run_dir: Path) -> TrainConfig:
    if not run_dir.is_dir():
        raise DigitlabError(f"{run_dir}: no such run folder to resume")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise DigitlabError(f"{path}: missing; not a digitlab run folder")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text())["config"]).validate()
    except DigitlabError as exc:
        raise DigitlabError(f"{path}: {exc}") from None
    except (ValueError, KeyError, TypeError, OSError) as exc:  # ValueError: bad JSON or not UTF-8
        raise DigitlabError(f"{path}: corrupt run config ({exc.__class__.__name__}: {exc})") from None
