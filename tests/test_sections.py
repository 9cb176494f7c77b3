import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from distiller_dcq.engine import BinaryWeights, SectionWiring, balanced_boundaries, quantize_weights_
from distiller_dcq.engine.sections import MIXED_TEACHER_SHARE, _without_dataparallel
from conftest import LeNet

X = torch.zeros(2, 1, 28, 28)


def make_pair():
    torch.manual_seed(0)
    teacher = LeNet()
    student = copy.deepcopy(teacher)
    quantize_weights_(student, BinaryWeights(scale="layer"))
    return student, teacher


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("boundaries, message", [
    (["pool1", "pool9"], r"unknown boundary module\(s\) \['pool9'\] in LeNet; valid names: conv1, relu1, pool1, "
                         r"conv2, relu2, pool2, fc1, relu3, fc2"),
    (["relu3", "pool1"], r"forward order: got \['relu3', 'pool1'\], the forward pass reaches them as "
                         r"\['pool1', 'relu3'\]"),
    (["pool1", "pool1"], r"\['pool1'\] listed more than once"),
    ([], r"the section list is empty"),
    (["fc2"], r"\['fc2'\] produce the model output.*remove them"),
    ("pool1", r"must be a list of module names.*write \[pool1\]"),
])
def test_bad_boundaries_are_named_with_the_fix(boundaries, message):
    student, teacher = make_pair()
    with pytest.raises(ValueError, match=message):
        SectionWiring(student, teacher, boundaries, example_input=X)


def test_a_module_that_runs_twice_cannot_be_a_boundary():
    class SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.relu, self.b = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.relu(self.a(self.relu(x))))

    model = SharedReLU()
    with pytest.raises(ValueError, match=r"\['relu'\] run more than once per forward pass"):
        SectionWiring(model, copy.deepcopy(model), ["relu"], example_input=torch.zeros(1, 4))


def test_teacher_of_another_architecture_is_refused():
    student, _ = make_pair()
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ValueError, match=r"teacher has no module\(s\) \['pool1'\].*share the architecture"):
        SectionWiring(student, other, ["pool1"], example_input=X)


def test_boundaries_and_num_sections_are_exclusive_and_temperature_positive():
    student, teacher = make_pair()
    with pytest.raises(ValueError, match="either boundaries .* or num_sections"):
        SectionWiring(student, teacher, ["pool1"], num_sections=2, example_input=X)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SectionWiring(student, teacher, ["pool1"], example_input=X, temperature=0)


# --- automatic cuts --------------------------------------------------------------------------------

class Pair(nn.Module):
    def forward(self, x):
        return x, x.relu()


class ConvOfSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, pair):
        return self.conv(pair[0] + pair[1])


def test_num_sections_skips_cuts_the_model_cannot_take_and_one_section_needs_none():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("conv1", nn.Conv2d(1, 2, 3)), ("pair", Pair()), ("sum", ConvOfSum()),
                                       ("relu", nn.ReLU()), ("flat", nn.Flatten()), ("fc", nn.Linear(2 * 24 * 24, 10))]))
    assert balanced_boundaries(model, 1, X) == []
    assert balanced_boundaries(model, 2, X) == ["flat"]  # the balanced valid cut; "pair" (a tuple) is none


def test_num_sections_balances_macs_and_cuts_after_activations():
    # LeNet MACs: conv1 288k, conv2 1.6M, fc1 400k, fc2 5k. Two sections: cutting after pool2 gives
    # 1.89M | 405k, the smallest possible maximum; cuts only fall before a conv/linear layer.
    model = LeNet()
    assert balanced_boundaries(model, 1, X) == []
    assert balanced_boundaries(model, 2, X) == ["pool2"]
    assert balanced_boundaries(model, 4, X) == ["pool1", "pool2", "relu3"]
    with pytest.raises(ValueError, match=r"into 5 sections: it has 3 valid cuts \(pool1, pool2, relu3\), so at most 4"):
        balanced_boundaries(model, 5, X)


# --- the wiring ------------------------------------------------------------------------------------

