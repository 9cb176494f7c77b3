"""The engine of DCQ's relatives (no Distiller): precision draws, units, stages, BatchNorm kept, joint KD."""
import pytest
import torch
import torch.nn as nn

from conftest import LeNet
from distiller_dcq.engine.cotraining import mutual_distillation_losses
from distiller_dcq.engine.precision import (PrecisionStages, batchnorm_statistics_kept, independent_draws,
                                            precision_units, rising_probability)


class Clip(nn.Module):
    """Stands for an activation quantizer."""

    def forward(self, x):
        return x.clamp(0, 1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.relu1, self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), Clip(), nn.Conv2d(4, 4, 3, padding=1), Clip()

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Clip()
        self.layer1 = nn.Sequential(Block(), Block())
        self.fc = nn.Linear(4, 10)


def weighted(module):
    return isinstance(module, (nn.Conv2d, nn.Linear))


def test_units_are_residual_blocks_or_layers_with_the_activations_that_follow_them():
    units = precision_units(TinyResNet(), weighted, lambda m: isinstance(m, Clip))
    assert [u.name for u in units] == ["conv1", "layer1.0", "layer1.1", "fc"]
    assert [len(u.weight_modules) for u in units] == [1, 2, 2, 1]
    assert [len(u.activation_modules) for u in units] == [1, 2, 2, 0]  # the stem's ReLU follows conv1
    lenet = LeNet()
    units = precision_units(lenet, weighted, lambda m: isinstance(m, nn.ReLU))
    assert [u.name for u in units] == ["conv1", "conv2", "fc1", "fc2"]
    assert [u.activation_modules for u in units] == [[lenet.relu1], [lenet.relu2], [lenet.relu3], []]


def test_draws_are_independent_and_come_at_the_asked_frequency():
    torch.manual_seed(0)
    draws = torch.tensor([independent_draws(8, 0.3) for _ in range(4000)], dtype=torch.float)
    assert abs(draws.mean().item() - 0.3) < 0.01
    assert (draws.mean(0) - 0.3).abs().max() < 0.03  # every quantizer on its own
    correlation = torch.corrcoef(draws.T)[0, 1:]
    assert correlation.abs().max() < 0.06
    assert independent_draws(5, 0.0) == [False] * 5 and independent_draws(5, 1.0) == [True] * 5
    with pytest.raises(ValueError, match="probability lies in"):
        independent_draws(3, 1.5)


def test_the_quantization_probability_rises_to_one_before_the_end():
    assert rising_probability(0, 0.5, 0.8) == 0.5
    assert rising_probability(0.4, 0.5, 0.8) == pytest.approx(0.75)
    assert rising_probability(0.8, 0.5, 0.8) == 1.0 and rising_probability(0.95, 0.5, 0.8) == 1.0
    with pytest.raises(ValueError, match="full_at"):
        rising_probability(0, 0.5, 0)


def test_a_pass_inside_batchnorm_statistics_kept_moves_no_running_statistic():
    model = TinyResNet()
    model.train()
    x = torch.randn(8, 3, 6, 6)
    before = {k: v.clone() for k, v in model.bn1.state_dict().items()}
    with batchnorm_statistics_kept(model):
        model.bn1(model.conv1(x))
    assert all(torch.equal(before[k], v) for k, v in model.bn1.state_dict().items())
    model.bn1(model.conv1(x))  # outside: they move
    assert not torch.equal(before["running_mean"], model.bn1.running_mean)
    student = model.bn1(model.conv1(x)).sum()
    with torch.no_grad(), batchnorm_statistics_kept(model):  # a teacher pass between forward and backward
        model.bn1(model.conv1(x))
    student.backward()  # needs the statistics tensors as the forward saw them


def test_stages_fill_the_window_and_name_bad_entries():
    stages = PrecisionStages([{"epochs": 2, "bits_weights": 8, "bits_activations": 8}, {"epochs": 1}])
    assert [stages.at(e, 3).bits_weights for e in range(3)] == [8, 8, None]
    with pytest.raises(ValueError, match="add up to 3, but the policy's window has 4"):
        stages.at(0, 4)
    with pytest.raises(ValueError, match="unknown: bits"):
        PrecisionStages([{"epochs": 2, "bits": 4}])
    with pytest.raises(ValueError, match="bits_activations is a number of bits"):
        PrecisionStages([{"epochs": 2, "bits_activations": 0}])
    with pytest.raises(ValueError, match="at least one stage"):
        PrecisionStages([])


def test_in_joint_kd_neither_loss_reaches_the_other_model():
    torch.manual_seed(0)
    low, fp = LeNet(), LeNet()
    x, target = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    low_loss, fp_loss = mutual_distillation_losses(low(x), fp(x), target, temperature=4.0)
    low_grads = torch.autograd.grad(low_loss, list(low.parameters()) + list(fp.parameters()), allow_unused=True)
    fp_grads = torch.autograd.grad(fp_loss, list(low.parameters()) + list(fp.parameters()), allow_unused=True)
    n = len(list(low.parameters()))
    assert all(g is None for g in low_grads[n:]) and all(g is not None and g.abs().sum() > 0 for g in low_grads[:n])
    assert all(g is None for g in fp_grads[:n]) and all(g is not None and g.abs().sum() > 0 for g in fp_grads[n:])
    same = torch.randn(4, 10)
    loss, _ = mutual_distillation_losses(same, same.clone(), target, label_weight=0.0)
    assert loss.abs().item() < 1e-6  # no KL between equal logits


def test_the_auxiliary_module_sums_adapted_feature_maps_and_trains_the_network_under_it():
    from distiller_dcq.engine.cotraining import AuxiliaryModule
    module = AuxiliaryModule([(4, 16, 16), (4, 16, 16), (8, 8, 8)], num_classes=10)
    assert isinstance(module.transitions[1], nn.Identity) and module.transitions[2][0].stride == (2, 2)
    features = [torch.randn(2, 4, 16, 16, requires_grad=True), torch.randn(2, 4, 16, 16, requires_grad=True),
                torch.randn(2, 8, 8, 8, requires_grad=True)]
    logits = module(features)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    with pytest.raises(ValueError, match="integer stride"):
        AuxiliaryModule([(4, 16, 16), (4, 6, 6)], num_classes=10)
