"""The engine on a CUDA device gives the CPU's results: weight quantizers, section losses, and the section
wiring in parallel and sequential mode (split, training steps, merge), plain and under DataParallel, DCQ's
relatives' parts, AdaRound level choices, BatchNorm re-estimation and image synthesis.

Each test runs once per device: ``cpu`` (the same code against a second CPU run, so CI exercises these
tests) and ``cuda``, skipped, saying why, where there is no CUDA device (CI never has one).
``DCQ_REQUIRE_CUDA=1`` (set by benchmarks/cuda_check.sh) turns that skip into a failure.

Comparisons are exact where the arithmetic allows and within float32 tolerance elsewhere. Weights are
snapped to a grid of multiples of 2^-8 (never 0), so sums of them are exact in any order and a few small
training steps cannot move a weight across 0: binary and ternary levels are then the same on both devices
and only the continuous part (scales, activations, gradients) can differ.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn

from distiller_dcq.engine import (LOSSES, BinaryWeights, DorefaWeights, SectionWiring, TernaryWeights, get_loss,
                                  quantize_weights_)
from conftest import LeNet

REQUIRE_CUDA = os.environ.get("DCQ_REQUIRE_CUDA") == "1"
BOUNDARIES = ["pool1", "pool2", "relu3"]
GRID = 2.0 ** -8
RTOL, ATOL = 1e-4, 1e-5  # float32, different kernels and reduction orders


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        if REQUIRE_CUDA:
            pytest.fail("DCQ_REQUIRE_CUDA=1, but torch.cuda.is_available() is False", pytrace=False)
        pytest.skip("no CUDA device here (torch.cuda.is_available() is False); benchmarks/cuda_check.sh runs "
                    "these on a GPU machine")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def full_float32():
    """No TF32 on Ampere and later: cuDNN convolutions use it by default, with errors near 1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def close(actual, expected, rtol=RTOL, atol=ATOL, what=None):
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), rtol=rtol, atol=atol,
                               msg=None if what is None else lambda m: f"{what}: {m}")


def on_grid(w):
    """``w`` rounded to multiples of GRID, zeros moved to +GRID."""
    q = torch.round(w / GRID) * GRID
    return torch.where(q == 0, torch.full_like(q, GRID), q)


def snapped_lenet():
    torch.manual_seed(0)
    model = LeNet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(on_grid(p))
    return model


def batches(n=3, size=16):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, 1, 28, 28, generator=generator) for _ in range(n)]


# --- weight quantizers -----------------------------------------------------------------------------

@pytest.mark.parametrize("quantizer", [BinaryWeights("layer"), BinaryWeights("none"), TernaryWeights("layer"),
                                       TernaryWeights("none"), DorefaWeights(2), DorefaWeights(3)], ids=repr)
def test_weight_quantizers_give_the_cpus_levels_and_gradients(device, quantizer):
    generator = torch.Generator().manual_seed(0)
    w = on_grid(0.1 * torch.randn(32, 16, 3, 3, generator=generator))
    upstream = torch.randn(w.shape, generator=generator)
    results = []
    for dev in (torch.device("cpu"), device):
        w_dev = w.clone().to(dev).requires_grad_(True)
        q = quantizer.to(dev)(w_dev)
        (q * upstream.to(dev)).sum().backward()
        assert q.device.type == dev.type
        results.append((q, w_dev.grad))
    (q_cpu, g_cpu), (q_dev, g_dev) = results
    if not isinstance(quantizer, DorefaWeights):  # sign and threshold decisions on grid values: exact
        assert torch.equal(torch.sign(q_dev).cpu(), torch.sign(q_cpu))
    close(q_dev, q_cpu)
    close(g_dev, g_cpu)


# --- section losses --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("logits", [False, True], ids=["feature_maps", "logits"])
def test_section_losses_and_their_gradients_match_the_cpu(device, name, logits):
    generator = torch.Generator().manual_seed(0)
    shape = (8, 10) if logits else (8, 6, 5, 5)
    # feature maps after a ReLU are non-negative (the Poisson loss requires it); logits are not
    student = 3 * torch.randn(shape, generator=generator) if logits else torch.rand(shape, generator=generator)
    teacher = 3 * torch.randn(shape, generator=generator) if logits else torch.rand(shape, generator=generator)
    results = []
    for dev in (torch.device("cpu"), device):
        s = student.clone().to(dev).requires_grad_(True)
        loss = get_loss(name)(s, teacher.to(dev), logits=logits, temperature=2.0)
        loss.backward()
        assert loss.device.type == dev.type and torch.isfinite(loss)
        results.append((loss, s.grad))
    (loss_cpu, grad_cpu), (loss_dev, grad_dev) = results
    close(loss_dev, loss_cpu)
    close(grad_dev, grad_cpu)