def test_each_section_gets_the_teachers_activation_as_input_and_one_teacher_forward_per_batch():
    student, teacher = make_pair()
    wiring = SectionWiring(student, teacher, ["pool1", "relu3"], example_input=X).split()
    seen, teacher_calls = {}, []
    student.conv2.register_forward_pre_hook(lambda m, i: seen.__setitem__("conv2_in", i[0]))
    student.fc2.register_forward_pre_hook(lambda m, i: seen.__setitem__("fc2_in", i[0]))
    teacher.register_forward_hook(lambda *a: teacher_calls.append(1))
    x = torch.randn(8, 1, 28, 28)
    student.train()(x)
    with torch.no_grad():
        t_pool1 = teacher.pool1(teacher.relu1(teacher.conv1(x)))
        t_relu3 = teacher.relu3(teacher.fc1(teacher.pool2(teacher.relu2(teacher.conv2(t_pool1))).flatten(1)))
    assert torch.equal(seen["conv2_in"], t_pool1) and torch.equal(seen["fc2_in"], t_relu3)
    assert len(teacher_calls) == 1
    assert list(wiring.section_losses()) == ["pool1", "relu3", "output"]


def test_gradients_never_cross_a_section_border():
    student, teacher = make_pair()
    wiring = SectionWiring(student, teacher, ["pool1", "relu3"], example_input=X).split()
    student.train()(torch.randn(8, 1, 28, 28))
    middle = wiring.section_losses()["relu3"]  # section 2: conv2, fc1
    middle.backward()
    grads = {n: getattr(student, n).parametrizations.weight.original.grad for n in ("conv1", "conv2", "fc1", "fc2")}
    assert grads["conv1"] is None and grads["fc2"] is None
    assert grads["conv2"].abs().sum() > 0 and grads["fc1"].abs().sum() > 0


def test_eval_forwards_and_merge_give_the_stitched_network():
    student, teacher = make_pair()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        plain = student.eval()(x)
    wiring = SectionWiring(student, teacher, ["pool1", "pool2"], example_input=X).split()
    with torch.no_grad():
        assert torch.equal(student.eval()(x), plain)  # validation sees the stitched network
        wired = student.train()(x)
    assert not torch.equal(wired, plain)
    wiring.merge()
    assert not student._forward_hooks and not student._forward_pre_hooks and not student.pool1._forward_hooks
    with torch.no_grad():
        assert torch.equal(student.train()(x), plain)


def test_section_losses_before_any_forward_is_a_clear_error():
    student, teacher = make_pair()
    wiring = SectionWiring(student, teacher, ["pool1"], example_input=X).split()
    with pytest.raises(RuntimeError, match="no wired forward"):
        wiring.section_losses()


def test_nan_in_activations_stops_training_with_a_message():
    student, teacher = make_pair()
    wiring = SectionWiring(student, teacher, ["pool1"], example_input=X, loss="mse").split()
    student.train()(torch.full((2, 1, 28, 28), float("nan")))
    with pytest.raises(FloatingPointError, match="section 'pool1' mse loss is nan"):
        wiring.section_losses()


# --- it learns -------------------------------------------------------------------------------------

