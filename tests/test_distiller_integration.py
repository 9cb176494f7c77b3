"""Against a real Distiller: YAML -> file_config -> scheduler -> compress_classifier's training loop."""
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from conftest import LENET_TEACHER, ROOT
from distiller_env import compress_classifier_script, import_distiller, run_compress_classifier

distiller = import_distiller()
from distiller.models import create_model  # noqa: E402

from distiller_dcq.adapter import DCQQuantizer, SectionalKDPolicy  # noqa: E402
from distiller_dcq.adapter.checkpoints import load_distiller_checkpoint  # noqa: E402

SCHEDULES = ROOT / "schedules"


def lenet():
    return create_model(False, "mnist", "simplenet_mnist", parallel=False, device_ids=-1)


def in_fresh_python(code, **env):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    return done.returncode, done.stdout + done.stderr


def without_our_patches(code):
    """Run ``code`` in a fresh Python without distiller_dcq, except the pkg_resources stand-in (loaded
    from its file, not through the package), without which Distiller does not import on setuptools >= 82."""
    from distiller_dcq import _pkg_resources
    prelude = (f"import importlib.util; spec = importlib.util.spec_from_file_location('stand_in', "
               f"{_pkg_resources.__file__!r}); m = importlib.util.module_from_spec(spec); "
               f"spec.loader.exec_module(m); m.lend(); ")
    return in_fresh_python(prelude + code, DISTILLER_DCQ_NO_AUTOLOAD="1")


# --- registration and compat -----------------------------------------------------------------------

def test_yaml_classes_are_registered_with_distiller_config():
    import distiller.config
    assert distiller.config.DCQQuantizer is DCQQuantizer
    assert distiller.config.SectionalKDPolicy is SectionalKDPolicy


def test_installing_the_package_is_enough_for_a_fresh_interpreter():
    code = "import distiller.config as c; print(c.SectionalKDPolicy.__module__, c.DCQQuantizer.__module__)"
    rc, out = in_fresh_python(code)
    assert rc == 0 and "distiller_dcq.adapter.policy distiller_dcq.adapter.quantizer" in out, out
    rc, out = without_our_patches("import distiller.config as c; print(hasattr(c, 'SectionalKDPolicy'))")
    assert rc == 0 and "False" in out, out



def test_the_adapter_imported_before_distiller_registers_once():
    code = ("import distiller_dcq.adapter.checkpoints, distiller.config as c, distiller.apputils.checkpoint as a; "
            "print(c.SectionalKDPolicy.__module__, type(a.torch).__name__, type(a.torch.torch).__name__)")
    rc, out = in_fresh_python(code)  # (patched twice, the checkpoint loader would wrap itself)
    assert rc == 0 and "distiller_dcq.adapter.policy _TorchForDistillerCheckpoints module" in out, out


PANDAS_SUMMARY = ("import distiller, torch; m = torch.nn.Sequential(torch.nn.Linear(3, 2)); "
                  "print(distiller.weights_sparsity_tbl_summary(m)); print('summary ok')")


def test_pandas_precision_patch_is_what_makes_the_epoch_summary_work():
    rc, out = without_our_patches(PANDAS_SUMMARY)
    assert rc != 0 and "precision" in out  # pandas 3 refuses Distiller's set_option('precision', ...)
    rc, out = in_fresh_python(PANDAS_SUMMARY)
    assert rc == 0 and "summary ok" in out, out


def test_patches_are_idempotent():
    from distiller_dcq.adapter import register
    import distiller.apputils.checkpoint as ckpt
    import distiller.model_summaries as ms
    before = (ckpt.load_checkpoint, ms.pd)
    register(distiller)
    register(distiller)
    assert (ckpt.load_checkpoint, ms.pd) == before


