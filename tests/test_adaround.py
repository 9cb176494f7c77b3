"""AdaRoundPolicy against a real Distiller: DCQ's sections restricted to level choices, in Distiller's own
training loop and through compress_classifier.py."""
import pytest
import torch

from conftest import LENET_TEACHER, ROOT
from distiller_env import build, float_weights, import_distiller, policy_of, run_compress_classifier, train_epochs

distiller = import_distiller()
from distiller_dcq.adapter import AdaRoundPolicy  # noqa: E402
from distiller_dcq.adapter.compat import RESUMED_POLICY_STATES  # noqa: E402

SCHEDULE = ROOT / "schedules" / "simplenet_mnist_dcq_binary_adaround_labelfree.yaml"
LAYERS = ("conv1", "conv2", "fc1", "fc2")


def two_epoch_window(tmp_path, lr=0.5, sequential=False):
    """The LeNet schedule with its section stage and AdaRound over epochs 0-1 (a large lr: choices in few steps);
    ``sequential``: two sections trained one after the other."""
    text = SCHEDULE.read_text().replace("ending_epoch: 1\n", "ending_epoch: 2\n").replace(
        "starting_epoch: 1\n", "starting_epoch: 2\n")
    assert "    lr: 0.1\n" in text
    text = text.replace("    lr: 0.1\n", f"    lr: {lr}\n")
    if sequential:
        text = text.replace("boundaries: [pool1, pool2, relu3]", "boundaries: [pool2]").replace(
            "mode: mixed", "mode: sequential")
    return build(None, text=text, tmp_path=tmp_path)


def test_only_the_level_choices_learn_in_the_window_and_validation_sees_them_made(tmp_path, monkeypatch):
    model, optimizer, scheduler = two_epoch_window(tmp_path)
    policy = policy_of(scheduler, AdaRoundPolicy)
    before = float_weights(model)
    training_weights = []
    model.fc1.register_forward_pre_hook(lambda m, inputs: training_weights.append(m.weight.unique().numel())
                                        if m.training else None)
    logits = {}

    def check(epoch, when):
        if (epoch, when) == (0, "end"):
            after = float_weights(model)
            assert all(torch.equal(before[k], after[k]) for k in before)  # every parameter frozen
            logits["epoch 0"] = [c.logits.detach().clone() for _, c in policy.choices]
            model.eval()(torch.zeros(1, 1, 28, 28))  # a validation forward sees the choices made
            for param, choice in policy.choices:
                assert torch.equal(getattr(param.module, param.q_attr_name), choice.hard())
            model.train()
    train_epochs(model, optimizer, scheduler, range(1), monkeypatch, batches=8, on_epoch=check)
    assert min(training_weights) > 2  # the soft weights lie between the levels
    start = AdaRoundPolicy(model, name="fresh")
    start.on_epoch_begin(model, None, {"frequency": 1, "starting_epoch": 0, "ending_epoch": 2})
    moved = [not torch.equal(trained, fresh.logits) for trained, (_, fresh) in zip(logits["epoch 0"], start.choices)]
    assert all(moved)


def test_at_the_window_end_the_choices_are_final_and_the_parameters_train_again(tmp_path, monkeypatch):
    model, optimizer, scheduler = two_epoch_window(tmp_path)
    policy = policy_of(scheduler, AdaRoundPolicy)
    direct = {name: getattr(model, name).weight.detach().clone() for name in LAYERS}
    made = {}

    def record(epoch, when):
        if (epoch, when) == (1, "end"):
            for name, layer in ((n, getattr(model, n)) for n in LAYERS):
                assert torch.equal(layer.float_weight, layer.weight)  # the FP weights are the chosen weights
                assert layer.weight.abs().unique().numel() == 1  # binary x alpha
            made["left"] = sum(int((getattr(model, n).weight != direct[n]).sum()) for n in LAYERS)
            made["after window"] = float_weights(model)
    train_epochs(model, optimizer, scheduler, range(2), monkeypatch, batches=8, on_epoch=record)
    total = sum(direct[n].numel() for n in LAYERS)
    assert 0 < made["left"] < total / 2  # some weights left their direct level, most did not
    assert policy.choices is None
    model.eval()(torch.zeros(1, 1, 28, 28))  # validation after the window: the quantizer's weights, as saved
    assert all(torch.equal(getattr(model, n).float_weight, getattr(model, n).weight) for n in LAYERS)
    model.train()
    train_epochs(model, optimizer, scheduler, range(2, 3), monkeypatch, batches=8)  # logits KD: parameters train
    assert not torch.equal(made["after window"]["fc1.float_weight"], model.fc1.float_weight)


