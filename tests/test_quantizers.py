import pytest
import torch

from distiller_dcq.engine.quantizers import (BinaryWeights, DorefaWeights, TernaryWeights, make_weight_quantizer,
                                             quantize_weights_)
from conftest import LeNet


def test_binary_unscaled_weights_are_plus_minus_one_and_zero_maps_to_plus_one():
    w = torch.tensor([-0.3, 0.0, 0.2, 1e-9, -1e-9])
    assert BinaryWeights(scale="none")(w).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0]


def test_binary_layer_scale_is_mean_abs_weight_as_distillers_dorefa():
    w = torch.randn(20, 5, 3, 3)
    q = BinaryWeights(scale="layer")(w)
    alpha = w.abs().mean()
    assert torch.allclose(q.abs(), alpha.expand_as(q)) and torch.equal(q.sign(), torch.where(w >= 0, 1.0, -1.0))


def test_ternary_uses_twn_threshold_and_three_levels():
    w = torch.randn(1000)
    q = TernaryWeights(scale="none", threshold=0.7)(w)
    delta = 0.7 * w.abs().mean()
    assert set(q.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(q == 0, w.abs() <= delta)
    assert torch.equal(q[q != 0], w.sign()[q != 0])


def test_ternary_layer_scale_is_the_mean_magnitude_above_threshold():
    w = torch.randn(1000)
    q = TernaryWeights(scale="layer")(w)
    kept = w.abs() > 0.7 * w.abs().mean()
    assert torch.allclose(q[kept].abs(), w[kept].abs().mean().expand(int(kept.sum())))


def test_two_bit_dorefa_has_four_symmetric_levels():
    q = DorefaWeights(bits=2)(torch.randn(1000))
    assert torch.allclose(q.unique(), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


@pytest.mark.parametrize("quantizer", [BinaryWeights("layer"), BinaryWeights("none"), TernaryWeights("layer"),
                                       TernaryWeights("none")])
def test_binary_and_ternary_pass_the_gradient_straight_through(quantizer):
    w = torch.randn(50, requires_grad=True)
    upstream = torch.randn(50)
    (quantizer(w) * upstream).sum().backward()
    assert torch.allclose(w.grad, upstream)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="quaternary"), r"unknown weight mode 'quaternary'; choose one of: binary, dorefa, ternary"),
    (dict(mode="binary", scale="channel"), r"unknown weight scale 'channel'; choose one of: none, layer"),
    (dict(mode="dorefa", bits=1), r"bit width >= 2 \(use weight_mode binary"),
    (dict(mode="ternary", threshold=0), r"threshold must be > 0"),
])
def test_bad_quantizer_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_weight_quantizer(**kwargs)


def test_quantize_weights_covers_first_and_last_layers_and_keeps_fp_weights_trainable():
    model = LeNet()
    names = quantize_weights_(model, BinaryWeights(scale="none"))
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    for name in names:
        layer = getattr(model, name)
        assert set(layer.weight.unique().tolist()) <= {-1.0, 1.0}
        assert layer.parametrizations.weight.original.requires_grad
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert model.conv1.parametrizations.weight.original.grad.abs().sum() > 0
