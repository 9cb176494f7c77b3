"""DCQ's relatives against a real Distiller: SPEQ, progressive and stochastic precision, joint KD, from
their schedules, in Distiller's own training loop and through compress_classifier.py."""
import sys

import pytest
import torch

from conftest import LENET_TEACHER, ROOT
from distiller_env import build, float_weights, import_distiller, policy_of, run_compress_classifier, train_epochs

distiller = import_distiller()
from distiller.models import create_model  # noqa: E402
from distiller.quantization.clipped_linear import ClippedLinearQuantization  # noqa: E402

from distiller_dcq.adapter import (AuxiliaryModulePolicy, JointKDPolicy, SPEQPolicy,  # noqa: E402
                                   StochasticPrecisionPolicy)
from distiller_dcq.adapter.compat import RESUMED_POLICY_STATES  # noqa: E402
from distiller_dcq.engine import DorefaWeights  # noqa: E402
from distiller_dcq.engine.losses import cosine_loss  # noqa: E402

SCHEDULES = ROOT / "schedules"


# --- SPEQ --------------------------------------------------------------------------------------------

def speq(tmp_path, u, arch="simplenet_mnist"):
    text = (SCHEDULES / f"{arch}_speq_w2a2.yaml").read_text().replace("u: 0.5", f"u: {u}")
    model, optimizer, scheduler = build(None, arch, text, tmp_path)
    scheduler.on_epoch_begin(0)
    return model, policy_of(scheduler, SPEQPolicy)


def test_speq_draws_each_quantizers_precision_anew_for_every_teacher_forward(tmp_path):
    model, policy = speq(tmp_path, 0.3)
    seen = []
    hooks = [q.register_forward_pre_hook(lambda m, inputs: seen.append(m.num_bits)) for q in policy.quantizers]
    x = torch.randn(16, 1, 28, 28)
    torch.manual_seed(1)
    for _ in range(500):
        policy.teacher_logits(model, x)
    for h in hooks:
        h.remove()
    draws = torch.tensor(seen).view(500, len(policy.quantizers)) == 8
    assert len(policy.quantizers) == 3 and set(seen) == {2, 8}
    assert (draws.float().mean(0) - 0.3).abs().max() < 0.07  # each quantizer on its own, per forward
    assert 0.2 < draws.all(1).float().mean() / 0.3 ** 3 < 2.5 and draws.any(1).float().mean() < 0.75  # independent
    assert all(q.num_bits == 2 for q in policy.quantizers)  # the student keeps its precision


def test_speq_with_u_zero_has_zero_loss_and_a_positive_one_with_u_one(tmp_path):
    x = torch.randn(16, 1, 28, 28)
    for u, zero in ((0, True), (1, False)):
        model, policy = speq(tmp_path, u)
        model.train()
        loss = cosine_loss(model(x), policy.teacher_logits(model, x), logits=True).item()
        assert (loss < 1e-6) == zero, (u, loss)


def test_the_speq_teacher_pass_moves_no_batchnorm_statistic_and_carries_no_gradient(tmp_path):
    model, policy = speq(tmp_path, 0.5, arch="resnet20_cifar")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    logits = policy.teacher_logits(model, torch.randn(4, 3, 32, 32))
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not logits.requires_grad


@pytest.mark.parametrize("change, message", [
    (("bits_activations: 2", "bits_activations: null"), "SPEQ policy 'speq' needs quantized activations, and the model has none"),
    (("high_bits: 8", "high_bits: 2"), "high_bits 2 is not above the activations' 2 bits")])
def test_speq_without_a_higher_precision_teacher_is_refused(tmp_path, change, message):
    text = (SCHEDULES / "simplenet_mnist_speq_w2a2.yaml").read_text().replace(*change)
    model, optimizer, scheduler = build(None, text=text, tmp_path=tmp_path)
    with pytest.raises(ValueError, match=message):
        scheduler.on_epoch_begin(0)