def save_trained_checkpoint(tmp_path, quantized):
    from distiller import apputils
    model = lenet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if quantized:
        DCQQuantizer(model, optimizer, weight_mode="ternary").prepare_model()
    apputils.save_checkpoint(3, "simplenet_mnist", model, optimizer=optimizer, extras={"top1": 97.5},
                             dir=str(tmp_path))
    return tmp_path / "checkpoint.pth.tar", model


CHECKPOINT_LOAD = ("import distiller, distiller.apputils as a; from distiller.models import create_model; "
                   "m = create_model(False, 'mnist', 'simplenet_mnist', parallel=False, device_ids=-1); "
                   "m, s, o, e = a.load_checkpoint(m, {path!r}); print('loaded', type(o).__name__, e)")


def test_checkpoint_patch_is_what_makes_distiller_checkpoints_load(tmp_path):
    path, _ = save_trained_checkpoint(tmp_path, quantized=False)
    rc, out = without_our_patches(CHECKPOINT_LOAD.format(path=str(path)))
    assert rc != 0 and "Unsupported global" in out  # torch >= 2.6 refuses optimizer_type
    rc, out = in_fresh_python(CHECKPOINT_LOAD.format(path=str(path)))
    assert rc == 0 and "loaded SGD 4" in out, out


def test_a_quantized_checkpoint_loads_with_weights_only(tmp_path):
    path, model = save_trained_checkpoint(tmp_path, quantized=True)
    checkpoint = load_distiller_checkpoint(str(path))
    assert checkpoint["quantizer_metadata"]["type"] is DCQQuantizer
    assert checkpoint["quantizer_metadata"]["params"]["weight_mode"] == "ternary"
    assert torch.equal(checkpoint["state_dict"]["conv1.float_weight"], model.conv1.float_weight)


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth.tar"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "arch": "simplenet_mnist", "x": Exploit()}, f)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_distiller_checkpoint(str(path))
    rc, out = in_fresh_python(CHECKPOINT_LOAD.format(path=str(path)))
    assert rc != 0 and not marker.exists()


# --- the quantizer ---------------------------------------------------------------------------------

def prepared(quantizer_cls, **kwargs):
    torch.manual_seed(0)
    model = lenet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    quantizer = quantizer_cls(model, optimizer, **kwargs)
    quantizer.prepare_model()
    quantizer.quantize_params()
    return model


def test_binary_scaled_mode_equals_distillers_one_bit_dorefa():
    ours = prepared(DCQQuantizer, weight_mode="binary", scale="layer")
    theirs = prepared(distiller.quantization.DorefaQuantizer, bits_weights=1)
    for layer in ("conv1", "conv2", "fc1", "fc2"):  # first and last layers included
        assert torch.allclose(getattr(ours, layer).weight, getattr(theirs, layer).weight)


def test_two_bit_dorefa_mode_equals_distillers():
    ours = prepared(DCQQuantizer, weight_mode="dorefa", bits_weights=2, scale="none")
    theirs = prepared(distiller.quantization.DorefaQuantizer, bits_weights=2)
    assert torch.allclose(ours.fc1.weight, theirs.fc1.weight)


def test_ternary_unscaled_weights_are_minus_one_zero_one_and_overrides_are_honoured():
    overrides = OrderedDict([("fc2", OrderedDict([("bits_weights", None)]))])
    model = prepared(DCQQuantizer, weight_mode="ternary", scale="none", overrides=overrides)
    for layer in ("conv1", "conv2", "fc1"):
        assert set(getattr(model, layer).weight.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert not hasattr(model.fc2, "float_weight") and model.fc2.weight.unique().numel() > 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_mode="quaternary"), r"unknown weight mode 'quaternary'; choose one of: binary, dorefa, ternary"),
    (dict(weight_mode="binary", bits_weights=4), r"weight_mode binary has 1 bit\(s\), but bits_weights is 4"),
    (dict(weight_mode="dorefa"), r"weight_mode dorefa needs bits_weights"),
])
def test_bad_quantizer_yaml_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DCQQuantizer(lenet(), torch.optim.SGD(lenet().parameters(), lr=0.1), **kwargs)