def test_parallel_dcq_on_real_mnist_fits_every_section_and_the_stitched_net_classifies(mnist_test_set,
                                                                                        lenet_teacher):
    images, labels = mnist_test_set
    train_x, test_x, test_y = images[:2048], images[8000:], labels[8000:]
    torch.manual_seed(0)
    student = copy.deepcopy(lenet_teacher)
    quantize_weights_(student, BinaryWeights(scale="layer"))
    wiring = SectionWiring(student, lenet_teacher, ["pool1", "pool2", "relu3"], example_input=X).split()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    history = []
    for epoch in range(2):
        for batch in train_x.split(64):
            student.train()(batch)
            losses = wiring.section_losses()
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append({k: v.item() for k, v in losses.items()})
    wiring.merge()
    for name in ("pool1", "pool2", "relu3"):
        assert sum(h[name] for h in history[-8:]) < sum(h[name] for h in history[:8])
    with torch.no_grad():
        accuracy = (student.eval()(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.85


# --- sequential mode: student inputs, one section at a time -----------------------------------------

def test_student_inputs_hand_each_section_the_students_own_detached_activation():
    student, teacher = make_pair()
    SectionWiring(student, teacher, ["pool1"], example_input=X, section_inputs="student").split()
    seen = {}
    student.pool1.register_forward_hook(lambda m, i, o: seen.__setitem__("pool1_out", o))
    student.conv2.register_forward_pre_hook(lambda m, i: seen.__setitem__("conv2_in", i[0]))
    student.train()(torch.randn(4, 1, 28, 28))
    assert torch.equal(seen["conv2_in"], seen["pool1_out"]) and not seen["conv2_in"].requires_grad


def test_mixed_inputs_draw_each_element_from_teacher_or_student_anew_at_every_forward():
    student, teacher = make_pair()
    seen, draws = {}, []  # hooks registered before the wiring's see the activations before it hands them on
    student.pool1.register_forward_hook(lambda m, i, o: seen.__setitem__("student", o))
    teacher.pool1.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", o))
    student.conv2.register_forward_pre_hook(lambda m, i: seen.__setitem__("conv2_in", i[0]))
    SectionWiring(student, teacher, ["pool1"], example_input=X, section_inputs="mixed").split()
    x = torch.randn(16, 1, 28, 28)
    for _ in range(2):
        student.train()(x)
        from_teacher = seen["conv2_in"] == seen["teacher"]
        from_student = seen["conv2_in"] == seen["student"]
        differ = seen["teacher"] != seen["student"]
        assert bool((from_teacher | from_student).all()) and not seen["conv2_in"].requires_grad
        share = from_teacher[differ].float().mean().item()
        assert abs(share - MIXED_TEACHER_SHARE) < 0.02, share  # ~46,000 elements differ
        draws.append(from_teacher[differ])
    assert not torch.equal(draws[0], draws[1])


def test_target_clip_clamps_the_teachers_section_activations_as_targets_and_as_inputs():
    student, teacher = make_pair()
    seen = {}
    teacher.relu3.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", o))
    student.relu3.register_forward_hook(lambda m, i, o: seen.__setitem__("student", o))
    student.fc2.register_forward_pre_hook(lambda m, i: seen.__setitem__("fc2_in", i[0]))
    wiring = SectionWiring(student, teacher, ["pool1", "relu3"], example_input=X, loss="mse", target_clip=0.5).split()
    student.train()(torch.randn(8, 1, 28, 28) * 4)
    clipped = seen["teacher"].clamp(0, 0.5)
    assert seen["teacher"].max() > 0.5  # the teacher's own forward stays FP
    assert torch.equal(seen["fc2_in"], clipped)
    expected = torch.nn.functional.mse_loss(seen["student"], clipped)
    assert torch.allclose(wiring.section_losses()["relu3"], expected)
    with pytest.raises(ValueError, match=r"target_clip must be > 0"):
        SectionWiring(student, teacher, ["pool1"], example_input=X, target_clip=0)


def test_frozen_sections_get_no_update_at_all_momentum_and_weight_decay_included():
    student, teacher = make_pair()
    wiring = SectionWiring(student, teacher, ["pool1", "relu3"], example_input=X, section_inputs="student").split()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)

    def step():
        student.train()(torch.randn(8, 1, 28, 28))
        losses = wiring.section_losses()
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        return losses

    step()  # every section trained once: every parameter now has a momentum buffer
    wiring.train_sections(["relu3"])
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not n.startswith(("conv2", "fc1"))}
    trained = {n: p.detach().clone() for n, p in student.named_parameters() if n.startswith(("conv2", "fc1"))}
    assert list(step()) == ["relu3"]
    step()
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trained[n]), n
    wiring.merge()
    optimizer.zero_grad()
    student(torch.randn(8, 1, 28, 28)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)


def test_unknown_section_or_section_inputs_is_named():
    student, teacher = make_pair()
    wiring = SectionWiring(student, teacher, ["pool1"], example_input=X)
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['pool2'\]; the sections are \['pool1', 'output'\]"):
        wiring.train_sections(["pool2"])
    with pytest.raises(ValueError, match=r"unknown section_inputs 'prefix'; choose one of: teacher, student"):
        SectionWiring(student, teacher, ["pool1"], example_input=X, section_inputs="prefix")


def test_two_wirings_cannot_be_split_on_one_student_at_once():
    student, teacher = make_pair()
    first = SectionWiring(student, teacher, ["pool1"], example_input=X).split()
    second = SectionWiring(student, teacher, ["pool2"], example_input=X)
    with pytest.raises(RuntimeError, match="already split on this model: two DCQ stages cannot overlap"):
        second.split()
    first.merge()
    second.split().merge()