def test_with_sequential_sections_the_parameters_stay_put_and_the_choices_learn(tmp_path, monkeypatch):
    model, optimizer, scheduler = two_epoch_window(tmp_path, sequential=True)
    before = float_weights(model)
    train_epochs(model, optimizer, scheduler, range(1), monkeypatch, batches=4)
    train_epochs(model, optimizer, scheduler, range(1, 2), monkeypatch, batches=4)  # the second section's epoch
    # the window's end wrote the choices into the FP weights; nothing else moved
    assert all(torch.equal(before[k], v) for k, v in float_weights(model).items() if not k.endswith("float_weight"))
    assert any(not torch.equal(before[k], v) for k, v in float_weights(model).items() if k.endswith("float_weight"))


def test_a_run_resumed_in_the_window_and_resumed_again_keeps_the_choices_learned(tmp_path, monkeypatch):
    model, optimizer, scheduler = two_epoch_window(tmp_path)
    train_epochs(model, optimizer, scheduler, range(1), monkeypatch, batches=4)
    saved = scheduler.state_dict()["distiller_dcq_policies"]["adaround"]
    for _ in range(2):  # a resumed run, and a run resumed from it
        setattr(model, RESUMED_POLICY_STATES, {"adaround": saved})
        resumed = AdaRoundPolicy(model)
        resumed.on_epoch_begin(model, None, {"frequency": 1, "starting_epoch": 0, "ending_epoch": 2})
        assert all(torch.equal(a, c.logits) for a, (_, c) in zip(saved["logits"], resumed.choices))
        assert resumed.optimizer.state_dict()["state"].keys() == saved["optimizer"]["state"].keys()
        saved = resumed.checkpoint_state()


@pytest.mark.parametrize("change, message", [
    (("weight_mode: binary", "weight_mode: dorefa\n    bits_weights: 2"), "binary and ternary weights only"),
    (("class: DCQQuantizer\n    weight_mode: binary\n    scale: layer", "class: DorefaQuantizer\n    bits_weights: 1"),
     "works with DCQQuantizer"),
])
def test_weights_without_two_candidate_levels_or_another_quantizer_are_refused(tmp_path, change, message):
    model, optimizer, scheduler = build(None, text=SCHEDULE.read_text().replace(*change), tmp_path=tmp_path)
    with pytest.raises(ValueError, match=message):
        scheduler.on_epoch_begin(0)


def test_adaround_trains_through_compress_classifier_and_must_finish_its_window(tmp_path):
    code, out = run_compress_classifier(tmp_path / "run", "--epochs", "2", "--compress", SCHEDULE,
                                        "--exp-load-weights-from", LENET_TEACHER)
    assert code == 0, out[-3000:]
    log = next((tmp_path / "run").glob("*/*.log")).read_text()
    assert "AdaRound adaround: choices made; " in log and "left their direct level" in log
    progress = [line for line in log.splitlines() if "AdaRound regularizer" in line]
    assert progress and all(line.count("AdaRound regularizer") == 1 for line in progress)  # one meter, not one per beta
    short = tmp_path / "short.yaml"
    short.write_text(SCHEDULE.read_text().replace("ending_epoch: 1\n", "ending_epoch: 3\n", 2))
    code, out = run_compress_classifier(tmp_path / "short", "--epochs", "2", "--compress", short,
                                        "--exp-load-weights-from", LENET_TEACHER)
    assert code != 0 and "policy 'adaround' runs over epochs 0-2, but training stops after epoch 1" in out


@pytest.mark.parametrize("crafted, message", [
    (lambda state: state["param_groups"][0].update(fused=True), "turns on fused"),
    (lambda state: [s.update(exp_avg=torch.zeros(1)) for s in state["state"].values()], "holds 'exp_avg' of parameter"),
], ids=["fused", "short-buffer"])
def test_a_resumed_adam_state_that_does_not_fit_the_choices_is_refused(tmp_path, monkeypatch, crafted, message):
    model, optimizer, scheduler = two_epoch_window(tmp_path)
    train_epochs(model, optimizer, scheduler, range(1), monkeypatch, batches=2)
    saved = scheduler.state_dict()["distiller_dcq_policies"]["adaround"]
    crafted(saved["optimizer"])
    setattr(model, RESUMED_POLICY_STATES, {"adaround": saved})
    resumed = AdaRoundPolicy(model)
    with pytest.raises(ValueError, match=f"AdaRound policy 'adaround': the saved Adam state {message}"):
        resumed.on_epoch_begin(model, None, {"frequency": 1, "starting_epoch": 0, "ending_epoch": 2})
