"""AdaRound-style level choices for binary and ternary weights (engine, plain PyTorch)."""
import pytest
import torch

from distiller_dcq.engine import BinaryWeights, TernaryWeights
from distiller_dcq.engine.rounding import LevelChoice, annealed_beta, rectified_sigmoid


def choice_for(weights, quantizer):
    q = quantizer(weights).detach()
    return LevelChoice(weights, q, q.abs().max(), isinstance(quantizer, TernaryWeights)), q


def test_binary_choices_start_at_the_direct_levels_and_offer_the_opposite_one_below_alpha():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    choice, q = choice_for(w, BinaryWeights())
    alpha = q.abs().max()
    assert torch.equal(choice.hard(), q)
    assert torch.equal(choice.has_choice, w.abs() < alpha)  # beyond alpha no other level lies towards w
    inside = choice.has_choice
    assert torch.equal(choice.lower[inside], -torch.ones_like(w[inside]))
    assert torch.equal(choice.upper[inside], torch.ones_like(w[inside]))
    # the soft weights start where the FP weights lie, on their direct level's side of the middle
    soft = choice.soft().detach()
    assert torch.all(torch.sign(soft[inside]) == torch.sign(w[inside]))
    near = inside & (w.abs() < 0.9 * alpha) & (w.abs() > 0.1 * alpha)
    assert torch.allclose(soft[near], w[near], atol=1e-4)


def test_ternary_choices_are_the_adjacent_level_towards_the_fp_weight():
    torch.manual_seed(1)
    w = torch.randn(2000)
    choice, q = choice_for(w, TernaryWeights())
    alpha = q.abs().max()
    level = q / alpha
    assert torch.equal(choice.hard(), q)
    zero = level == 0  # a zeroed weight may become sign(w)
    assert torch.equal(choice.lower[zero] + choice.upper[zero], torch.sign(w[zero]))
    kept = (level != 0) & (w.abs() < alpha)  # a kept weight below alpha may become 0
    assert torch.all(choice.has_choice[kept]) and torch.all((choice.lower[kept] == 0) | (choice.upper[kept] == 0))
    assert not torch.any(choice.has_choice[w.abs() >= alpha])


def test_only_weights_with_a_choice_get_a_gradient_and_the_regularizer_vanishes_at_made_choices():
    torch.manual_seed(2)
    w = torch.randn(100) * 0.1
    w[0] = 5.0  # far beyond alpha: no choice
    choice, _ = choice_for(w, BinaryWeights())
    choice.soft().sum().backward()
    assert not choice.has_choice[0] and choice.has_choice.sum() > 10
    assert torch.equal(choice.logits.grad != 0, choice.has_choice)
    assert choice.regularizer(2.0) > 0
    with torch.no_grad():
        choice.logits.copy_(torch.where(choice.logits >= 0, 10.0, -10.0))  # h exactly 0 or 1
    assert choice.regularizer(2.0) == 0 and torch.equal(choice.soft(), choice.hard())
    assert rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0])).tolist() == [0.0, 0.5, 1.0]


def test_beta_waits_for_the_warmup_then_falls_linearly():
    assert annealed_beta(0.1) is None
    assert annealed_beta(0.2) == 20.0 and annealed_beta(0.6) == pytest.approx(11.0) and annealed_beta(1.0) == 2.0


def test_learned_choices_reconstruct_a_layer_better_than_its_direct_quantization():
    torch.manual_seed(3)
    teacher = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(512, 64)
    target = teacher(x).detach()
    choice, direct = choice_for(teacher.weight.detach(), BinaryWeights())
    optimizer = torch.optim.Adam([choice.logits], lr=0.05)
    steps = 400

    def error(weights):
        return torch.nn.functional.mse_loss(x @ weights.t(), target)
    for step in range(steps):
        beta = annealed_beta(step / steps)
        loss = error(choice.soft()) + (choice.regularizer(beta) if beta else 0)  # weight 1, the policy's default
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        h = rectified_sigmoid(choice.logits)[choice.has_choice]
        assert ((h == 0) | (h == 1)).float().mean() > 0.95  # the regularizer made (nearly) every choice
        assert error(choice.hard()) < 0.95 * error(direct)
        assert 0 < (choice.hard() != direct).sum() < direct.numel() / 4  # a few weights left their level