# --- the policy through distiller.file_config ------------------------------------------------------

def write_schedule(tmp_path, policy_args):
    text = (SCHEDULES / "simplenet_mnist_dcq_binary.yaml").read_text()
    text = text.replace("    boundaries: [pool1, pool2, relu3]\n    loss: mse\n", policy_args)
    path = tmp_path / "schedule.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("policy_args, error, message", [
    ("    boundaries: [pool1, pool7]\n", ValueError, r"unknown boundary module\(s\) \['pool7'\].*valid names: conv1"),
    ("    boundaries: [relu3, pool1]\n", ValueError, r"boundaries must be listed in forward order"),
    ("    boundaries: []\n", ValueError, r"the section list is empty"),
    ("    boundaries: [pool1]\n    loss: poison\n", ValueError, r"unknown section loss 'poison'; choose one of"),
    ("    boundaries: [pool1]\n    mode: sideways\n", ValueError, r"unknown DCQ mode 'sideways'; choose one of: "
                                                           r"parallel, sequential"),
    ("    boundaries: [pool1]\n    section_epochs: [1, 1]\n", ValueError, r"section_epochs applies to mode: sequential"),
    ("    boundaries: [pool1]\n    mode: sequential\n    section_epochs: [1]\n", ValueError,
     r"section_epochs must list one positive number of epochs per section \(2: pool1, output\)"),
    ("    boundaries: [pool1]\n    teacher: /nonexistent/teacher.pth.tar\n", FileNotFoundError,
     r"checkpoint '/nonexistent/teacher.pth.tar' does not exist"),
])
def test_bad_dcq_yaml_is_a_clear_error_at_file_config(tmp_path, policy_args, error, message):
    model = lenet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=message):
        distiller.file_config(model, optimizer, str(write_schedule(tmp_path, policy_args)))


def test_a_teacher_of_another_architecture_is_refused(tmp_path):
    from distiller import apputils
    other = create_model(False, "mnist", "simplenet_v2_mnist", parallel=False, device_ids=-1)
    apputils.save_checkpoint(0, "simplenet_v2_mnist", other, dir=str(tmp_path))
    schedule = write_schedule(tmp_path, f"    boundaries: [pool1]\n    teacher: {tmp_path / 'checkpoint.pth.tar'}\n")
    with pytest.raises(ValueError, match=r"is for arch 'simplenet_v2_mnist', but the model is 'simplenet_mnist'"):
        distiller.file_config(lenet(), torch.optim.SGD(lenet().parameters(), lr=0.1), str(schedule))


def test_file_config_builds_a_quantized_model_with_an_fp_teacher(tmp_path):
    model = lenet()
    fp_fc1 = model.fc1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = distiller.file_config(model, optimizer, str(SCHEDULES / "simplenet_mnist_dcq_binary.yaml"))
    policy = next(p for p in scheduler.policies[0] if isinstance(p, SectionalKDPolicy))
    assert [p for p in scheduler.policies[1] if isinstance(p, SectionalKDPolicy)] == []  # window is epoch 0
    assert hasattr(model.fc1, "float_weight") and model.fc1.weight.unique().numel() == 2
    assert torch.equal(policy.wiring.teacher.fc1.weight, fp_fc1)  # the FP model as the schedule was built
    assert policy.wiring.section_names == ["pool1", "pool2", "relu3", "output"]


# --- compress_classifier.py, unmodified ------------------------------------------------------------

def test_dcq_binary_through_compress_classifier_logs_sections_and_the_stitched_accuracy(tmp_path):
    rc, log = run_compress_classifier(tmp_path, "--epochs", "2", "--compress",
                                      SCHEDULES / "simplenet_mnist_dcq_binary.yaml",
                                      "--exp-load-weights-from", LENET_TEACHER)
    assert rc == 0, log[-3000:]
    training = [line for line in log.splitlines() if "Overall Loss" in line]
    epoch0 = [line for line in training if line.startswith("Epoch: [0]")]
    assert epoch0
    for section in ("pool1", "pool2", "relu3", "output"):
        assert all(f"DCQ {section} mse" in line for line in epoch0)
    assert "DCQ dcq: merged the 4 sections into one network; stitched network validation Top1:" in log
    assert "DCQ" not in "".join(line for line in training if line.startswith("Epoch: [1]"))
    assert "--- test ---" in log


