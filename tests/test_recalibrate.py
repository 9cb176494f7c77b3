"""distiller_dcq.recalibrate against a real Distiller: a checkpoint's BatchNorm statistics re-estimated
on the run's own training images (a subset directory), the quantized weights untouched."""
import subprocess
import sys

import pytest
import torch

from distiller_env import compress_classifier_script, import_distiller, unavailable
from conftest import LENET_TEACHER, MNIST_DIR, ROOT, SHARED

distiller = import_distiller()
CIFAR = SHARED / "data" / "cifar10-jpeg"
RESNET_TEACHER = SHARED / "teachers" / "resnet20_cifar_fp.pth.tar"


@pytest.fixture
def cifar_subset(tmp_path):
    if not (CIFAR / "test" / "truck").is_dir():
        unavailable(f"{CIFAR} is missing")
    from distiller_dcq.subsets import write_subset_dir
    write_subset_dir(str(CIFAR), 128, 0, str(tmp_path / "subset"))
    return tmp_path / "subset"


def _norms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


def binarized_teacher():
    """The FP ResNet-20 teacher, its weights binarized by Distiller's DoReFa quantizer: the teacher's BatchNorm
    statistics no longer fit its layers' outputs."""
    from distiller.apputils import load_lean_checkpoint
    from distiller.models import create_model
    if not RESNET_TEACHER.exists():
        unavailable(f"{RESNET_TEACHER} is missing")
    model = create_model(False, "cifar10", "resnet20_cifar", parallel=False, device_ids=-1)
    load_lean_checkpoint(model, str(RESNET_TEACHER))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    schedule = ROOT / "schedules" / "resnet20_cifar_dorefa_binary.yaml"
    distiller.file_config(model, optimizer, str(schedule))
    return model


def test_re_estimated_statistics_repair_a_binary_resnet_and_nothing_else_changes(tmp_path, cifar_subset):
    from distiller.apputils import load_lean_checkpoint, save_checkpoint
    from distiller_dcq.recalibrate import recalibrate
    model = binarized_teacher()
    save_checkpoint(0, "resnet20_cifar", model, dir=str(tmp_path), name="run")
    saved = tmp_path / "run_checkpoint.pth.tar"
    repaired, result = recalibrate("resnet20_cifar", str(cifar_subset), str(saved), seed=0, batch_size=32,
                                   effective_valid_size=0.02, effective_test_size=0.05,
                                   save=str(tmp_path / "recalibrated.pth.tar"))
    assert result["training_images"] == 128  # the subset's images, once each
    assert result["test_top1"] > result["test_top1_before"] + 5
    for name, norm in _norms(repaired).items():
        assert not torch.equal(norm.running_var, _norms(model)[name].running_var), name
    before = {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    after = repaired.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # weights (FP and quantized), BN affine
    from distiller.models import create_model
    reloaded = load_lean_checkpoint(create_model(False, "cifar10", "resnet20_cifar", parallel=False, device_ids=-1),
                                    str(tmp_path / "recalibrated.pth.tar"))
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in after.items())


def test_a_network_without_batchnorm_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "distiller_dcq.recalibrate", str(tmp_path), str(LENET_TEACHER),
                           "--arch", "simplenet_mnist", "--seed", "0"], capture_output=True, text=True)
    assert done.returncode != 0
    assert "simplenet_mnist has no BatchNorm layer: there are no statistics to re-estimate" in done.stderr


def test_train_batches_must_be_a_positive_count(tmp_path):
    from distiller_dcq.recalibrate import recalibrate
    with pytest.raises(ValueError, match=r"train_batches is a number of training batches \(>= 1\), got 0"):
        recalibrate("resnet20_cifar", str(tmp_path), "unused.pth.tar", seed=0, train_batches=0)


@pytest.mark.parametrize("deterministic", [False, True], ids=["seeded", "deterministic"])
def test_the_images_re_estimated_on_are_the_runs_own_training_images(tmp_path, monkeypatch, deterministic):
    """The split compress_classifier.py draws (its ClassifierCompressor) for --seed 3, with and without
    --deterministic (which reseeds to 0 before the split is drawn)."""
    monkeypatch.syspath_prepend(str(compress_classifier_script().parent))  # image_classifier imports its parser.py
    monkeypatch.chdir(tmp_path)  # Distiller links its latest log into the working directory
    from distiller.apputils import image_classifier
    from distiller_dcq.recalibrate import run_loaders
    if not (MNIST_DIR / "MNIST" / "raw").is_dir():
        unavailable(f"{MNIST_DIR} is missing")
    argv = [str(MNIST_DIR), "--arch", "simplenet_mnist", "--seed", "3", "--vs", "0.1", "--cpu", "-j", "0",
            "--out-dir", str(tmp_path)] + (["--deterministic"] if deterministic else [])
    args = image_classifier.init_classifier_compression_arg_parser().parse_args(argv)
    run_train, run_valid, _ = image_classifier.ClassifierCompressor(args, str(tmp_path)).load_datasets()
    train, valid, _ = run_loaders("simplenet_mnist", "mnist", str(MNIST_DIR), 3, 0.1, 1.0, 128,
                                  deterministic=deterministic)
    assert list(train.sampler.data_source) == list(run_train.sampler.data_source)  # the image indices of each part
    assert list(valid.sampler.data_source) == list(run_valid.sampler.data_source)
    other, _, _ = run_loaders("simplenet_mnist", "mnist", str(MNIST_DIR), 3, 0.1, 1.0, 128,
                              deterministic=not deterministic)
    assert set(other.sampler.data_source) != set(run_train.sampler.data_source)  # the flag matters