def test_a_cut_inside_a_residual_block_is_refused_and_the_block_end_accepted():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.conv2(self.relu(self.conv1(x))))

    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block1, self.block2 = nn.Conv2d(1, 3, 3, padding=1), Block(), Block()
            self.head = nn.Linear(3 * 8 * 8, 2)

        def forward(self, x):
            return self.head(self.block2(self.block1(torch.relu(self.stem(x)))).flatten(1))

    model, x = TinyResNet(), torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"cannot cut at 'block1.relu': the section ending at 'block2' also uses "
                                         r"activations from before that cut.*cut at the end of the block instead"):
        SectionWiring(model, copy.deepcopy(model), ["block1.relu", "block2"], example_input=x)
    assert SectionWiring(model, copy.deepcopy(model), ["block1", "block2"], example_input=x).boundaries == \
        ["block1", "block2"]


def test_an_in_place_layer_after_a_cut_leaves_the_loss_operands_intact():
    class InPlaceAfterCut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.relu, self.b = nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.relu(self.a(x)))

    for inputs in ("teacher", "student"):
        torch.manual_seed(0)
        student, teacher, x = InPlaceAfterCut(), InPlaceAfterCut(), torch.randn(16, 4)
        with torch.no_grad():
            expected = torch.nn.functional.mse_loss(student.a(x), teacher.a(x))  # pre-ReLU, negatives included
        wiring = SectionWiring(student, teacher, ["a"], example_input=torch.zeros(1, 4), loss="mse",
                               section_inputs=inputs).split()
        student.train()(x)
        assert torch.allclose(wiring.section_losses()["a"], expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, DataParallel moves the module onto it "
                                                      "(tests/test_engine_on_device.py covers that case)")
def test_a_dataparallel_student_on_cpu_takes_names_with_or_without_module_and_gives_the_same_losses():
    x = torch.randn(8, 1, 28, 28)
    student, teacher = make_pair()
    plain = SectionWiring(student, teacher, ["pool1", "relu3"], example_input=X).split()
    student.train()(x)
    expected = {k: v.item() for k, v in plain.section_losses().items()}
    plain.merge()
    wrapped = nn.DataParallel(student)  # no GPU here: DataParallel runs the module itself
    for names in (["module.pool1", "module.relu3"], ["pool1", "relu3"]):
        wiring = SectionWiring(wrapped, nn.DataParallel(teacher), names, example_input=X).split()
        assert wiring.boundaries == ["pool1", "relu3"]
        wrapped.train()(x)
        assert {k: v.item() for k, v in wiring.section_losses().items()} == expected
        wiring.merge()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, DataParallel moves the module onto it")
def test_a_student_whose_features_alone_are_dataparallel_takes_the_plain_names():
    """compress_classifier wraps only ``features`` of VGG and AlexNet: ``features.module.3``."""
    def vgg_like(quantized=True):
        torch.manual_seed(0)
        model = nn.Sequential(OrderedDict([("features", conv_bn_net()[:6]), ("flat", nn.Flatten()),
                                           ("classifier", nn.Linear(4 * 24 * 24, 10))]))
        if quantized:
            quantize_weights_(model, BinaryWeights(scale="layer"))
        return model

    x = torch.randn(8, 1, 28, 28)
    plain_student, wrapped_student = vgg_like(), vgg_like()
    wrapped_student.features = nn.DataParallel(wrapped_student.features)
    losses = []
    for student in (plain_student, wrapped_student):
        wiring = SectionWiring(student, vgg_like(quantized=False), ["features.relu1", "features"],
                               example_input=X).split()
        student.train()(x)
        losses.append({k: v.item() for k, v in wiring.section_losses().items()})
        owners = {name: section for section, params in wiring._sections_by_owner(
            _without_dataparallel(student, student.named_parameters())).items() for name, _ in params}
        assert owners["features.conv2.parametrizations.weight.original"] == "features"
        assert owners["classifier.bias"] == "output" and None not in owners.values()
        wiring.merge()
    assert losses[0] == losses[1]


def test_a_module_the_forward_pass_never_calls_cannot_be_a_boundary():
    model = LeNet()
    model.unused = nn.ReLU()
    with pytest.raises(ValueError, match=r"\['unused'\] never run in LeNet's forward pass"):
        SectionWiring(model, copy.deepcopy(model), ["unused"], example_input=X)


# --- what sequential mode freezes ------------------------------------------------------------------