@pytest.mark.parametrize("schedule", ["simplenet_mnist_dorefa_binary.yaml", "simplenet_mnist_dorefa_ternary.yaml",
                                      "simplenet_mnist_dcq_ternary.yaml"])
def test_every_lenet_schedule_runs_through_compress_classifier(tmp_path, schedule):
    rc, log = run_compress_classifier(tmp_path, "--epochs", "1", "--compress", SCHEDULES / schedule,
                                      "--exp-load-weights-from", LENET_TEACHER, train_size="0.01")
    assert rc == 0, log[-3000:]
    assert "==> Top1" in log.split("--- test ---")[1]


def test_sequential_mode_trains_one_section_per_epoch_through_compress_classifier(tmp_path):
    schedule = write_schedule(tmp_path, "    boundaries: [pool2]\n    mode: sequential\n")
    schedule.write_text(schedule.read_text().replace("instance_name: dcq\n    starting_epoch: 0\n    ending_epoch: 1",
                                                     "instance_name: dcq\n    starting_epoch: 0\n    ending_epoch: 2"))
    rc, log = run_compress_classifier(tmp_path, "--epochs", "3", "--compress", schedule,
                                      "--exp-load-weights-from", LENET_TEACHER, train_size="0.01")
    assert rc == 0, log[-3000:]
    assert "DCQ dcq: epoch 0 trains section 'pool2' only" in log
    assert "DCQ dcq: epoch 1 trains section 'output' only" in log
    training = [line for line in log.splitlines() if "Overall Loss" in line]
    assert all("DCQ pool2 poisson" in line and "DCQ output" not in line for line in training if "[0]" in line)
    assert all("DCQ output poisson" in line and "DCQ pool2" not in line for line in training if "[1]" in line)
    assert "merged the 2 sections" in log


def test_sequential_windows_that_do_not_add_up_stop_the_run_before_training(tmp_path):
    schedule = write_schedule(tmp_path, "    boundaries: [pool2]\n    mode: sequential\n    section_epochs: [2, 1]\n")
    rc, log = run_compress_classifier(tmp_path, "--epochs", "1", "--compress", schedule, train_size="0.01")
    assert rc != 0 and "section_epochs [2, 1] add up to 3 epochs, but its window has 1" in log
    assert "Overall Loss" not in log


# --- resume ----------------------------------------------------------------------------------------

def test_resuming_a_quantized_checkpoint_without_a_teacher_is_a_clear_error(tmp_path):
    rc, _ = run_compress_classifier(tmp_path / "dorefa", "--epochs", "1", "--compress",
                                    SCHEDULES / "simplenet_mnist_dorefa_binary.yaml", train_size="0.01")
    checkpoint = max((tmp_path / "dorefa").glob("*/checkpoint.pth.tar"), key=os.path.getmtime)
    rc, log = run_compress_classifier(tmp_path / "dcq", "--epochs", "2", "--resume-from", checkpoint, "--compress",
                                      SCHEDULES / "simplenet_mnist_dcq_binary.yaml", train_size="0.01")
    assert rc != 0
    assert "the model is already quantized" in log and "teacher: path/to/fp.pth.tar" in log


# --- more bad input --------------------------------------------------------------------------------

def test_a_corrupt_teacher_checkpoint_is_named(tmp_path):
    bad = tmp_path / "teacher.pth.tar"
    bad.write_bytes(os.urandom(2048))
    schedule = write_schedule(tmp_path, f"    boundaries: [pool1]\n    teacher: {bad}\n")
    with pytest.raises(ValueError, match=r"teacher.pth.tar' cannot be loaded safely"):
        distiller.file_config(lenet(), torch.optim.SGD(lenet().parameters(), lr=0.1), str(schedule))


