import pytest
import torch
import torch.nn.functional as F

from distiller_dcq.engine.losses import LOSSES, get_loss, poisson_loss, register_loss

ALL = sorted(LOSSES)


def test_registry_holds_the_five_losses():
    assert set(LOSSES) == {"poisson", "kl", "mse", "l1", "cosine"}


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown section loss 'poison'.*cosine, kl, l1, mse, poisson"):
        get_loss("poison")


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_loss("mse")(lambda *a, **k: 0)


def test_poisson_on_feature_maps_is_the_papers_formula():
    y_hat, y = torch.rand(4, 3, 5, 5) + 0.1, torch.rand(4, 3, 5, 5)
    expected = (y_hat - y * torch.log(y_hat)).mean()
    assert torch.allclose(poisson_loss(y_hat, y, logits=False), expected, atol=1e-6)


def test_poisson_is_finite_where_the_student_relu_outputs_zero():
    y_hat = torch.zeros(2, 8, requires_grad=True)
    loss = poisson_loss(y_hat, torch.rand(2, 8), logits=False)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(y_hat.grad).all()


def test_poisson_refuses_negative_feature_maps_with_a_fix():
    with pytest.raises(ValueError, match="non-negative.*cut the network after a ReLU"):
        poisson_loss(torch.rand(2, 4), torch.randn(2, 4) - 1, logits=False)


@pytest.mark.parametrize("name", ALL)
def test_every_loss_is_finite_on_extreme_logits(name):
    student = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 2e4, 5.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    loss = get_loss(name)(student, teacher, logits=True, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_on_logits_every_loss_is_stationary_where_student_equals_teacher(name):
    teacher = torch.randn(6, 10)
    student = teacher.clone().requires_grad_(True)
    get_loss(name)(student, teacher, logits=True, temperature=3.0).backward()
    assert student.grad.abs().max() < 1e-5
    moved = get_loss(name)(teacher + torch.randn(6, 10), teacher, logits=True, temperature=3.0)
    assert moved > get_loss(name)(teacher, teacher, logits=True, temperature=3.0)


def test_poisson_on_logits_compares_softened_probabilities():
    s, t, temp = torch.randn(5, 10), torch.randn(5, 10), 4.0
    p_s, p_t = F.softmax(s / temp, 1), F.softmax(t / temp, 1)
    assert torch.allclose(poisson_loss(s, t, logits=True, temperature=temp), (p_s - p_t * p_s.log()).mean(),
                          atol=1e-6)


def test_kl_on_logits_is_hinton_kd():
    s, t, temp = torch.randn(5, 10), torch.randn(5, 10), 2.0
    expected = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean") * temp ** 2
    assert torch.allclose(get_loss("kl")(s, t, logits=True, temperature=temp), expected, atol=1e-6)


def test_kl_on_feature_maps_compares_per_sample_distributions():
    t = torch.rand(3, 4, 2, 2)
    assert get_loss("kl")(t + 5.0, t, logits=False) < 1e-6  # a constant shift leaves a softmax unchanged
    assert get_loss("kl")(t * 3, t, logits=False) > 1e-3


def test_cosine_ignores_scale_on_feature_maps():
    t = torch.rand(3, 8)
    assert get_loss("cosine")(2 * t, t, logits=False) < 1e-6
    assert get_loss("cosine")(-t, t, logits=False) == pytest.approx(2.0)