# --- section wiring --------------------------------------------------------------------------------

def dcq_steps(device, *, section_inputs="teacher", train=None, wrap=False):
    """Split a binary LeNet against its FP copy (left on the CPU: split() must move it), take SGD steps on
    the section losses, merge. Returns the per-step losses, the FP weights and the stitched output."""
    teacher = snapped_lenet()
    student = copy.deepcopy(teacher)
    quantize_weights_(student, BinaryWeights(scale="layer"))
    student.to(device)
    model = nn.DataParallel(student) if wrap else student
    example = torch.zeros(1, 1, 28, 28, device=device)
    wiring = SectionWiring(model, teacher, BOUNDARIES, example_input=example, loss="mse",
                           section_inputs=section_inputs).split()
    assert next(teacher.parameters()).device.type == device.type
    if train is not None:
        wiring.train_sections(train)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    history = []
    for x in batches():
        model.train()(x.to(device))
        losses = wiring.section_losses()
        assert all(v.device.type == device.type for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(torch.stack(list(losses.values())).detach().cpu())
    wiring.merge()
    with torch.no_grad():
        stitched = student.eval()(batches(1, 64)[0].to(device)).cpu()
    weights = {n: p.detach().cpu() for n, p in student.named_parameters()}
    return history, weights, stitched


def assert_same_training(run_dev, run_cpu):
    (losses_dev, weights_dev, out_dev), (losses_cpu, weights_cpu, out_cpu) = run_dev, run_cpu
    for step, (l_dev, l_cpu) in enumerate(zip(losses_dev, losses_cpu)):
        close(l_dev, l_cpu, rtol=1e-4, atol=1e-6, what=f"section losses at step {step}")
    assert weights_dev.keys() == weights_cpu.keys()
    for name in weights_cpu:
        close(weights_dev[name], weights_cpu[name], rtol=1e-4, atol=1e-6, what=name)
        if name.endswith("original"):  # no weight crossed 0: the binary levels are the same
            assert torch.equal(weights_dev[name] >= 0, weights_cpu[name] >= 0), name
    close(out_dev, out_cpu, rtol=1e-4, atol=1e-4, what="stitched network output")


def test_parallel_mode_trains_and_stitches_as_on_the_cpu(device):
    assert_same_training(dcq_steps(device), dcq_steps(torch.device("cpu")))


def test_sequential_mode_trains_one_section_and_freezes_the_others_as_on_the_cpu(device):
    run_dev = dcq_steps(device, section_inputs="student", train=["pool2"])
    assert_same_training(run_dev, dcq_steps(torch.device("cpu"), section_inputs="student", train=["pool2"]))
    initial = {n: p.detach() for n, p in snapped_lenet().named_parameters()}
    for name, value in run_dev[1].items():  # only conv2 (section 'pool2') moved; nothing else, not even by momentum
        layer = name.split(".")[0]
        start = initial[f"{layer}.weight" if name.endswith("original") else name]
        assert torch.equal(value, start) != (layer == "conv2"), name


def test_a_dataparallel_wrapped_student_gives_the_unwrapped_cpu_results(device):
    # compress_classifier wraps the model in DataParallel on a GPU; with one device it scatters nothing
    if device.type == "cpu" and torch.cuda.is_available():
        pytest.skip("with a GPU, DataParallel moves a CPU module onto it: the cuda variant covers this")
    assert_same_training(dcq_steps(device, wrap=True), dcq_steps(torch.device("cpu")))


# --- DCQ's relatives -------------------------------------------------------------------------------

def test_the_relatives_engine_parts_run_on_the_device_and_match_the_cpu(device):
    from distiller_dcq.engine.cotraining import AuxiliaryModule, mutual_distillation_losses
    from distiller_dcq.engine.precision import batchnorm_statistics_kept
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(4, 8, 8, 8, generator=generator), torch.randn(4, 16, 4, 4, generator=generator)]
    low, fp, target = torch.randn(4, 10, generator=generator), torch.randn(4, 10, generator=generator), torch.arange(4)
    results = []
    for dev in (torch.device("cpu"), device):
        torch.manual_seed(0)
        module = AuxiliaryModule([(8, 8, 8), (16, 4, 4)], num_classes=10).to(dev)
        feats = [f.clone().to(dev).requires_grad_(True) for f in features]  # not f itself: on the CPU .to() is f
        with batchnorm_statistics_kept(module):
            module(feats)  # a pass that must leave the statistics as they were
        assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in module.modules()
                   if isinstance(m, nn.BatchNorm2d))
        logits = module(feats)
        losses = mutual_distillation_losses(low.to(dev), fp.to(dev), target.to(dev))
        logits.sum().backward()
        assert logits.device.type == dev.type
        results.append((logits, feats[0].grad, *losses, module.adaptors[0][1].running_mean))
    for cpu, dev in zip(*results):
        close(dev, cpu)