def test_a_teacher_with_another_number_of_classes_is_refused(tmp_path):
    from distiller import apputils
    other = lenet()
    other.fc2 = torch.nn.Linear(500, 5)
    apputils.save_checkpoint(0, "simplenet_mnist", other, dir=str(tmp_path))
    schedule = write_schedule(tmp_path, f"    boundaries: [pool1]\n    teacher: {tmp_path / 'checkpoint.pth.tar'}\n")
    with pytest.raises(ValueError, match=r"does not fit the model .*shape mismatch \['fc2.weight', 'fc2.bias'\]"):
        distiller.file_config(lenet(), torch.optim.SGD(lenet().parameters(), lr=0.1), str(schedule))


def _scheduler_from(tmp_path, text):
    path = tmp_path / "schedule.yaml"
    path.write_text(text)
    model = lenet()
    return model, distiller.file_config(model, torch.optim.SGD(model.parameters(), lr=0.1), str(path))


POLICY_ONLY = """
extensions:
  dcq: {class: SectionalKDPolicy, boundaries: [pool1]}
policies:
  - extension: {instance_name: dcq}
    starting_epoch: 0
    ending_epoch: 2
    frequency: FREQ
"""


def test_a_dcq_policy_without_a_quantizer_stops_before_training(tmp_path):
    model, scheduler = _scheduler_from(tmp_path, POLICY_ONLY.replace("FREQ", "1"))
    with pytest.raises(ValueError, match=r"found no quantized weights on the model: declare a quantizer under quantizers:"):
        scheduler.on_epoch_begin(0)


def test_a_dcq_policy_scheduled_every_other_epoch_is_refused(tmp_path):
    model, scheduler = _scheduler_from(tmp_path, POLICY_ONLY.replace("FREQ", "2"))
    with pytest.raises(ValueError, match=r"needs one contiguous window .* not frequency: 2"):
        scheduler.on_epoch_begin(0)


def test_a_yaml_class_typo_names_the_closest_classes(tmp_path):
    with pytest.raises(ValueError, match=r"no class named 'SectionalKDPolcy'; did you mean SectionalKDPolicy"):
        _scheduler_from(tmp_path, POLICY_ONLY.replace("FREQ", "1").replace("SectionalKDPolicy", "SectionalKDPolcy"))


# --- CIFAR-10 from image folders -------------------------------------------------------------------

def test_distillers_cifar10_loader_reads_the_image_folder_copy_with_its_own_transforms():
    from conftest import SHARED
    cifar = SHARED / "data" / "cifar10-jpeg"
    if not (cifar / "test" / "truck").is_dir():
        pytest.skip(f"{cifar} is missing")
    from distiller.apputils import data_loaders
    train, test = data_loaders.cifar10_get_datasets(str(cifar))
    assert (len(train), len(test)) == (50000, 10000)
    assert test.classes[0] == "airplane" and test.targets[-1] == 9
    image, label = test[0]
    assert image.shape == (3, 32, 32) and label == 0 and image.min() >= -1 and image.max() <= 1
    assert repr(train.transform).count("RandomCrop(size=(32, 32), padding=4)") == 1


def test_only_image_folders_leave_distillers_own_cifar10_loader(tmp_path):
    from distiller_dcq.adapter.datasets import is_image_folder_layout
    from conftest import SHARED
    (tmp_path / "cifar-10-batches-py").mkdir()  # torchvision's layout: Distiller's loader reads it
    assert not is_image_folder_layout(str(tmp_path))
    assert is_image_folder_layout(str(SHARED / "data" / "cifar10-jpeg"))


