"""The DCQ policy and quantizer do what the schedule says, or stop with a clear error (real Distiller)."""
import textwrap

import pytest
import torch

from distiller_env import import_distiller

distiller = import_distiller()
from distiller import apputils  # noqa: E402
from distiller.models import create_model  # noqa: E402
from distiller.policy import LossComponent, PolicyLoss, ScheduledTrainingPolicy  # noqa: E402

from distiller_dcq.adapter import DCQQuantizer, SectionalKDPolicy  # noqa: E402


def lenet():
    return create_model(False, "mnist", "simplenet_mnist", parallel=False, device_ids=-1)


def scheduler_from(tmp_path, text, model=None):
    path = tmp_path / "schedule.yaml"
    path.write_text(textwrap.dedent(text))
    model = model or lenet()
    return model, distiller.file_config(model, torch.optim.SGD(model.parameters(), lr=0.1), str(path))


QUANTIZER = """
quantizers:
  q: {class: DCQQuantizer, weight_mode: binary}
extensions:
  dcq: {class: SectionalKDPolicy, boundaries: [pool1], loss: mse, label_weight: LABEL_WEIGHT}
policies:
"""
QUANTIZER_POLICY = """
  - quantizer: {instance_name: q}
    starting_epoch: 0
    ending_epoch: 4
    frequency: 1
"""
DCQ_WINDOW = """
  - extension: {instance_name: dcq}
    starting_epoch: 0
    ending_epoch: 2
    frequency: 1
"""


def test_a_quantizer_declared_but_not_scheduled_stops_the_dcq_stage(tmp_path):
    _, scheduler = scheduler_from(tmp_path, QUANTIZER.replace("LABEL_WEIGHT", "0") + DCQ_WINDOW)
    with pytest.raises(ValueError, match=r"found no quantized weights on the model: .* schedule it under policies:"):
        scheduler.on_epoch_begin(0)


def test_a_dcq_window_given_as_an_epoch_list_is_refused(tmp_path):
    text = QUANTIZER.replace("LABEL_WEIGHT", "0") + QUANTIZER_POLICY + """
  - extension: {instance_name: dcq}
    epochs: [0, 2]
"""
    _, scheduler = scheduler_from(tmp_path, text)
    with pytest.raises(ValueError, match=r"needs one contiguous window .* not an epochs: list"):
        scheduler.on_epoch_begin(0)


class AddsATerm(ScheduledTrainingPolicy):
    """A policy scheduled before DCQ that adds 3 x (sum of fc2's weights) to the loss, like a regularizer."""

    def before_backward_pass(self, model, epoch, minibatch_id, minibatches_per_epoch, loss, zeros_mask_dict,
                             optimizer=None):
        term = 3 * model.fc2.float_weight.sum()
        return PolicyLoss(loss + term, [LossComponent("extra", term)])


@pytest.mark.parametrize("label_weight", [0.0, 0.5])
def test_label_weight_weighs_the_cross_entropy_only_and_earlier_policies_terms_stay(tmp_path, label_weight):
    model, scheduler = scheduler_from(tmp_path, QUANTIZER.replace("LABEL_WEIGHT", str(label_weight))
                                      + QUANTIZER_POLICY + DCQ_WINDOW)
    dcq = next(p for p in scheduler.sched_metadata if isinstance(p, SectionalKDPolicy))
    scheduler.policies[0].insert(0, AddsATerm())  # before DCQ, as if listed first in the YAML
    scheduler.sched_metadata[scheduler.policies[0][0]] = {"starting_epoch": 0, "ending_epoch": 1, "frequency": 1}
    scheduler.on_epoch_begin(0)
    torch.manual_seed(0)
    x, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    cross_entropy = torch.nn.functional.cross_entropy(model.train()(x), labels)
    sections = dcq.wiring.section_losses()
    overall = scheduler.before_backward_pass(0, 0, 1, cross_entropy, return_loss_components=True)
    extra = 3 * model.fc2.float_weight.sum()
    expected = sum(sections.values()) + extra + label_weight * cross_entropy
    assert torch.allclose(overall.overall_loss, expected)
    assert [c.name for c in overall.loss_components] == ["extra", "DCQ pool1 mse", "DCQ output mse"]


def test_an_svhn_teacher_is_built_for_a_quantized_model(tmp_path):
    torch.manual_seed(0)
    fp = create_model(False, "svhn", "svhn_dorefa", parallel=False, device_ids=-1)
    apputils.save_checkpoint(0, "svhn_dorefa", fp, dir=str(tmp_path))
    model = create_model(False, "svhn", "svhn_dorefa", parallel=False, device_ids=-1)
    DCQQuantizer(model, torch.optim.SGD(model.parameters(), lr=0.1)).prepare_model()  # as on a resumed run
    policy = SectionalKDPolicy(model, boundaries=["act2"], teacher=str(tmp_path / "checkpoint.pth.tar"))
    teacher = policy.wiring.teacher
    assert not hasattr(teacher.fc1, "float_weight") and torch.equal(teacher.fc1.weight, fp.fc1.weight)