# --- AdaRound level choices and BatchNorm re-estimation (the few-shot schedules) ---------------------

@pytest.mark.parametrize("quantizer", [BinaryWeights("layer"), TernaryWeights("layer")], ids=repr)
def test_adaround_level_choices_train_on_the_device_as_on_the_cpu(device, quantizer):
    from distiller_dcq.engine.rounding import LevelChoice
    generator = torch.Generator().manual_seed(0)
    fp = on_grid(0.1 * torch.randn(16, 8, 3, 3, generator=generator))
    target = torch.randn(fp.shape, generator=generator)
    results = []
    for dev in (torch.device("cpu"), device):
        w = fp.to(dev)
        quantized = quantizer.to(dev)(w)
        choice = LevelChoice(w, quantized, quantized.abs().max(), isinstance(quantizer, TernaryWeights))
        optimizer = torch.optim.Adam([choice.logits], lr=0.1)
        for beta in (None, 20.0, 2.0):  # AdaRound's warm-up, then the annealed regularizer
            loss = ((choice.soft() - target.to(dev)) ** 2).mean()
            if beta is not None:
                loss = loss + choice.regularizer(beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert choice.logits.device.type == dev.type and choice.hard().device.type == dev.type
        results.append((choice.logits, choice.soft(), choice.hard(), choice.has_choice))
    (logits_cpu, soft_cpu, hard_cpu, has_cpu), (logits_dev, soft_dev, hard_dev, has_dev) = results
    assert torch.equal(has_dev.cpu(), has_cpu)  # which weights may leave their level: exact
    close(logits_dev, logits_cpu)
    close(soft_dev, soft_cpu)
    decided = logits_cpu.abs() > 1e-3  # a choice this far from 0 cannot flip on float32 differences
    assert torch.equal(hard_dev.cpu()[decided], hard_cpu[decided])


def test_batchnorm_re_estimation_on_the_device_gives_the_cpus_statistics(device):
    from distiller_dcq.engine import recalibrate_batchnorm
    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(16, 3, 8, 8, generator=generator) * 2 + 1,) for _ in range(3)]  # left on the CPU
    results = []
    for dev in (torch.device("cpu"), device):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                              nn.BatchNorm2d(4)).to(dev).eval()
        recalibrate_batchnorm(model, inputs)
        assert not model.training and all(m.momentum == 0.1 for m in model if isinstance(m, nn.BatchNorm2d))
        results.append([t for m in model if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)])
    for cpu, dev in zip(*results):
        assert dev.device.type == device.type
        close(dev, cpu)


def test_image_synthesis_runs_on_the_models_device_and_matches_the_cpus_statistics(device):
    from distiller_dcq.engine.synthesis import SynthesisConfig, balanced_classes, synthesize_batch
    from test_synthesis import RANGE, SHAPE, TOLERANCE, small_network
    config = SynthesisConfig(iterations=150, batch_size=32, jitter=0, class_weight=0.1, tv_weight=0.1)
    errors = []
    for dev in (torch.device("cpu"), device):
        model = small_network().to(dev)
        images, final = synthesize_batch(model, SHAPE, RANGE, balanced_classes(32, 4), config, seed=0)
        assert images.device.type == "cpu" and images.min() >= -1 and images.max() <= 1  # written from the CPU
        assert {p.device.type for p in model.parameters()} == {dev.type}  # the network stays where it was
        errors.append(final)
    cpu, on_device = errors
    # 150 Adam steps amplify float32 differences: the same statistics, not the same pixels
    assert all(on_device[name] < TOLERANCE and abs(on_device[name] - cpu[name]) < 0.05 for name in cpu), errors
