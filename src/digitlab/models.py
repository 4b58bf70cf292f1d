"""Model presets: tiny registered factory functions reached through `create_model(name)`.

Every model takes `(N, 1, 28, 28)` float input scaled to [0, 1] and returns `(N, 10)` logits
(softmax lives in the loss, as Keras' `categorical_crossentropy` on softmax outputs).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from digitlab.errors import DigitlabError

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a factory to the registry; a second model with the same name is refused."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **overrides) -> nn.Module:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise DigitlabError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None
    unknown = sorted(set(overrides) - set(model_parameters(name)))
    if unknown:
        raise DigitlabError(f"model {name!r} has no argument {', '.join(unknown)}; it takes "
                            f"{', '.join(model_parameters(name)) or 'none'}")
    try:
        return factory(**overrides)
    except (TypeError, ValueError, RuntimeError) as exc:  # a width of the wrong type, negative, or too big to allocate
        raise DigitlabError(f"model {name!r} cannot be built with {overrides} "
                            f"({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__})") from None


def model_parameters(name: str) -> list[str]:
    """The keyword arguments model `name` accepts (what a model.json's model_args may hold)."""
    create = _REGISTRY.get(name)
    if create is None:
        raise DigitlabError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return list(inspect.signature(create).parameters)


def keras_init_(model: nn.Module) -> nn.Module:
    """Keras defaults: Glorot-uniform kernels, zero biases (torch defaults to Kaiming-uniform)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


class FastDropout(nn.Module):
    """Dropout whose mask costs half the random numbers of `nn.Dropout`.

    torch's CPU `bernoulli_` draws one 32-bit number per element and was 11% of a seed2017
    training step; here each 32-bit draw gives two 16-bit uniforms, and an element is
    dropped when its uniform falls below round(p * 65536) / 65536 (p = 0.05 becomes
    0.0500031). Identity in eval mode, so exported models contain no trace of it.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536) - 32768  # compared with int16 values in [-32768, 32767]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        # the full signed range: a plain random_() leaves the sign bit 0, biasing the high half
        bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_(-(2**31), 2**31 - 1)
        uniform16 = bits.view(torch.int16)[:n].view(x.shape)
        keep = uniform16 >= self.threshold
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Seed2017Net(nn.Module):
    """The 2017 notebook's Keras network, layer for layer (594,922 parameters)."""

    def __init__(self, dropout: float = 0.05) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(inplace=True),    # (B, 32, 26, 26)
            nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True),   # (B, 32, 24, 24)
            nn.MaxPool2d(2), FastDropout(dropout),          # (B, 32, 12, 12)
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),   # (B, 64, 10, 10)
            nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True),   # (B, 64, 8, 8)
            nn.MaxPool2d(2), FastDropout(dropout),          # (B, 64, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                                   # (B, 1024)
            nn.Linear(1024, 512), nn.ReLU(inplace=True), FastDropout(dropout),
            nn.Linear(512, 10),                             # (B, 10) logits
        )
        keras_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("seed2017")
def seed2017(dropout: float = 0.05) -> nn.Module:
    return Seed2017Net(dropout=dropout)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    # bias is redundant before BatchNorm, which adds its own shift
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FastNet(nn.Module):
    """Speed-run net: Conv24k5-pool-Conv32k3-pool-FC256; one epoch reaches ~99%.

    Each block pools before BatchNorm and ReLU (max-pooling commutes with the ReLU), so
    the normalisation runs on a map 4x smaller: BN on the 24x24 map was 40% of a step.
    """

    def __init__(self, width1: int = 24, width2: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width1, 5, bias=False),       # (B, 24, 24, 24)
            nn.MaxPool2d(2),                           # (B, 24, 12, 12)
            nn.BatchNorm2d(width1), nn.ReLU(inplace=True),
            nn.Conv2d(width1, width2, 3, bias=False),  # (B, 32, 10, 10)
            nn.MaxPool2d(2),                           # (B, 32, 5, 5)
            nn.BatchNorm2d(width2), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width2 * 25, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("fast")
def fast(width1: int = 24, width2: int = 32, hidden: int = 256) -> nn.Module:
    return FastNet(width1=width1, width2=width2, hidden=hidden)


class BestNet(nn.Module):
    """The Kaggle "25 million images" family: C32-C32-C32k5s2-C64-C64-C64k5s2-C128k4, BN everywhere."""

    def __init__(self, width: int = 32, dropout: float = 0.4) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(1, w, 3), conv_bn(w, w, 3),                      # (B, 32, 24, 24)
            conv_bn(w, w, 5, stride=2, padding=2), nn.Dropout(dropout),  # (B, 32, 12, 12)
            conv_bn(w, 2 * w, 3), conv_bn(2 * w, 2 * w, 3),          # (B, 64, 8, 8)
            conv_bn(2 * w, 2 * w, 5, stride=2, padding=2), nn.Dropout(dropout),  # (B, 64, 4, 4)
            conv_bn(2 * w, 4 * w, 4),                                 # (B, 128, 1, 1)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("best")
def best(width: int = 32, dropout: float = 0.4) -> nn.Module:
    return BestNet(width=width, dropout=dropout)


class Residual(nn.Module):
    """BatchNorm, then x + relu(conv3x3(x)): the block of ttdoucet/mnist (99.74% per net)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        return x + torch.relu(self.conv(x))


class ResNet(nn.Module):
    """ttdoucet/mnist's 7-conv residual net with global average pooling, widths scaled.

    The anchor's widths (128, 256, 512) cost ~25x `best`'s compute, hours per run on a laptop
    CPU; at (32, 64, 128) it trains at `best`'s speed with as many parameters.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            nn.Conv2d(1, w1, 5, padding=2), nn.ReLU(inplace=True),   # (B, 32, 28, 28)
            Residual(w1), nn.MaxPool2d(2), Residual(w1),              # (B, 32, 14, 14)
            nn.BatchNorm2d(w1), nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), Residual(w2),                            # (B, 64, 7, 7)
            nn.BatchNorm2d(w2), nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True), Residual(w3),            # (B, 128, 4, 4)
            nn.BatchNorm2d(w3),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("resnet")
def resnet(width: int = 32) -> nn.Module:
    return ResNet(width=width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    parameters: int


def layer_table(model: nn.Module) -> list[LayerRow]:
    """Leaf layers in call order with their output shapes (batch dim shown as None)."""
    rows: list[LayerRow] = []
    hooks = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue

        def record(mod: nn.Module, _inp, out, name: str = name) -> None:
            rows.append(
                LayerRow(name, type(mod).__name__, tuple(out.shape[1:]), sum(p.numel() for p in mod.parameters()))
            )

        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # a probe on the model's own device: a net trained on a GPU is summarised where it is
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(torch.zeros(1, 1, 28, 28, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return rows


def summary_text(model: nn.Module, title: str = "") -> str:
    """A Keras-style table: layer, output shape, parameters, then the totals."""
    rows = layer_table(model)
    lines = [title] if title else []
    bar = "_" * 72
    lines += [bar, f"{'Layer (type)':<34}{'Output Shape':<24}{'Param #':>12}", "=" * 72]
    for row in rows:
        shape = "(None, " + ", ".join(str(d) for d in row.output_shape) + ")"
        lines.append(f"{row.name + ' (' + row.kind + ')':<34}{shape:<24}{row.parameters:>12,}")
    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines += [
        "=" * 72,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        bar,
    ]
    return "\n".join(lines)