def test_a_quantized_checkpoint_is_refused_as_the_teacher(tmp_path):
    model = lenet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    DCQQuantizer(model, optimizer).prepare_model()
    apputils.save_checkpoint(0, "simplenet_mnist", model, optimizer=optimizer, dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"holds a quantized model \(it has quantizer_metadata\): the teacher must be "
                                         r"full precision"):
        SectionalKDPolicy(lenet(), boundaries=["pool1"], teacher=str(tmp_path / "checkpoint.pth.tar"))


def test_dorefa_weight_mode_is_distillers_formula_by_default():
    results = []
    for cls, kwargs in [(DCQQuantizer, dict(weight_mode="dorefa", bits_weights=2)),
                        (distiller.quantization.DorefaQuantizer, dict(bits_weights=2))]:
        torch.manual_seed(0)
        model = lenet()
        quantizer = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
        quantizer.prepare_model()
        quantizer.quantize_params()
        results.append(model)
    for layer in ("conv1", "fc1", "fc2"):
        assert torch.allclose(getattr(results[0], layer).weight, getattr(results[1], layer).weight)


@pytest.mark.parametrize("dcq_listed_first", [False, True])
def test_recalibrate_bn_re_estimates_the_stitched_statistics_with_the_last_steps_weights_before_validation(
        tmp_path, monkeypatch, caplog, dcq_listed_first):
    import logging
    from distiller_env import compress_classifier_script
    from distiller_dcq.engine import recalibrate_batchnorm
    monkeypatch.syspath_prepend(str(compress_classifier_script().parent))  # image_classifier imports its parser.py
    import distiller.apputils.image_classifier as classifier
    from distiller.data_loggers import NullLogger
    windows = [DCQ_WINDOW, QUANTIZER_POLICY] if dcq_listed_first else [QUANTIZER_POLICY, DCQ_WINDOW]
    text = """
quantizers:
  q: {class: DCQQuantizer, weight_mode: binary}
extensions:
  dcq: {class: SectionalKDPolicy, boundaries: [layer1, layer2], loss: mse, recalibrate_bn: 5}
policies:
""" + "".join(windows)
    torch.manual_seed(0)
    model, scheduler = scheduler_from(tmp_path, text, create_model(False, "cifar10", "resnet20_cifar", parallel=False,
                                                                   device_ids=-1))
    args = classifier.ClassifierCompressor.mock_args()
    args.arch, args.device, args.dataset = "resnet20_cifar", "cpu", "cifar10"
    images = torch.randn(24, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.randint(0, 10, (24,))),
                                         batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with caplog.at_level(logging.INFO):
        for epoch in (0, 1):
            scheduler.on_epoch_begin(epoch)
            classifier.train(loader, model, torch.nn.CrossEntropyLoss(), optimizer, epoch, scheduler,
                             [NullLogger()], args)
        model.eval()(images[:2])  # the stage's last validation
    # 5 batches asked, 3 in an epoch: the last epoch's (a run resumed at epoch 1 keeps the same ones)
    assert "re-estimated the stitched network's BatchNorm statistics on the last 3 training batches" in caplog.text
    bn = model.layer3[0].bn1
    got = bn.running_mean.clone(), bn.running_var.clone()
    recalibrate_batchnorm(model, [(images[:8],), (images[8:16],), (images[16:],)])  # the weights of the last step
    assert torch.allclose(got[0], bn.running_mean) and torch.allclose(got[1], bn.running_var)


def test_recalibrate_bn_must_be_a_number_of_batches(tmp_path):
    text = QUANTIZER.replace("LABEL_WEIGHT", "0").replace("label_weight: 0", "recalibrate_bn: -1") + QUANTIZER_POLICY
    with pytest.raises(ValueError, match=r"recalibrate_bn is a number of training batches \(an integer >= 0\), got -1"):
        scheduler_from(tmp_path, text)


def test_with_quantized_activations_the_teachers_section_activations_are_clipped_to_their_range(tmp_path, caplog):
    import logging
    text = QUANTIZER.replace("LABEL_WEIGHT", "0").replace("weight_mode: binary", "weight_mode: binary, bits_activations: 2") \
        + QUANTIZER_POLICY + DCQ_WINDOW
    model, scheduler = scheduler_from(tmp_path, text)
    seen = {}
    model.conv2.register_forward_pre_hook(lambda m, i: seen.__setitem__("conv2_in", i[0]))
    with caplog.at_level(logging.INFO):
        scheduler.on_epoch_begin(0)
    assert "the quantized activations lie in [0, 1]" in caplog.text
    model.train()(torch.randn(4, 1, 28, 28) * 10)
    assert 0 <= seen["conv2_in"].min() and seen["conv2_in"].max() <= 1  # the teacher's pool1, clipped, handed on
    assert len(seen["conv2_in"].unique()) > 4  # not quantized: the teacher's activations, only clipped
