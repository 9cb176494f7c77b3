"""BatchNormRecalibrationPolicy against a real Distiller: the BatchNorm statistics re-estimated as a schedule's
last step, on the window's last training images, in Distiller's own training loop and through compress_classifier."""
import pytest
import torch

from conftest import ROOT
from distiller_env import build, import_distiller, policy_of, run_compress_classifier, train_epochs

distiller = import_distiller()
from distiller_dcq.adapter import BatchNormRecalibrationPolicy  # noqa: E402

SCHEDULE = ROOT / "schedules" / "resnet20_cifar_dcq_binary_adaround_whole_labelfree.yaml"


def two_epoch_run(tmp_path, batches=None):
    """The whole-run AdaRound schedule over 2 epochs, its statistics re-estimated in the second."""
    text = SCHEDULE.read_text().replace("ending_epoch: 10\n", "ending_epoch: 2\n").replace(
        "starting_epoch: 9\n", "starting_epoch: 1\n")
    if batches is not None:
        text = text.replace("class: BatchNormRecalibrationPolicy\n", f"class: BatchNormRecalibrationPolicy\n"
                                                                      f"    batches: {batches}\n")
    return build(None, arch="resnet20_cifar", text=text, tmp_path=tmp_path)


def last_epoch_images(batches=3, seed=0):
    """The images train_epochs feeds every epoch (the same ones, in order)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4 * batches, 3, 32, 32, generator=generator)


@pytest.mark.parametrize("kept", [None, 2], ids=["whole-last-epoch", "last-2-batches"])
def test_the_statistics_are_re_estimated_once_on_the_last_epochs_images_before_the_next_forward(tmp_path,
                                                                                                 monkeypatch, kept):
    model, optimizer, scheduler = two_epoch_run(tmp_path, kept)
    stale = []

    def validate(epoch):  # where compress_classifier validates: its first forward re-estimates
        stale.append(model.bn1.running_mean.clone())
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, 32, 32))
    train_epochs(model, optimizer, scheduler, range(2), monkeypatch, batches=3, validate=validate)
    stale = stale[-1]
    images = last_epoch_images()[-4 * (kept or 3):]
    with torch.no_grad():
        features = model.conv1(images)  # the first BatchNorm's input, with the final binary weights
    assert not torch.allclose(model.bn1.running_mean, stale)
    assert torch.allclose(model.bn1.running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == (kept or 3)
    again = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # once only: later forwards leave everything as it is
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.items())
    assert not model.training


def test_without_a_validation_the_statistics_are_re_estimated_at_the_windows_end(tmp_path, monkeypatch):
    """A run without validation (--vs 0) saves its checkpoint after on_epoch_end: the re-estimation happens there."""
    model, optimizer, scheduler = two_epoch_run(tmp_path)
    train_epochs(model, optimizer, scheduler, range(2), monkeypatch, batches=3)
    with torch.no_grad():
        features = model.conv1(last_epoch_images())
    assert int(model.bn1.num_batches_tracked) == 3
    assert torch.allclose(model.bn1.running_mean, features.mean((0, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("text, message", [
    ("    batches: -1\n", "batches is a number of training batches"),
    ("    batches: 1.5\n", "batches is a number of training batches"),
])
def test_a_batch_count_that_is_not_a_count_is_refused(tmp_path, text, message):
    schedule = SCHEDULE.read_text().replace("class: BatchNormRecalibrationPolicy\n",
                                            "class: BatchNormRecalibrationPolicy\n" + text)
    with pytest.raises(ValueError, match=message):
        build(None, arch="resnet20_cifar", text=schedule, tmp_path=tmp_path)


def test_a_window_with_gaps_is_refused(tmp_path, monkeypatch):
    model, optimizer, scheduler = two_epoch_run(tmp_path)
    policy = policy_of(scheduler, BatchNormRecalibrationPolicy)
    with pytest.raises(ValueError, match="needs one contiguous window"):
        policy.on_epoch_begin(model, None, {"frequency": 2, "starting_epoch": 0, "ending_epoch": 2,
                                            "current_epoch": 1})


def test_the_schedule_trains_through_compress_classifier_and_must_end_within_the_run(tmp_path):
    """Two epochs on a CIFAR-10 slice: the log says the statistics were re-estimated, then tested; the same
    schedule in a one-epoch run is refused before training (its windows would end after the run)."""
    from conftest import SHARED
    cifar = SHARED / "data" / "cifar10-jpeg"
    text = SCHEDULE.read_text().replace("ending_epoch: 10\n", "ending_epoch: 2\n").replace(
        "starting_epoch: 9\n", "starting_epoch: 1\n")
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text(text)
    teacher = SHARED / "teachers" / "resnet20_cifar_fp.pth.tar"
    rc, log = run_compress_classifier(tmp_path / "run", "--epochs", "2", "--compress", schedule,
                                      "--exp-load-weights-from", teacher, "--name", "bn", train_size="0.005",
                                      data_dir=cifar, arch="resnet20_cifar")
    assert rc == 0, log[-3000:]
    assert "recalibrate_bn: re-estimated the BatchNorm statistics on the last" in log
    assert log.index("re-estimated the BatchNorm statistics") < log.index("--- test ---")
    rc, log = run_compress_classifier(tmp_path / "short", "--epochs", "1", "--compress", schedule,
                                      "--exp-load-weights-from", teacher, train_size="0.005", data_dir=cifar,
                                      arch="resnet20_cifar")
    assert rc != 0 and "the network would be tested before its window ends; train for 2 epochs" in log


def test_beside_dcqs_own_re_estimation_the_schedules_last_step_wins(tmp_path, monkeypatch):
    """Found by review: SectionalKDPolicy's recalibrate_bn at the merge and this policy nested (one's forward fired
    the other's pending hook) and mixed their batches. Now DCQ's runs, then this one on the last epoch's batches."""
    text = SCHEDULE.read_text().replace("ending_epoch: 10\n", "ending_epoch: 2\n").replace(
        "starting_epoch: 9\n", "starting_epoch: 1\n").replace("    mode: mixed\n", "    mode: mixed\n    recalibrate_bn: 2\n")
    model, optimizer, scheduler = build(None, arch="resnet20_cifar", text=text, tmp_path=tmp_path)
    train_epochs(model, optimizer, scheduler, range(2), monkeypatch, batches=3)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, 3, 32, 32))  # DCQ's re-estimation, then ours
        model(torch.zeros(2, 3, 32, 32))
        features = model.conv1(last_epoch_images())
    assert int(model.bn1.num_batches_tracked) == 3
    assert torch.allclose(model.bn1.running_mean, features.mean((0, 2, 3)), atol=1e-5)