class LeNetWithOutputScale(LeNet):
    """LeNet with a parameter registered on the model itself: it belongs to no section."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_frozen_parameters_are_found_by_owner_and_stale_gradients_do_not_move_them():
    torch.manual_seed(0)
    teacher = LeNetWithOutputScale()
    student = copy.deepcopy(teacher)
    quantize_weights_(student, BinaryWeights(scale="layer"))  # FP weights: <layer>.parametrizations.weight.original
    wiring = SectionWiring(student, teacher, ["pool1", "relu3"], example_input=X, section_inputs="student").split()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)

    def step():
        student.train()(torch.randn(8, 1, 28, 28))
        optimizer.zero_grad(set_to_none=False)  # keeps every gradient tensor, zeroed
        sum(wiring.section_losses().values()).backward()
        optimizer.step()

    step()  # all sections: every parameter has a gradient tensor and a momentum buffer
    with pytest.warns(UserWarning, match=r"parameters \['scale'\] belong to no section"):
        wiring.train_sections(["relu3"])
    owners = {name: section for section, params in wiring._sections_by_owner(student.named_parameters()).items()
              for name, _ in params}
    assert owners["conv1.parametrizations.weight.original"] == "pool1" and owners["fc2.bias"] == "output"
    assert owners["fc1.parametrizations.weight.original"] == "relu3" and owners["scale"] is None
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    step()
    step()
    for name, p in student.named_parameters():
        assert torch.equal(p, before[name]) == (owners[name] != "relu3"), name


def conv_bn_net():
    """Two conv + BatchNorm + ReLU blocks and a linear head, for MNIST-sized inputs."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 4, 3)), ("bn1", nn.BatchNorm2d(4)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 4, 3)), ("bn2", nn.BatchNorm2d(4)), ("relu2", nn.ReLU()),
        ("flat", nn.Flatten()), ("fc", nn.Linear(4 * 24 * 24, 10))]))


def test_frozen_sections_keep_their_batchnorm_statistics():
    teacher = conv_bn_net()
    student = copy.deepcopy(teacher)
    wiring = SectionWiring(student, teacher, ["relu1"], example_input=X, section_inputs="student").split()
    wiring.train_sections(["output"])
    bn1, bn2 = ({k: v.clone() for k, v in bn.state_dict().items()} for bn in (student.bn1, student.bn2))
    student.train()(torch.randn(8, 1, 28, 28) + 3)
    assert all(torch.equal(v, student.bn1.state_dict()[k]) for k, v in bn1.items())
    assert not torch.equal(bn2["running_mean"], student.bn2.running_mean)
    wiring.merge()
    student.train()(torch.randn(8, 1, 28, 28) + 3)
    assert not torch.equal(bn1["running_mean"], student.bn1.running_mean)


# --- automatic cuts --------------------------------------------------------------------------------

class TopLevelSkip(nn.Module):
    """A skip connection from relu1's output to the head: cuts at relu2 and relu3 would be crossed by it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 64, 3, padding=1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(64, 4, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        a = self.relu1(self.conv1(x))
        return self.head((self.relu3(self.conv3(self.relu2(self.conv2(a)))) + a).flatten(1))


def test_num_sections_never_cuts_across_a_skip_connection():
    model = TopLevelSkip()
    assert balanced_boundaries(model, 2, X) == ["relu1"]  # relu2 balances the MACs best, but a skip crosses it
    with pytest.raises(ValueError, match=r"into 3 sections: it has 1 valid cuts \(relu1\), so at most 2 sections"):
        SectionWiring(model, copy.deepcopy(model), num_sections=3, example_input=X)


def test_merge_can_re_estimate_batchnorm_statistics_on_the_stitched_network():
    teacher = conv_bn_net()
    student = copy.deepcopy(teacher)
    quantize_weights_(student, BinaryWeights(scale="layer"))
    wiring = SectionWiring(student, teacher, ["relu1"], example_input=X, keep_inputs=2, loss="mse").split()
    batches = [torch.randn(8, 1, 28, 28) + i for i in range(3)]
    for x in batches:
        student.train()(x)  # parallel mode: bn2 sees relu1 of the teacher, not of the student
    student.eval()
    wiring.merge(recalibrate=True)
    assert not student.training and student.bn2.momentum == 0.1
    with torch.no_grad():  # what bn2 sees in the stitched network, on the last two batches
        seen = [student.conv2(student.relu1(student.bn1.train()(student.conv1(x)))) for x in batches[1:]]
        student.bn1.eval()
    expected_mean = torch.stack([s.mean(dim=(0, 2, 3)) for s in seen]).mean(0)
    expected_var = torch.stack([s.var(dim=(0, 2, 3), unbiased=True) for s in seen]).mean(0)
    assert torch.allclose(student.bn2.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(student.bn2.running_var, expected_var, atol=1e-5)
    assert len(wiring.recent_inputs) == 0
