"""distiller_dcq.recalibrate against a real Distiller: a checkpoint's BatchNorm statistics re-estimated
on the run's own training images (a subset directory), the quantized weights untouched."""
import subprocess
import sys

import pytest
import torch

from distiller_env import import_distiller, unavailable
from conftest import LENET_TEACHER, ROOT, SHARED

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
