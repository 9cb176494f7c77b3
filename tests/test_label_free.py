"""Label-free schedules read no label: garbage training labels give bit-identical weights (compress_classifier)."""
import os
import struct

import numpy as np
import pytest
import torch

from conftest import LENET_TEACHER, MNIST_DIR, ROOT
from distiller_env import import_distiller, run_compress_classifier

import_distiller()
from distiller_dcq.adapter.checkpoints import load_distiller_checkpoint  # noqa: E402

SCHEDULES = ROOT / "schedules"


def mnist_with_garbage_training_labels(tmp_path):
    """MNIST whose 60,000 training labels are random; the images and the test set are the real ones."""
    raw = tmp_path / "garbage_mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir(MNIST_DIR / "MNIST" / "raw"):
        if name != "train-labels-idx1-ubyte" and not name.endswith(".gz"):
            (raw / name).symlink_to(MNIST_DIR / "MNIST" / "raw" / name)
    labels = np.random.default_rng(0).integers(0, 10, 60000, dtype=np.uint8)
    (raw / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 60000) + labels.tobytes())
    return raw.parents[1]


def final_weights(out_dir):
    checkpoint = max(out_dir.glob("*/checkpoint.pth.tar"), key=os.path.getmtime)
    return load_distiller_checkpoint(str(checkpoint))["state_dict"]


def two_epochs(tmp_path, name, schedule, data_dir):
    args = ["--epochs", "2", "--compress", SCHEDULES / schedule, "--deterministic", "--exp-load-weights-from",
            LENET_TEACHER]
    rc, log = run_compress_classifier(tmp_path / name, *args, train_size="0.01", data_dir=data_dir)
    assert rc == 0, log[-3000:]
    return final_weights(tmp_path / name)


@pytest.mark.parametrize("schedule, reads_labels", [("simplenet_mnist_dcq_binary_labelfree.yaml", False),
                                                    ("simplenet_mnist_kd_binary_labelfree.yaml", False),
                                                    ("simplenet_mnist_dcq_binary_kd.yaml", True)])
def test_garbage_labels_change_nothing_in_a_label_free_run(tmp_path, schedule, reads_labels):
    garbage = mnist_with_garbage_training_labels(tmp_path)
    real, scrambled = (two_epochs(tmp_path, name, schedule, data) for name, data in (("real", MNIST_DIR),
                                                                                     ("garbage", garbage)))
    assert real.keys() == scrambled.keys()
    identical = all(torch.equal(real[k], scrambled[k]) for k in real)
    assert identical != reads_labels  # the same schedule with label_weight 1 does see the garbage
