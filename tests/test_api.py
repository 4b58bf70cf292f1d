"""The package-level Python API resolves every advertised name, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import digitlab


@pytest.mark.parametrize("name", [n for n in digitlab.__all__ if n != "__version__"])
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(digitlab, name) is not None


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        digitlab.nope  # noqa: B018


def test_import_does_not_load_torch() -> None:
    code = "import sys, digitlab, digitlab.cli; digitlab.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
