"""The training loop: data as one uint8 tensor, batched augmentation, bf16 autocast where the
CPU supports it, an atomic resumable checkpoint every epoch, and bit-exact resume.

`fit(config, out_dir)` is the whole story; `train_one_epoch` and `predict_logits` are its parts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digitlab import checkpoint as ckpt
from digitlab import distributed
from digitlab.augment import augment_batch
from digitlab.config import TrainConfig
from digitlab.cudagraph import GraphedStep, unsupported_reason, wanted
from digitlab.data import DigitData, load_source, split
from digitlab.distributed import DistContext
from digitlab.errors import DigitlabError, missing
from digitlab.models import count_parameters, create_model
from digitlab.rundir import (  # noqa: F401 (read_metrics: API)
    CONFIG_FILE,
    MEMBER_PREFIX,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    is_ensemble,
    read_metrics,
)
from digitlab.runtime import (
    autocast,
    configure_determinism,
    device_description,
    predict_logits,
    prepare_model,
    resolve_device,
    resolve_precision,
    to_input,
)

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]


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


# ---------------------------------------------------------------- optimisation parts


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    # one fused kernel per step instead of one per tensor; CUDA only, so CPU results are untouched
    fused = {"fused": True} if params and params[0].device.type == "cuda" else {}
    if config.optimizer == "rmsprop":
        # Keras RMSprop: rho=0.9, epsilon=1e-7 (torch calls rho `alpha`, default 0.99)
        return torch.optim.RMSprop(params, lr=config.lr, alpha=config.momentum, eps=1e-7,
                                   weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(config.momentum, 0.999),
                                weight_decay=config.weight_decay, **fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.momentum, 0.999),
                                 weight_decay=config.weight_decay, **fused)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay)


def steps_per_epoch(train_count: int, config: TrainConfig) -> int:
    """Optimizer steps per epoch: the ragged tail is dropped, as Keras' steps_per_epoch does."""
    return int(train_count * config.epoch_fraction) // config.batch_size


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch_steps: int):
    """Returns (scheduler or None, 'step' | 'epoch'): when the scheduler is advanced."""
    total = config.epochs * epoch_steps
    if config.schedule == "onecycle":
        if config.warmup_fraction * total <= 1:  # torch's OneCycleLR would divide by zero
            raise DigitlabError(f"the one-cycle schedule needs more than one warm-up step: {config.epochs} epoch(s) x "
                                f"{epoch_steps} step(s) x warm-up fraction {config.warmup_fraction} is "
                                f"{config.warmup_fraction * total:g}; use more data, more epochs or a smaller batch")
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


class WeightEMA(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of the weights and buffers, with `ema_decay_at`'s warm-up.

    Torch's own `update_parameters` copies its CPU counter to the device for every (device, dtype)
    group of tensors on every step, and on CUDA each such copy waits for the card; this one reads
    the counter where it lives (the CPU) and sends nothing to the device. Same state dict, same
    arithmetic as AveragedModel with a lerp `multi_avg_fn`.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()],
                         [*model.parameters(), *model.buffers()], strict=True))
        updates = int(self.n_averaged)
        if updates == 0:
            for averaged, current in pairs:
                averaged.copy_(current)
        else:
            d = ema_decay_at(self.decay, updates)
            floats = [(a, c) for a, c in pairs if torch.is_floating_point(a)]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
            for averaged, current in pairs:
                if not torch.is_floating_point(averaged):  # BatchNorm's batch counter, as torch's own EMA treats it
                    averaged.copy_(averaged * d + current * (1.0 - d))
        self.n_averaged += 1

    def next_decay(self) -> float:
        """The decay of the next update: 0 (a copy) for the first, then `ema_decay_at`'s."""
        updates = int(self.n_averaged)
        return 0.0 if updates == 0 else ema_decay_at(self.decay, updates)

    @torch.no_grad()
    def update_towards(self, model: nn.Module, decay: torch.Tensor, weight: torch.Tensor) -> None:
        """`update_parameters`'s arithmetic with the decay and 1 - decay in 0-d device tensors, which
        a CUDA graph reads afresh at each replay; the caller counts the update (`n_averaged`)."""
        for averaged, current in zip([*self.module.parameters(), *self.module.buffers()],
                                     [*model.parameters(), *model.buffers()], strict=True):
            if torch.is_floating_point(averaged):
                averaged.lerp_(current, weight)
            else:
                averaged.copy_(averaged * decay + current * weight)


def build_ema(model: nn.Module, decay: float) -> WeightEMA | None:
    return WeightEMA(model, decay) if decay > 0 else None