QUANTIZERS = {  # every quantizer the loader rebuilds (checkpoints.REBUILDABLE_QUANTIZERS), as a schedule builds it
    "DorefaQuantizer": dict(bits_activations=2, bits_weights=1),
    "WRPNQuantizer": dict(bits_activations=4, bits_weights=2),
    "PACTQuantizer": dict(bits_activations=4, bits_weights=2),
    "QuantAwareTrainRangeLinearQuantizer": dict(bits_activations=8, bits_weights=4, quantize_inputs=False),
    "NCFQuantAwareTrainQuantizer": dict(bits_activations=8, bits_weights=4),
    "DCQQuantizer": dict(weight_mode="binary"),
}


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_re_estimating_changes_only_batchnorm_statistics_whatever_the_quantizer(tmp_path, cifar_subset, quantizer):
    """Every other module runs in evaluation mode: a range-linear QAT checkpoint's activation ranges, PACT's
    clipping values and everything else stay as saved."""
    from distiller import quantization
    from distiller.apputils import load_lean_checkpoint, save_checkpoint
    from distiller.models import create_model
    from distiller_dcq.adapter import DCQQuantizer
    from distiller_dcq.recalibrate import recalibrate
    model = create_model(False, "cifar10", "resnet20_cifar", parallel=False, device_ids=-1)
    load_lean_checkpoint(model, str(RESNET_TEACHER))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cls = DCQQuantizer if quantizer == "DCQQuantizer" else getattr(quantization, quantizer)
    cls(model, optimizer, **QUANTIZERS[quantizer]).prepare_model()
    model.train()
    with torch.no_grad():  # a few training-mode forwards, as training leaves them: ranges and statistics moved
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    save_checkpoint(0, "resnet20_cifar", model, optimizer=optimizer, dir=str(tmp_path), name="run")
    saved = load_lean_checkpoint(create_model(False, "cifar10", "resnet20_cifar", parallel=False, device_ids=-1),
                                 str(tmp_path / "run_checkpoint.pth.tar")).state_dict()
    repaired, _ = recalibrate("resnet20_cifar", str(cifar_subset), str(tmp_path / "run_checkpoint.pth.tar"), seed=0,
                              batch_size=32, train_batches=2, effective_valid_size=0.01, effective_test_size=0.01,
                              test_before=False)
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    after = repaired.state_dict()
    assert after.keys() == saved.keys()
    changed = [k for k, v in saved.items() if not torch.equal(v, after[k])]
    assert changed and all(k.endswith(statistics) for k in changed), [k for k in changed if not k.endswith(statistics)]


def test_dropout_is_off_while_the_statistics_are_re_estimated():
    from distiller_dcq.engine import recalibrate_batchnorm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(32))
    batches = [(torch.randn(64, 16),) for _ in range(4)]
    recalibrate_batchnorm(model, batches)
    features = torch.cat([model[0](inputs) for inputs, in batches])  # what BatchNorm sees with Dropout off
    assert torch.allclose(model[2].running_mean, features.mean(0), atol=1e-5)
    assert model.training and model[1].training  # the modes are put back


@pytest.mark.parametrize("checkpoint, message", [
    ("missing.pth.tar", "checkpoint '{path}' does not exist or is not a file: check the path"),
    ("int.pth.tar", "checkpoint '{path}' holds no state_dict of weights: is it a Distiller checkpoint?"),
    ("text.pth.tar", "checkpoint '{path}' cannot be loaded safely"),
    ("bytearray.pth.tar", "checkpoint '{path}' cannot be loaded safely (UnsafePickle: the checkpoint names "
                          "builtins.bytearray"),
    ("lenet.pth.tar", "checkpoint '{path}' does not load into resnet20_cifar"),
], ids=["missing", "not-a-dict", "not-a-checkpoint", "refused", "other-arch"])
def test_a_checkpoint_recalibrate_cannot_use_is_one_line_naming_it(tmp_path, cifar_subset, checkpoint, message):
    path = tmp_path / checkpoint
    if checkpoint == "text.pth.tar":
        path.write_text("not a checkpoint\n")
    elif checkpoint == "bytearray.pth.tar":
        torch.save({"state_dict": {}, "x": bytearray(8)}, path)
    elif checkpoint == "int.pth.tar":
        torch.save(5, path)
    elif checkpoint == "lenet.pth.tar":
        path.write_bytes(LENET_TEACHER.read_bytes())
    done = subprocess.run([sys.executable, "-m", "distiller_dcq.recalibrate", str(cifar_subset), str(path),
                           "--arch", "resnet20_cifar", "--seed", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("python -m distiller_dcq.recalibrate: " + message.format(path=path)), done.stderr


def test_a_missing_data_directory_is_one_line_naming_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "distiller_dcq.recalibrate", str(tmp_path / "nowhere"),
                           str(RESNET_TEACHER), "--arch", "resnet20_cifar", "--seed", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"data directory '{tmp_path / 'nowhere'}' does not exist" in done.stderr


@pytest.mark.parametrize("option, message", [
    (["--vs", "1.5"], "--vs is the run's validation fraction, in [0, 1), got 1.5"),
    (["--save", "nowhere/x.pth.tar"], "--save 'nowhere/x.pth.tar': its directory does not exist"),
    (["--data-is-empty"], "holds no cifar10 dataset Distiller can read"),
], ids=["validation-fraction", "save-directory", "empty-data-directory"])
def test_options_recalibrate_cannot_use_are_one_line_before_any_work(tmp_path, option, message):
    data = tmp_path / "empty" if option == ["--data-is-empty"] else CIFAR
    data.mkdir(exist_ok=True) if data != CIFAR else None
    options = [] if option == ["--data-is-empty"] else option
    done = subprocess.run([sys.executable, "-m", "distiller_dcq.recalibrate", str(data), str(RESNET_TEACHER),
                           "--arch", "resnet20_cifar", "--seed", "0", *options], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
