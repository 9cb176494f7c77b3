"""SVHN data and DoReFa-Net's SVHN network, on small .mat files the tests write."""
import copy

import numpy as np
import pytest
import torch

from distiller_dcq.engine import SectionWiring
from distiller_dcq.svhn import SVHN_FILES, SVHNDigits, SVHNDoReFaNet, verify_svhn_file

scipy_io = pytest.importorskip("scipy.io", reason="scipy reads SVHN's .mat files (pip install scipy)")


def write_svhn(root, split, labels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
    scipy_io.savemat(str(root / SVHN_FILES[split][0]), {"X": images, "y": np.array(labels).reshape(-1, 1)})
    return images


def test_digits_load_with_label_ten_meaning_zero(tmp_path):
    images = write_svhn(tmp_path, "test", [10, 1, 9, 10])
    data = SVHNDigits(str(tmp_path), "test", verify=False)
    assert len(data) == 4 and data.targets == [0, 1, 9, 0]
    image, label = data[2]
    assert label == 9 and np.array_equal(np.asarray(image), images[..., 2])


def test_a_file_that_is_not_the_official_one_is_named_with_the_fix(tmp_path):
    write_svhn(tmp_path, "train", [1, 2])
    with pytest.raises(ValueError, match=r"train_32x32.mat has \d+ bytes, the official train_32x32.mat has "
                                         r"182040794: .*download it again from http://ufldl.stanford.edu/housenumbers/"):
        SVHNDigits(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match=r"test file .*test_32x32.mat is missing: download test_32x32.mat"):
        verify_svhn_file(str(tmp_path / "test_32x32.mat"), "test")
    with pytest.raises(ValueError, match=r"unknown SVHN split 'extra'; choose one of: train, test"):
        SVHNDigits(str(tmp_path), "extra")


def test_the_dorefa_svhn_network_maps_40x40_digits_to_ten_classes_and_cuts_at_its_stages():
    model = SVHNDoReFaNet().eval()
    x = torch.rand(2, 3, 40, 40)
    assert model(x).shape == (2, 10)
    wiring = SectionWiring(model, copy.deepcopy(model), ["act2", "act5"], example_input=x[:1]).split()
    model.train()(x)
    losses = wiring.section_losses()
    assert list(losses) == ["act2", "act5", "output"] and all(torch.isfinite(v) for v in losses.values())