# ---------------------------------------------------------------- evaluation


def loss_and_accuracy_tensors(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy as 0-d tensors on the logits' device (labels follow them)."""
    labels = labels.to(logits.device)
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss, acc = loss_and_accuracy_tensors(logits, labels)
    return loss.item(), acc.item()


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

    def position(self) -> dict[str, Any]:
        """What the checkpoint keeps of it (the permutation travels as a tensor)."""
        return {"epoch": self.epoch, "step": self.step, "loss_sum": self.loss_sum, "correct": self.correct,
                "seen": self.seen, "train_seconds": self.train_seconds}

    @classmethod
    def from_position(cls, position: dict[str, Any], perm: torch.Tensor) -> EpochState:
        return cls(perm=perm, **position)


@dataclass
class Trainer:
    """What one optimisation step needs, built once per run."""

    model: nn.Module  # possibly wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scheduler_per_step: bool
    ema: WeightEMA | None
    config: TrainConfig
    precision: str
    device: torch.device
    augment_generator: torch.Generator  # on `device`: augmentation draws its numbers where the data is
    ctx: DistContext = field(default_factory=DistContext)
    sync_every: int = 0  # steps between host reads of the loss; 0: sync_interval(device)
    outlier_pool: torch.Tensor | None = None  # (P, 28, 28) uint8 non-digits on `device` (outlier exposure)
    graphs: bool = False  # each step through `StepReplay` (CUDA graphs on CUDA)
    replay: StepReplay | None = None  # built by the first epoch: it binds the run's data tensors

    @property
    def outliers_per_step(self) -> int:
        if self.outlier_pool is None:
            return 0
        return max(1, round(self.config.outliers * self.local_batch))

    @property
    def local_batch(self) -> int:
        return self.config.batch_size // self.ctx.world_size

    @property
    def bare_model(self) -> nn.Module:
        """The model without its DDP wrapper: what is evaluated and saved."""
        module = self.model.module if self.ctx.enabled else self.model
        assert isinstance(module, nn.Module)
        return module

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.bare_model


def sync_interval(device: torch.device) -> int:
    """Steps between reads of the losses on the host. Each read waits for the device to finish
    its queue, so on a GPU read every 50 steps (nanoGPT's log_interval); on the CPU a read is free
    and the live bar shows every batch."""
    return 1 if device.type == "cpu" else 50


@dataclass
class _Pending:
    """One step whose loss and correct count still sit on the device."""

    loss: torch.Tensor  # 0-d float32
    correct: torch.Tensor  # 0-d int64
    count: int
    lr: float


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
    shards are disjoint and together cover the epoch. Losses stay on the device and are read
    every `sync_interval` steps, where `stop` is also honoured (so `state` is always complete).
    """
    config, ctx = trainer.config, trainer.ctx
    shard = state.perm[ctx.rank :: ctx.world_size]
    batch = trainer.local_batch
    steps = steps_per_epoch(len(state.perm), config)
    interval = trainer.sync_every or sync_interval(trainer.device)
    pending: list[_Pending] = []
    block_start = time.perf_counter()
    trainer.model.train()
    if trainer.graphs and (trainer.replay is None or not trainer.replay.serves(images, labels)):
        if trainer.replay is not None:
            trainer.replay.release()
        trainer.replay = StepReplay(trainer, images, labels)
    while state.step < steps:
        index = shard[state.step * batch : (state.step + 1) * batch]
        if trainer.replay is not None:
            loss, correct = trainer.replay(index)
        else:
            loss, correct = forward_backward(trainer, images, labels, index)
            trainer.optimizer.step()
        lr = trainer.optimizer.param_groups[0]["lr"]
        if trainer.scheduler is not None and trainer.scheduler_per_step:
            trainer.scheduler.step()
        if trainer.ema is not None and trainer.replay is None:
            trainer.ema.update_parameters(trainer.bare_model)
        state.step += 1
        pending.append(_Pending(loss, correct, len(index), lr))
        if len(pending) < interval and state.step < steps:
            continue
        _record_block(pending, state, block_start, steps, ctx.world_size, on_batch)
        pending.clear()
        block_start = time.perf_counter()
        stopping = stop is not None and stop.is_set()
        if ctx.enabled:
            stopping = distributed.any_rank(ctx, stopping, trainer.device)
        if stopping and state.step < steps:
            return False
    return True


def forward_backward(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                     captured: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather, augment, forward and backward on the images at `index`, leaving the gradients for
    the optimizer: returns the batch's loss and its count of correct predictions, as 0-d tensors
    left on the device. `captured`: the code a CUDA graph records (no autocast cache)."""
    config = trainer.config
    x = to_input(images[index])  # (B, 1, 28, 28)
    y = labels[index]
    if trainer.outlier_pool is not None:
        x = torch.cat([x, _draw_outliers(trainer)])
    if config.augment.enabled:
        x = augment_batch(x, config.augment, trainer.augment_generator)
    if trainer.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    # autocast's cache of bf16 weights would outlive a graph's capture: off there
    with autocast(trainer.device, trainer.precision, cache=not captured):
        logits = trainer.model(x)
        loss = F.cross_entropy(logits[: len(y)].float(), y, label_smoothing=config.label_smoothing)
        if trainer.outlier_pool is not None:  # non-digits pushed towards 1/10 for every class
            loss = loss - config.outlier_weight * F.log_softmax(logits[len(y) :].float(), dim=1).mean()
        logits = logits[: len(y)]
    # gradients set to None, not zeroed: the backward a graph captures then allocates them from
    # the graph's memory and each replay writes them afresh
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), (logits.argmax(1) == y).sum()