# --- progressive quantization ------------------------------------------------------------------------

def test_progressive_stages_lower_the_bits_and_hand_over_the_weights_bit_exactly(monkeypatch):
    model, optimizer, scheduler = build(SCHEDULES / "simplenet_mnist_progressive_w2a2.yaml")
    ends, begins, bits = {}, {}, {}

    def record(epoch, when):
        if when == "end":
            ends[epoch] = float_weights(model)
            return
        begins[epoch] = float_weights(model)
        acts = {q.num_bits for q in model.modules() if isinstance(q, ClippedLinearQuantization)}
        levels = max(model.fc1.weight.unique().numel(), model.conv2.weight.unique().numel())
        bits[epoch] = (acts, levels, torch.equal(model.fc1.weight, DorefaWeights(next(iter(acts)), "layer")(
            model.fc1.float_weight)))

    train_epochs(model, optimizer, scheduler, range(6), monkeypatch, on_epoch=record)
    assert [bits[e][0] for e in range(6)] == [{8}, {8}, {4}, {4}, {2}, {2}]
    assert all(bits[e][2] for e in range(6))  # the forward sees the stage's bits from its first step
    assert bits[0][1] > 16 and bits[2][1] <= 16 and bits[4][1] <= 4
    for epoch in (1, 3, 5):  # a new stage starts from the FP weights the last one left, bit for bit
        assert all(torch.equal(ends[epoch - 1][k], begins[epoch][k]) for k in ends[epoch - 1])
    assert all(not torch.equal(ends[1][k], ends[5][k]) for k in ends[1] if "weight" in k)  # and they train on


def test_a_progressive_run_must_end_at_the_quantizers_precision(tmp_path):
    text = (SCHEDULES / "simplenet_mnist_progressive_w2a2.yaml").read_text().replace(
        "{epochs: 2, bits_weights: 2, bits_activations: 2}", "{epochs: 2, bits_weights: 2, bits_activations: 4}")
    model, optimizer, scheduler = build(None, text=text, tmp_path=tmp_path)
    with pytest.raises(ValueError, match="the last stage trains weights at 2 bits and activations at 4, but the "
                                         "quantizer \\(and the saved network\\) says 2 and 2"):
        scheduler.on_epoch_begin(0)


def test_weights_first_keeps_activations_full_precision_then_quantizes_them(monkeypatch):
    model, optimizer, scheduler = build(SCHEDULES / "simplenet_mnist_progressive_weights_first_w2a2.yaml")
    seen = {}
    train_epochs(model, optimizer, scheduler, range(6), monkeypatch, on_epoch=lambda e, when: seen.setdefault(
        e, {q.num_bits for q in model.modules() if isinstance(q, ClippedLinearQuantization)}))
    assert [seen[e] for e in range(6)] == [{32}] * 3 + [{2}] * 3
    assert model.fc1.weight.unique().numel() <= 4


# --- stochastic precision ----------------------------------------------------------------------------

QUANTIZER_ONLY = """policies:
  - quantizer:
      instance_name: quantizer
    starting_epoch: 0
    ending_epoch: 1000
    frequency: 1
"""
PLAIN_QAT = """
quantizers:
  quantizer:
    class: DCQQuantizer
    weight_mode: dorefa
    bits_weights: 2
    bits_activations: 2
""" + QUANTIZER_ONLY
STOCHASTIC = PLAIN_QAT.replace("policies:", """extensions:
  stochastic:
    class: StochasticPrecisionPolicy
    start_probability: START
    full_at: 0.5
policies:""") + """  - extension:
      instance_name: stochastic
    starting_epoch: 0
    ending_epoch: 2
    frequency: 1
"""