def test_image_folders_with_other_classes_are_named(tmp_path):
    from PIL import Image
    from distiller.apputils import data_loaders
    for split in ("train", "test"):
        for cls in ("cats", "dogs"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / split / cls / "0.png")
    with pytest.raises(ValueError, match=r"has class folders \['cats', 'dogs'\]; CIFAR-10 in image folders needs"):
        data_loaders.cifar10_get_datasets(str(tmp_path))


# --- SVHN inside Distiller -------------------------------------------------------------------------

def test_distiller_creates_the_svhn_network_and_loads_svhn_with_its_usual_split(tmp_path):
    from functools import partial
    from distiller.apputils import data_loaders
    from distiller_dcq.adapter.datasets import svhn_get_datasets
    from test_svhn import write_svhn
    import distiller.apputils as apputils
    model = create_model(False, "svhn", "svhn_dorefa", parallel=False, device_ids=-1)
    assert model.input_shape == (1, 3, 40, 40) and apputils.classification_dataset_str_from_arch("svhn_dorefa") == \
        "svhn" and apputils.classification_num_classes("svhn") == 10
    write_svhn(tmp_path, "train", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 2)
    write_svhn(tmp_path, "test", [10, 1, 2, 3])
    train, valid, test, _ = data_loaders.get_data_loaders(partial(svhn_get_datasets, verify=False), str(tmp_path),
                                                          batch_size=4, num_workers=0, validation_split=0.1)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 40, 40) and len(valid.sampler) == 2 and len(test.dataset) == 4
    assert model(images).shape == (4, 10)
    with pytest.raises(ValueError, match=r"the official train_32x32.mat has 182040794"):
        apputils.load_data("svhn", "svhn_dorefa", str(tmp_path), batch_size=4, workers=0)


# --- the schedules of the other networks, through Distiller's own training loop ----------------------

@pytest.mark.parametrize("schedule", sorted(p.name for p in SCHEDULES.glob("*.yaml")
                                            if not p.name.startswith("simplenet_mnist") and p.name != "fp_teacher.yaml"))