class StepReplay:
    """A training step as CUDA graphs replay it (see digitlab.cudagraph): the batch's indices
    copied into one buffer, then the graph of `forward_backward`, the optimizer's own step, and the
    graph of the EMA's update with its decay in device tensors. On CUDA the graphs are captured
    after a few eager steps; elsewhere every step runs eagerly, the same code, which is how the
    CPU tests check it.
    """

    def __init__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.trainer, self.images, self.labels = trainer, images, labels
        device = trainer.device
        self.index = torch.zeros(trainer.local_batch, dtype=torch.long, device=device)
        self.ema_decay = torch.zeros((), dtype=torch.float32, device=device)
        self.ema_weight = torch.zeros((), dtype=torch.float32, device=device)
        # each generator registered with a graph costs two small kernels per replay: only the one used
        draws = trainer.config.augment.enabled or trainer.outlier_pool is not None
        self.step_graph = GraphedStep(self.forward_backward, device, [trainer.augment_generator] if draws else [])
        self.ema_graph = GraphedStep(self.update_ema, device)

    def serves(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        return images is self.images and labels is self.labels

    def release(self) -> None:
        self.step_graph.release()
        self.ema_graph.release()

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_backward(self.trainer, self.images, self.labels, self.index, captured=True)

    def update_ema(self) -> tuple[()]:
        assert self.trainer.ema is not None
        self.trainer.ema.update_towards(self.trainer.bare_model, self.ema_decay, self.ema_weight)
        return ()

    def __call__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.index.copy_(index)
        loss, correct = self.step_graph()
        self.trainer.optimizer.step()
        ema = self.trainer.ema
        if ema is not None:
            decay = ema.next_decay()
            self.ema_decay.fill_(decay)
            self.ema_weight.fill_(1.0 - decay)
            self.ema_graph()
            ema.n_averaged += 1
        return loss, correct


def outlier_pool(config: TrainConfig, train_data: DigitData) -> np.ndarray:
    """The run's non-digits, a fifth of the training set's size (600 to 12,000), the same on every resume."""
    from digitlab.outliers import non_digit_images

    return non_digit_images(min(12_000, max(600, len(train_data) // 5)), config.seed, train_data.images)


def _draw_outliers(trainer: Trainer) -> torch.Tensor:
    """(K, 1, 28, 28) non-digits drawn with the augmentation generator (checkpointed, so resumes exactly)."""
    assert trainer.outlier_pool is not None
    pick = torch.randint(len(trainer.outlier_pool), (trainer.outliers_per_step,),
                         generator=trainer.augment_generator, device=trainer.device)
    return to_input(trainer.outlier_pool[pick])


def _record_block(pending: list[_Pending], state: EpochState, block_start: float, steps: int, world_size: int,
                  on_batch: Callable[[dict[str, Any]], None] | None) -> None:
    """Read a block of steps' losses in one host sync and add them to `state` (and `on_batch`)."""
    losses = torch.stack([p.loss for p in pending]).tolist()
    corrects = torch.stack([p.correct for p in pending]).tolist()
    # the clock is read after that sync: on a GPU the host runs ahead of the card, and a clock read
    # before it would count the time to queue the block's work, not to do it
    dt = (time.perf_counter() - block_start) / len(pending)  # the device ran the block as a whole: share it
    first_step = state.step - len(pending) + 1
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:  # NaN weights only get worse: stop and say so rather than save a useless model
        raise DigitlabError(f"training diverged: the loss is {losses[bad]} at epoch {state.epoch}, step "
                            f"{first_step + bad}; train again with a lower learning rate (--lr) into a new --out "
                            "(a resume would repeat the same steps)")
    for i, (p, batch_loss, batch_correct) in enumerate(zip(pending, losses, corrects, strict=True)):
        state.loss_sum += batch_loss * p.count
        state.correct += int(batch_correct)
        state.seen += p.count
        state.train_seconds += dt
        if on_batch is not None:
            on_batch({
                "step": first_step + i, "steps": steps, "loss": batch_loss, "acc": batch_correct / p.count,
                "lr": p.lr, "images_per_s": p.count * world_size / dt,
            })


def _load_training_data(config: TrainConfig) -> tuple[DigitData, DigitData | None]:
    data = load_source(config.data)
    labels = data.require_labels("training needs a labelled source (Kaggle train.csv, not test.csv)")
    if config.val_data:
        val = load_source(config.val_data)
        val.require_labels("validation needs labels")
        return data, val
    if config.val_split == 0:
        return data, None
    train_idx, val_idx = split(labels, config.val_split, config.data_split_seed)
    return data.subset(train_idx, f"{config.data}[train]"), data.subset(val_idx, f"{config.data}[val]")


def augment_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The augmentation stream of one rank, on the device its images live on (a CPU generator
    cannot draw CUDA tensors); a different stream per rank, so ranks do not augment alike."""
    derived = (seed * 7919 + 104729 * rank + 1) % 2**64  # torch's seed range; unchanged for any seed below it
    return torch.Generator(device=device).manual_seed(derived)


def _build_trainer(config: TrainConfig, ctx: DistContext, device: torch.device, precision: str,
                   epoch_steps: int, graphs: bool = False) -> Trainer:
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = prepare_model(create_model(config.model, **config.model_args), device)
    ema = build_ema(model, config.ema_decay)
    if ctx.enabled:
        torch.manual_seed(config.seed + ctx.rank)  # but different dropout masks
        model = distributed.data_parallel(model, device)
    optimizer = build_optimizer(model, config)
    scheduler, when = build_scheduler(optimizer, config, epoch_steps)
    return Trainer(model, optimizer, scheduler, when == "step", ema, config, precision, device,
                   augment_generator(config.seed, ctx.rank, device), ctx, graphs=graphs)


def _rng_tensors(trainer: Trainer, order_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """RNG states of every rank (gathered to all), so any rank can be resumed exactly."""
    out = {"order": order_generator.get_state()}
    states = [("torch", torch.get_rng_state()), ("augment", trainer.augment_generator.get_state())]
    if trainer.device.type == "cuda":  # dropout masks on the GPU come from its default generator
        states.append(("cuda", torch.cuda.get_rng_state(trainer.device)))
    for name, state in states:
        for rank, tensor in enumerate(distributed.gather_tensor(trainer.ctx, state, trainer.device)):
            out[f"{name}.{rank}"] = tensor
    return out


def _restore_rng(trainer: Trainer, order_generator: torch.Generator, rng: dict[str, torch.Tensor]) -> None:
    rank = trainer.ctx.rank
    torch.set_rng_state(rng[f"torch.{rank}"])
    trainer.augment_generator.set_state(rng[f"augment.{rank}"])
    order_generator.set_state(rng["order"])
    if trainer.device.type == "cuda":
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"], trainer.device)


@dataclass
class _Run:
    """Everything one call of `fit` works with, set up once by `_open_run`."""

    run_dir: Path
    config: TrainConfig
    ctx: DistContext
    trainer: Trainer
    order_generator: torch.Generator  # epoch order, on the CPU whatever the device
    images: torch.Tensor  # (N, 28, 28) uint8 on the device
    labels: torch.Tensor  # (N,) int64 on the device
    val_images: torch.Tensor | None
    val_labels: torch.Tensor | None
    data_info: dict[str, Any]
    train_data: DigitData  # host copy: its image hashes go into the run folder
    metrics: MetricsLog
    emit: Callback
    history: list[dict[str, Any]] = field(default_factory=list)
    state: EpochState | None = None  # set when resuming mid-epoch
    start_epoch: int = 1
    restart: bool = False  # a fresh run in a folder left by one that failed before its first checkpoint

    @property
    def device(self) -> torch.device:
        return self.trainer.device


def fit(
    config: TrainConfig | None,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    data: tuple[DigitData, DigitData | None] | None = None,
    progress: bool = True,
    cuda_graphs: bool | None = None,
) -> RunResult:
    """Train `config` into a run folder (or continue the run in `resume`); returns the result.

    `data` may pass preloaded (train, val) sets (notebooks, tests, benchmarks); otherwise the
    config's sources are loaded. `progress` shows a bar per epoch (tqdm: a widget in Jupyter, text
    in a terminal); `callbacks` receive every training event. Ctrl-C saves the state and raises
    TrainingInterrupted. Under torchrun, every rank calls fit and only rank 0 writes files or emits events.
    `cuda_graphs` overrides the config's (a resumed run's too): it changes the speed, not the result.
    """
    callbacks = list(callbacks)
    if progress:
        from digitlab.progress import ProgressBar

        callbacks.append(ProgressBar())
    run = _open_run(config, out_dir, resume, callbacks, data, cuda_graphs)
    if resume is not None:
        _restore(run)
        if run.ctx.is_main:
            _record_speed_settings(run)
    elif run.ctx.is_main:
        _write_run_config(run)
    run.emit({"event": "start", "run_dir": str(run.run_dir), "config": run.config,
              "device": device_description(run.device), "precision": run.trainer.precision,
              "cuda_graphs": run.trainer.graphs,
              "train_count": run.data_info["train_count"], "val_count": run.data_info["val_count"],
              "steps_per_epoch": steps_per_epoch(run.data_info["train_count"], run.config),
              "start_epoch": run.start_epoch, "world_size": run.ctx.world_size, "resumed": resume is not None,
              "start_step": run.state.step if run.state is not None else 0})
    with _sigint_flag() as stop:
        try:
            for epoch in range(run.start_epoch, run.config.epochs + 1):
                _train_epoch(run, epoch, stop)
        finally:  # the graphs hold GPU memory and refer back to the trainer: free them with the run
            if run.trainer.replay is not None:
                run.trainer.replay.release()
            run.trainer.replay = None
    return _finish(run)


def _run_folder(config: TrainConfig | None, out_dir: str | Path | None,
                resume: str | Path | None) -> tuple[TrainConfig, Path, bool]:
    """(config, run folder, restart): a resumed run's own config, or the given one and a fresh folder."""
    if resume is not None:
        run_dir = Path(resume)
        resumed = _read_run_config(run_dir)
        if not (run_dir / STATE_FILE).exists() and not (run_dir / MODEL_FILE).exists():
            raise DigitlabError(f"{run_dir}: no checkpoint to resume from (the run stopped before its first "
                                f"epoch ended); start it afresh with --out {run_dir}")
        return resumed, run_dir, False
    if config is None:
        raise DigitlabError("fit needs a config or a run folder to resume")
    config = config.validate()
    run_dir = Path(out_dir) if out_dir is not None else _default_run_dir(config.preset)
    return config, run_dir, _unstarted_run(run_dir)


def _data_info(config: TrainConfig, train_data: DigitData, val_data: DigitData | None) -> dict[str, Any]:
    """What the run trained and validated on, for config.json and model.json."""
    return {
        "train_source": config.data,
        "train_fingerprint": train_data.fingerprint,
        "train_count": len(train_data),
        "val_source": val_data.source if val_data is not None else None,
        "val_fingerprint": val_data.fingerprint if val_data is not None else None,
        "val_count": len(val_data) if val_data is not None else 0,
    }


def _open_run(config: TrainConfig | None, out_dir: str | Path | None, resume: str | Path | None,
              callbacks: list[Callback], data: tuple[DigitData, DigitData | None] | None,
              cuda_graphs: bool | None = None) -> _Run:
    """Resolve the config, the folder, the device and the data; build the model and optimizer."""
    ctx = distributed.context_from_env()
    config, run_dir, restart = _run_folder(config, out_dir, resume)
    if cuda_graphs is not None:
        config = dataclasses.replace(config, cuda_graphs=cuda_graphs).validate()
    if config.batch_size % ctx.world_size:
        raise DigitlabError(f"batch size {config.batch_size} does not split evenly over {ctx.world_size} processes")

    device = distributed.init(ctx, resolve_device(config.device))
    configure_determinism(device)
    precision = resolve_precision(config.precision, device)
    train_data, val_data = data if data is not None else _load_training_data(config)
    epoch_steps = steps_per_epoch(len(train_data), config)
    if epoch_steps == 0:
        share = f" x epoch fraction {config.epoch_fraction}" if config.epoch_fraction < 1 else ""
        raise DigitlabError(
            f"{config.data}: {len(train_data)} training images{share} is fewer than one batch of {config.batch_size}"
        )
    if config.tensorboard and ctx.is_main:
        from digitlab.tensorboard import TensorBoardLogger  # an optional extra: one clear error without it

        callbacks = [*callbacks, TensorBoardLogger(run_dir, val_data)]
    listeners = callbacks if ctx.is_main else []

    def emit(event: dict[str, Any]) -> None:
        for listener in listeners:
            listener(event)

    def on_device(array: Any) -> torch.Tensor:
        return torch.from_numpy(array).to(device)

    graphs = _use_graphs(config, device, ctx)
    if config.cuda_graphs and not graphs:  # asked for where there are none (said once): from now on, where usable
        config = dataclasses.replace(config, cuda_graphs=None)
    trainer = _build_trainer(config, ctx, device, precision, epoch_steps, graphs)
    if config.outliers > 0:
        trainer.outlier_pool = on_device(outlier_pool(config, train_data))
    return _Run(
        run_dir=run_dir, config=config, ctx=ctx, trainer=trainer,
        # epoch order is drawn on the CPU whatever the device: the same order on every rank and machine
        order_generator=torch.Generator(device="cpu").manual_seed(config.seed),
        images=on_device(train_data.images), labels=on_device(train_data.labels),
        # validation data on the device too: evaluation then moves nothing per batch
        val_images=on_device(val_data.images) if val_data is not None else None,
        val_labels=on_device(val_data.labels) if val_data is not None else None,
        data_info=_data_info(config, train_data, val_data),
        train_data=train_data, metrics=MetricsLog(run_dir / METRICS_FILE), emit=emit, restart=restart,
    )


def _use_graphs(config: TrainConfig, device: torch.device, ctx: DistContext) -> bool:
    """Whether this run replays its steps as CUDA graphs: asked for (or left to the default, under
    torch >= DEFAULT_FROM_TORCH), and possible here. Where they were asked for and cannot be used,
    it says why once."""
    if not wanted(config.cuda_graphs):
        return False
    why_not = unsupported_reason(device, ctx.world_size)
    if why_not is not None and config.cuda_graphs:
        log.warning("--cuda-graphs: not used, %s; training eagerly", why_not)
    return why_not is None


def _write_run_config(run: _Run) -> None:
    if run.restart:
        log.warning("%s: holds a config.json but no checkpoint (a run that stopped before its first epoch "
                    "ended); starting afresh there", run.run_dir)
        (run.run_dir / METRICS_FILE).unlink(missing_ok=True)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(run.run_dir / CONFIG_FILE, {
        "config": run.config.to_dict(),
        "resolved": {"device": str(run.device), "precision": run.trainer.precision, "cuda_graphs": run.trainer.graphs,
                     "threads": torch.get_num_threads(),
                     "steps_per_epoch": steps_per_epoch(run.data_info["train_count"], run.config),
                     "world_size": run.ctx.world_size},
        "data": run.data_info,
        "parameters": count_parameters(run.trainer.bare_model),
        "versions": ckpt.versions(),
        "started": datetime.now().isoformat(timespec="seconds"),
    })
    ckpt.write_train_hashes(run.run_dir, run.train_data.image_hashes())  # so evaluation can leave them out


def _record_speed_settings(run: _Run) -> None:
    """A resume may change a speed-only setting (--cuda-graphs) or what it resolves to here (graphs
    where the run started eagerly): config.json then records the new one, which a later resume, and
    the resume command printed after a Ctrl-C, keep."""
    path = run.run_dir / CONFIG_FILE
    record = json.loads(path.read_text())
    resolved = record.setdefault("resolved", {})
    if (record["config"].get("cuda_graphs"), resolved.get("cuda_graphs")) == (run.config.cuda_graphs,
                                                                              run.trainer.graphs):
        return
    record["config"]["cuda_graphs"] = run.config.cuda_graphs
    resolved["cuda_graphs"] = run.trainer.graphs
    ckpt.atomic_write_json(path, record)


def _restore(run: _Run) -> None:
    """Load the checkpoint: weights, optimizer, schedule, EMA, RNG streams, history and position."""
    trainer, ctx = run.trainer, run.ctx
    tensors, header = ckpt.load_state(run.run_dir / STATE_FILE)
    info = _checkpoint_info(run.run_dir / STATE_FILE, header)
    _check_config_unchanged(run, info["config"])
    if info["data"]["train_fingerprint"] != run.data_info["train_fingerprint"]:
        raise DigitlabError(
            f"{run.run_dir}: training data changed since the run started (fingerprint "
            f"{run.data_info['train_fingerprint']} != {info['data']['train_fingerprint']})"
        )
    if info.get("world_size", 1) != ctx.world_size:
        raise DigitlabError(f"{run.run_dir}: was trained by {info.get('world_size', 1)} process(es); "
                            f"resume it with the same number, not {ctx.world_size}")
    # generator states and fused optimizer settings belong to the kind of device that wrote them
    # (older checkpoints tell only CUDA from the rest, through the CUDA generator's state)
    written_on = info.get("device_type") or (
        "cuda" if "rng.cuda.0" in tensors else ("cpu" if run.device.type == "cuda" else run.device.type))
    if written_on != run.device.type:
        raise DigitlabError(f"{run.run_dir}: was trained on {written_on} and resumes only there (its random-number "
                            f"states and optimizer settings are that device's), not on {run.device.type}")
    rng = ckpt.restore_state(tensors, header, trainer.bare_model, trainer.optimizer, trainer.scheduler)
    extra = ckpt.extra_tensors(tensors)
    if trainer.ema is not None:
        trainer.ema.load_state_dict({k[4:]: v for k, v in extra.items() if k.startswith("ema.")})
    _restore_rng(trainer, run.order_generator, rng)
    run.history = info["history"]
    pos = info["position"]
    if pos["step"] > 0:  # mid-epoch stop (Ctrl-C): continue that very epoch
        run.state = EpochState.from_position(pos, extra["perm"].to(run.device))
        run.start_epoch = pos["epoch"]
    else:
        run.start_epoch = pos["epoch"] + 1
    if ctx.is_main:
        run.metrics.truncate_to(run.start_epoch, pos["step"])
    log.info("resuming %s at epoch %d step %d", run.run_dir, run.start_epoch, pos["step"])


def _checkpoint_info(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The header's run information, checked for shape (the checksum covers only the tensors)."""
    info = header.get("info")
    shapes = {"config": dict, "position": dict, "history": list, "data": dict}
    if not isinstance(info, dict) or any(not isinstance(info.get(k), t) for k, t in shapes.items()) \
            or not isinstance(header.get("optimizer"), dict):
        raise DigitlabError(f"{path}: corrupt checkpoint (its header lacks the run's position, history, data "
                            "or optimizer state)")
    position = info["position"]
    if not all(isinstance(position.get(k), int) for k in ("epoch", "step")):
        raise DigitlabError(f"{path}: corrupt checkpoint (position {position!r})")
    return info


def _check_config_unchanged(run: _Run, saved: dict[str, Any]) -> None:
    """A resumed run repeats the interrupted one: its recipe (config.json) must be the checkpoint's."""
    changed = run.config.changes_from(saved)
    if changed:
        diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed[:4])
        raise DigitlabError(f"{run.run_dir / CONFIG_FILE}: changed since the checkpoint ({diff}); a resume "
                            "continues the run as it started: put those values back, or train a new run "
                            "(e.g. more --epochs) into another --out")


def _save_state(run: _Run, position: dict[str, Any], perm: torch.Tensor | None) -> None:
    trainer = run.trainer
    rng = _rng_tensors(trainer, run.order_generator)  # a collective: every rank takes part
    if not run.ctx.is_main:
        return
    extra = {}
    if perm is not None:
        extra["perm"] = perm
    if trainer.ema is not None:
        extra.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    ckpt.save_state(run.run_dir / STATE_FILE, trainer.bare_model, trainer.optimizer, trainer.scheduler, rng,
                    {"position": position, "history": run.history, "data": run.data_info,
                     "config": run.config.to_dict(), "world_size": run.ctx.world_size,
                     "device_type": run.device.type}, extra)


def _train_epoch(run: _Run, epoch: int, stop: threading.Event) -> None:
    """One epoch, its record (validation included) and its checkpoint; Ctrl-C saves and raises."""
    config, ctx, trainer = run.config, run.ctx, run.trainer
    if run.state is None or run.state.epoch != epoch:
        perm = torch.randperm(len(run.images), generator=run.order_generator).to(run.device)
        run.state = EpochState(epoch=epoch, perm=perm)
    state = run.state
    run.emit({"event": "epoch_start", "epoch": epoch, "epochs": config.epochs,
              "steps": steps_per_epoch(len(run.images), config), "step": state.step})

    def on_batch(rec: dict[str, Any]) -> None:
        run.metrics.add({"type": "batch", "epoch": epoch, "step": rec["step"], "loss": rec["loss"], "lr": rec["lr"]})
        run.emit({"event": "batch", "epoch": epoch, **rec})

    if not train_one_epoch(trainer, run.images, run.labels, state, stop, on_batch if ctx.is_main else None):
        if ctx.is_main:
            run.metrics.flush()  # before the checkpoint: a kill between the two loses no record
        _save_state(run, state.position(), state.perm)
        run.emit({"event": "interrupted", "epoch": epoch, "step": state.step})
        distributed.shutdown(ctx)
        raise TrainingInterrupted(run.run_dir, epoch, state.step)
    lr = trainer.optimizer.param_groups[0]["lr"]
    if trainer.scheduler is not None and not trainer.scheduler_per_step:
        trainer.scheduler.step()
    loss_sum, correct, seen, seconds = distributed.sum_values(
        ctx, [state.loss_sum, state.correct, state.seen, state.train_seconds], run.device)
    seconds /= ctx.world_size  # ranks run side by side: wall time is their mean
    record: dict[str, Any] = {
        "type": "epoch", "epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
        "lr": lr, "train_seconds": seconds, "images_per_s": seen / seconds,
    }
    if ctx.is_main and run.val_images is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
        record.update(_validate(run))
    run.history.append(record)
    if ctx.is_main:
        run.metrics.add(record)
        run.metrics.flush()  # before the checkpoint: a kill between the two loses no record
    _save_state(run, {"epoch": epoch, "step": 0}, None)
    run.emit({"event": "epoch", **record, "epochs": config.epochs})


def _validate(run: _Run) -> dict[str, float]:
    assert run.val_images is not None and run.val_labels is not None
    t0 = time.perf_counter()
    trainer = run.trainer
    logits = predict_logits(trainer.eval_model, run.val_images, run.config.eval_batch_size, trainer.precision,
                            run.device)
    val_loss, val_acc = loss_and_accuracy(logits, run.val_labels)
    return {"val_loss": val_loss, "val_acc": val_acc, "eval_seconds": time.perf_counter() - t0}


def _calibrate(run: _Run, model: nn.Module) -> None:
    """Fit the temperature on the validation split (never the test set) into calibration.json."""
    from digitlab.calibration import calibrate_probs, save_calibration

    assert run.val_images is not None and run.val_labels is not None
    logits = predict_logits(model, run.val_images, run.config.eval_batch_size, "fp32", run.device)
    val_probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
    save_calibration(run.run_dir, calibrate_probs(val_probs, run.val_labels.cpu().numpy(),
                                                  run.data_info["val_source"]))


def _finish(run: _Run) -> RunResult:
    """Write the final (EMA) weights with their metadata; every rank leaves together."""
    config, ctx = run.config, run.ctx
    final_model = run.trainer.eval_model
    final = run.history[-1]
    train_seconds = sum(r["train_seconds"] for r in run.history)
    if ctx.is_main:
        ckpt.save_model(run.run_dir, final_model, {
            "preset": config.preset,
            "model": config.model,
            "model_args": config.model_args,
            "config": config.to_dict(),
            "metrics": {k: v for k, v in final.items() if k != "type"},
            "data": run.data_info,
            "parameters": count_parameters(final_model),
            "train_seconds": train_seconds,
            "precision": run.trainer.precision,
            "world_size": ctx.world_size,
        })
        if run.val_images is not None and run.val_labels is not None:
            _calibrate(run, final_model)
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    run.emit({"event": "end", "run_dir": str(run.run_dir), "final": final, "train_seconds": train_seconds})
    return RunResult(run.run_dir, config, final, run.history, final_model, train_seconds)


def _unstarted_run(run_dir: Path) -> bool:
    """True when `run_dir` holds a run that failed before its first checkpoint (it may be reused
    as --out); refuses a folder with a checkpoint or a trained model, which --resume continues."""
    if not (run_dir / CONFIG_FILE).exists():
        return False
    if (run_dir / STATE_FILE).exists() or (run_dir / MODEL_FILE).exists():
        raise DigitlabError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
    return True


def _read_run_config(run_dir: Path) -> TrainConfig:
    if not run_dir.is_dir():
        raise missing(run_dir, "a run folder to resume", folder=True)
    path = run_dir / CONFIG_FILE
    if not path.is_file() and (is_ensemble(run_dir) or any(run_dir.glob(f"{MEMBER_PREFIX}*"))):
        raise DigitlabError(f"{run_dir}: an ensemble folder; an ensemble is finished by running the same "
                            f"`digitlab ensemble ... --out {run_dir}` again (its members resume)")
    if not path.is_file():
        raise DigitlabError(f"{path}: missing; not a digitlab run folder")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text())["config"]).validate()
    except DigitlabError as exc:
        raise DigitlabError(f"{path}: {exc}") from None
    except (ValueError, KeyError, TypeError, OSError) as exc:  # ValueError: bad JSON or not UTF-8
        raise DigitlabError(f"{path}: corrupt run config ({exc.__class__.__name__}: {exc})") from None
