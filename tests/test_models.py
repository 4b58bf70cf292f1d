"""Model registry: the seed network's exact size, and every preset's forward/backward."""

from __future__ import annotations

import pytest
import torch

from digitlab.errors import DigitlabError
from digitlab.models import count_parameters, create_model, list_models, register_model, summary_text


def test_seed2017_has_the_notebooks_parameter_count() -> None:
    assert count_parameters(create_model("seed2017")) == 594_922


def test_seed2017_summary_matches_keras_table() -> None:
    text = summary_text(create_model("seed2017"))
    assert "Total params: 594,922" in text
    assert "(None, 32, 26, 26)" in text and "(None, 1024)" in text and "524,800" in text


def test_summary_of_a_model_that_lives_on_another_device() -> None:
    """A model trained on a GPU is summarised there (meta stands in for CUDA: nothing runs)."""
    assert summary_text(create_model("seed2017").to("meta")) == summary_text(create_model("seed2017"))


def test_seed2017_uses_keras_initialisation() -> None:
    model = create_model("seed2017")
    dense = model.classifier[1]
    bound = (6 / (1024 + 512)) ** 0.5  # Glorot-uniform limit
    assert dense.weight.abs().max() <= bound
    assert dense.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(dense.bias) == 0


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_duplicate_registration_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("seed2017")(lambda: None)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(DigitlabError, match=r"unknown model 'nope'.*seed2017"):
        create_model("nope")


def test_fast_dropout_rate_scale_and_eval_identity() -> None:
    from digitlab.models import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(0.05)
    x = torch.ones(1_000_001)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.95))
    assert not torch.equal(drop(x), y)  # a new mask every call
    drop.eval()
    assert drop(x) is x


def test_resnet_is_the_anchor_scaled_by_width() -> None:
    from digitlab.models import ResNet

    model = create_model("resnet")
    assert count_parameters(model) == 298_442
    # global average pooling: the classifier sees only the widest block's channel means
    assert model.classifier[-1].in_features == 128
    wide = create_model("resnet", width=48)
    assert isinstance(wide, ResNet) and wide.classifier[-1].in_features == 192
    assert count_parameters(wide) > 2 * count_parameters(model)


@pytest.mark.parametrize("name", list_models())
def test_every_model_exports_to_onnx_with_the_same_outputs(name: str) -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("onnxruntime")
    from digitlab.export import module_to_onnx, onnx_session

    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(3, 1, 28, 28)
    session = onnx_session(module_to_onnx(model))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_summary_command_takes_a_preset_a_model_or_says_what_it_takes(capsys) -> None:
    from digitlab.cli import main

    assert main(["summary", "quick"]) == 0  # a training preset: its network (the notebook's)
    out = capsys.readouterr().out
    assert out.startswith("preset quick: model seed2017") and "Total params: 594,922" in out
    assert main(["summary", "fast"]) == 0
    assert main(["summary", "nope"]) == 2
    err = capsys.readouterr().err
    assert "neither a run folder, a preset (best, fast, fast-long" in err and "nor a model (best" in err