def test_every_network_schedule_trains_a_few_minibatches_in_distillers_loop(schedule, monkeypatch):
    monkeypatch.syspath_prepend(str(compress_classifier_script().parent))  # image_classifier imports its parser.py
    import distiller.apputils.image_classifier as classifier
    from distiller.data_loggers import NullLogger
    datasets = {"resnet20_cifar": "cifar10", "vgg11_bn_cifar": "cifar10", "svhn_dorefa": "svhn",
                "alexnet": "imagenet", "mobilenet": "imagenet", "resnet18": "imagenet"}
    arch = next(a for a in datasets if schedule.startswith(a + "_"))
    args = classifier.ClassifierCompressor.mock_args()
    args.arch, args.device, args.dataset = arch, "cpu", datasets[arch]
    torch.manual_seed(0)
    model = create_model(False, args.dataset, arch, parallel=False, device_ids=-1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = distiller.file_config(model, optimizer, str(SCHEDULES / schedule))
    shape, classes = model.input_shape[1:], 1000 if datasets[arch] == "imagenet" else 10
    data = torch.utils.data.TensorDataset(torch.randn(4, *shape), torch.randint(0, classes, (4,)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    scheduler.on_epoch_begin(0)
    top1, _, overall_loss = classifier.train(loader, model, torch.nn.CrossEntropyLoss(), optimizer, 0, scheduler,
                                             [NullLogger()], args)
    scheduler.on_epoch_end(0, optimizer, metrics={"min": overall_loss.mean, "max": top1})
    assert np.isfinite(overall_loss.mean) and overall_loss.n == 2  # two minibatches
    quantized = [m for m in model.modules() if hasattr(m, "float_weight")]
    # binary/ternary: |w| in {a} or {0, a}; 2-bit DoReFa: 4 levels; a progressive run starts at 8 bits
    levels = 2 ** 8 if "progressive" in schedule else 4 if "w2a2" in schedule else 2
    assert quantized and all((m.weight if levels > 2 else m.weight.abs()).unique().numel() <= levels
                             for m in quantized)


def tiny_imagenet(root, classes=3, per_class=2):
    """An ImageNet-layout folder (train/ and val/ class folders of 224x224 JPEGs) made here."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    return root


@pytest.mark.parametrize("arch", ["mobilenet", "resnet18"])  # AlexNet's 61M weights: checkpoints too slow for the suite
def test_the_imagenet_dcq_schedules_train_through_compress_classifier_on_an_imagenet_folder(tmp_path, arch):
    data = tiny_imagenet(tmp_path / "imagenet")
    rc, log = run_compress_classifier(tmp_path / "run", "--epochs", "1", "--compress", SCHEDULES / f"{arch}_dcq_binary.yaml",
                                      "-b", "3", "--vs", "0", "--effective-test-size", "1.0", train_size="1.0",
                                      data_dir=data, arch=arch)
    assert rc == 0, log[-3000:]
    assert "4 sections ending at" in log and "training=6\n" in log and "--- test ---" in log, log[-3000:]


# --- kernel diagnostics ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_kernel_diagnostics_on_a_real_checkpoint(tmp_path, mode):
    from distiller import apputils
    from distiller_dcq.report.kernels import main as kernels_main, write_report
    model = lenet()
    apputils.load_lean_checkpoint(model, str(LENET_TEACHER))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    quantizer = DCQQuantizer(model, optimizer, weight_mode=mode)
    quantizer.prepare_model()
    quantizer.quantize_params()
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    apputils.save_checkpoint(0, "simplenet_mnist", model, dir=str(untrained))
    layers = write_report(str(LENET_TEACHER), str(untrained / "checkpoint.pth.tar"), str(tmp_path / "report0"))
    assert all(torch.equal(t["trained"], t["direct"]) for t in layers.values())  # nothing trained, nothing altered

    with torch.no_grad():  # one large step: some weights cross a threshold
        model.fc1.float_weight.add_(torch.randn_like(model.fc1.float_weight) * model.fc1.float_weight.abs().mean())
    quantizer.quantize_params()
    apputils.save_checkpoint(1, "simplenet_mnist", model, dir=str(tmp_path))
    out = tmp_path / "report1"
    argv = [str(LENET_TEACHER), str(tmp_path / "checkpoint.pth.tar"), "--out", str(out), "--layer", "conv2"]
    kernels_main(argv)  # the command line
    assert f"Made by `python -m distiller_dcq.report.kernels {' '.join(argv)}`" in (out / "kernels.md").read_text()
    layers = write_report(str(LENET_TEACHER), str(tmp_path / "checkpoint.pth.tar"), str(out), layer="conv2")
    altered = (layers["fc1"]["trained"] != layers["fc1"]["direct"]).float().mean().item()
    assert 0.05 < altered < 0.95 and torch.equal(layers["conv1"]["trained"], layers["conv1"]["direct"])
    table = (out / "kernels.md").read_text()
    assert f"| fc1 | 400000 | {int(altered * 400000 + 0.5)} | {altered:.4f} |" in table and f"({mode} weights)" in table
    assert (out / "altered_magnitudes.png").stat().st_size > 5000 and (out / "kernels_conv2.png").stat().st_size > 5000


def test_a_dcq_window_after_the_last_training_epoch_stops_the_run_before_training(tmp_path):
    schedule = write_schedule(tmp_path, "    boundaries: [pool1]\n")
    schedule.write_text(schedule.read_text().replace("instance_name: dcq\n    starting_epoch: 0\n    ending_epoch: 1",
                                                     "instance_name: dcq\n    starting_epoch: 3\n    ending_epoch: 4"))
    rc, log = run_compress_classifier(tmp_path, "--epochs", "2", "--compress", schedule, train_size="0.01")
    assert rc != 0 and "is scheduled for epochs 3-3, but training stops after epoch 1 (--epochs 2)" in log
    assert "Overall Loss" not in log