def test_stochastic_precision_at_p_one_is_plain_qat_bit_for_bit(tmp_path, monkeypatch):
    runs = {}
    for name, text in (("plain", PLAIN_QAT), ("p=1", STOCHASTIC.replace("START", "1.0"))):
        model, optimizer, scheduler = build(None, text=text, tmp_path=tmp_path)
        train_epochs(model, optimizer, scheduler, range(2), monkeypatch)
        runs[name] = model.state_dict()
    assert runs["plain"].keys() == runs["p=1"].keys()
    assert all(torch.equal(runs["plain"][k], runs["p=1"][k]) for k in runs["plain"])


def test_stochastic_precision_runs_some_units_in_full_precision_and_evaluates_all_quantized(tmp_path, monkeypatch):
    model, optimizer, scheduler = build(None, text=STOCHASTIC.replace("START", "0.0"), tmp_path=tmp_path)
    fp_steps, unrounded = [], []

    def record(m, inputs):
        if m.training:
            fp = m.weight.unique().numel() > 4
            fp_steps.append(fp)
            if fp:  # the FP weights as DoReFa maps them, unrounded: on the quantized weights' scale
                unrounded.append(torch.allclose(m.weight, torch.tanh(m.float_weight) / torch.tanh(m.float_weight).abs().max()))
    model.fc1.register_forward_pre_hook(record)
    train_epochs(model, optimizer, scheduler, range(2), monkeypatch, batches=8)
    policy = policy_of(scheduler, StochasticPrecisionPolicy)
    assert [u.name for u in policy.units] == ["conv1", "conv2", "fc1", "fc2"]
    assert any(fp_steps[:8]) and not any(fp_steps[8:])  # p rises from 0 to 1 at half of the 16 steps
    assert unrounded and all(unrounded)
    assert all(q.num_bits == 2 for q in model.modules() if isinstance(q, ClippedLinearQuantization))
    assert all(m.weight.unique().numel() <= 4 for m in (model.conv1, model.conv2, model.fc1, model.fc2))


def test_under_dataparallel_the_units_and_taps_are_the_networks_own(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.DataParallel(create_model(False, "cifar10", "resnet20_cifar", parallel=False, device_ids=-1))
    model.src_device_obj = torch.device("cpu")  # what DataParallel has on a GPU machine, where Distiller reads it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    text = STOCHASTIC.replace("START", "0.5")
    (tmp_path / "s.yaml").write_text(text)
    scheduler = distiller.file_config(model, optimizer, str(tmp_path / "s.yaml"))
    scheduler.on_epoch_begin(0)
    units = [u.name for u in policy_of(scheduler, StochasticPrecisionPolicy).units]
    assert units == ["conv1"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)] + ["fc"]
    plain = create_model(False, "cifar10", "resnet20_cifar", parallel=False, device_ids=-1)
    assert AuxiliaryModulePolicy(torch.nn.DataParallel(plain)).taps == units[:-1]


# --- joint knowledge distillation -------------------------------------------------------------------

def test_joint_kd_trains_its_fp_partner_and_saves_only_the_low_bit_network(tmp_path, monkeypatch):
    model, optimizer, scheduler = build(SCHEDULES / "simplenet_mnist_jointkd_w2a2.yaml")
    policy = policy_of(scheduler, JointKDPolicy)
    partner_before = float_weights(policy.partner)
    train_epochs(model, optimizer, scheduler, range(1), monkeypatch)
    plain, plain_optimizer, plain_scheduler = build(None, text=PLAIN_QAT, tmp_path=tmp_path)
    train_epochs(plain, plain_optimizer, plain_scheduler, range(1), monkeypatch)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    partner_params = {id(p) for p in policy.partner.parameters()}
    assert not any(id(p) in partner_params for group in optimizer.param_groups for p in group["params"])
    assert all(not torch.equal(partner_before[k], v) for k, v in float_weights(policy.partner).items())
    assert not any(isinstance(m, ClippedLinearQuantization) for m in policy.partner.modules())  # FP partner


def test_a_resumed_joint_kd_run_continues_with_the_saved_partner(monkeypatch):
    model, optimizer, scheduler = build(SCHEDULES / "simplenet_mnist_jointkd_binary.yaml")
    train_epochs(model, optimizer, scheduler, range(1), monkeypatch)
    saved = scheduler.state_dict()["distiller_dcq_policies"]["joint_kd"]
    for _ in range(2):  # a resumed run, and a run resumed from it
        setattr(model, RESUMED_POLICY_STATES, {"joint_kd": saved})
        resumed = JointKDPolicy(model)
        assert all(torch.equal(saved["partner"][k], v) for k, v in resumed.partner.state_dict().items())
        assert resumed.optimizer.state_dict()["state"].keys() == saved["optimizer"]["state"].keys()
        saved = resumed.checkpoint_state()


# --- full-precision auxiliary module ----------------------------------------------------------------

def test_the_auxiliary_module_taps_blocks_changes_no_output_and_leaves_nothing_in_the_saved_network(
        tmp_path, monkeypatch):
    model, optimizer, scheduler = build(SCHEDULES / "resnet20_cifar_auxiliary_binary.yaml", arch="resnet20_cifar")
    policy = policy_of(scheduler, AuxiliaryModulePolicy)
    assert policy.taps == ["conv1"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    aux_before = {k: v.clone() for k, v in policy.module.state_dict().items()}
    train_epochs(model, optimizer, scheduler, range(2), monkeypatch)
    assert any(not torch.equal(aux_before[k], v) for k, v in policy.module.state_dict().items())  # it trained
    assert policy.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.8)  # the model's in epoch 1
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with_module = model(x)
    for m in model.modules():  # remove the module: its hooks
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    assert torch.equal(with_module, model(x))
    plain_text = (SCHEDULES / "resnet20_cifar_auxiliary_binary.yaml").read_text().split("\nextensions:")[0] + "\n" + \
        QUANTIZER_ONLY
    plain, plain_optimizer, plain_scheduler = build(None, "resnet20_cifar", plain_text, tmp_path)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert len(optimizer.param_groups) == len(plain_optimizer.param_groups)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for g in plain_optimizer.param_groups for p in g["params"])


# --- through compress_classifier ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["simplenet_mnist_speq_w2a2.yaml", "simplenet_mnist_progressive_w2a2.yaml",
                                      "simplenet_mnist_stochastic_w2a2.yaml", "simplenet_mnist_jointkd_binary.yaml",
                                      "simplenet_mnist_auxiliary_binary.yaml"])
def test_each_relative_trains_through_compress_classifier(tmp_path, schedule):
    epochs = "6" if "progressive" in schedule else "1"  # a progressive run must finish its stages
    rc, log = run_compress_classifier(tmp_path, "--epochs", epochs, "--compress", SCHEDULES / schedule,
                                      "--exp-load-weights-from", LENET_TEACHER, train_size="0.005")
    assert rc == 0, log[-3000:]
    assert "==> Top1" in log.split("--- test ---")[1]
    expected = {"speq": "SPEQ cosine", "progressive": "starts a stage of 2 epoch(s): weights 8 bits, activations 8",
                "stochastic": "stochastic precision stochastic_precision: 4 units: conv1, conv2, fc1, fc2",
                "jointkd": "joint KD partner loss", "auxiliary": "auxiliary module CE"}
    assert expected[schedule.split("_")[2]] in log, log[-3000:]


def test_a_progressive_run_that_stops_before_its_last_stage_is_refused_before_training(tmp_path):
    rc, log = run_compress_classifier(tmp_path, "--epochs", "3", "--compress", SCHEDULES / "simplenet_mnist_progressive_w2a2.yaml",
                                      "--exp-load-weights-from", LENET_TEACHER, train_size="0.005")
    assert rc != 0 and "policy 'progressive' runs over epochs 0-5, but training stops after epoch 2" in log, log[-2000:]
    assert "Training epoch" not in log
