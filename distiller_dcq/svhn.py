"""SVHN (cropped digits) and the SVHN network of DoReFa-Net, in plain PyTorch.

Data: the official ``train_32x32.mat`` / ``test_32x32.mat`` (http://ufldl.stanford.edu/housenumbers/),
``X`` of shape 32x32x3xN (uint8) and ``y`` of shape Nx1 with the digit 0 stored as label 10.

Network: the one of DoReFa-Net's SVHN experiments, as published in tensorpack's
``examples/DoReFa-Net/svhn-digit-dorefa.py`` (Zhou et al. 2016): 40x40 inputs, seven conv layers
(the last one, 5x5 over a 5x5 map, acting as a 512-unit fully connected layer), BatchNorm after
every conv but the first, the activation min(1, |x|), dropout 0.5 before conv6, and fc1 to 10 classes.
"""
import hashlib
import os

import numpy as np
import torch.nn as nn
from torch.utils.data import Dataset

SVHN_FILES = {  # split -> (file name, size in bytes, md5), as published
    "train": ("train_32x32.mat", 182040794, "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("test_32x32.mat", 64275384, "eb5a983be6a315427106f1b164d9cef3"),
}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_INPUT_SIZE = 40  # DoReFa-Net resizes SVHN's 32x32 digits to 40x40


def verify_svhn_file(path, split):
    """Check a user's file against the official size and md5; the error says what to do."""
    name, size, md5 = SVHN_FILES[split]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SVHN {split} file {path} is missing: download {name} from {SVHN_URL} into "
                                f"{os.path.dirname(path) or '.'}")
    actual = os.path.getsize(path)
    if actual != size:
        raise ValueError(f"{path} has {actual} bytes, the official {name} has {size}: it is truncated or another "
                         f"file; download it again from {SVHN_URL}")
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != md5:
        raise ValueError(f"{path} has md5 {digest.hexdigest()}, the official {name} has {md5}: it is corrupt; "
                         f"download it again from {SVHN_URL}")


class SVHNDigits(Dataset):
    """SVHN cropped digits from ``<root>/<split>_32x32.mat``; labels 0-9 (the file's 10 is digit 0).

    ``verify`` checks the file against the official size and md5 first (turn it off only for
    files you made yourself, e.g. in tests)."""

    def __init__(self, root, split="train", transform=None, verify=True):
        if split not in SVHN_FILES:
            raise ValueError(f"unknown SVHN split {split!r}; choose one of: {', '.join(SVHN_FILES)}")
        path = os.path.join(root, SVHN_FILES[split][0])
        if verify:
            verify_svhn_file(path, split)
        from scipy.io import loadmat
        data = loadmat(path)
        self.images = np.ascontiguousarray(np.transpose(data["X"], (3, 0, 1, 2)))  # N x 32 x 32 x 3, uint8
        self.targets = (data["y"].reshape(-1).astype(np.int64) % 10).tolist()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        from PIL import Image
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


class ClippedAbs(nn.Module):
    """DoReFa-Net's SVHN activation, min(1, |x|)."""

    def forward(self, x):
        return x.abs().clamp(max=1.0)


def _conv_bn(name, c_in, c_out, kernel, padding):
    return [(f"conv{name}", nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=False)),
            (f"bn{name}", nn.BatchNorm2d(c_out, eps=1e-4, momentum=0.1))]


class SVHNDoReFaNet(nn.Module):
    """DoReFa-Net's SVHN network (tensorpack ``svhn-digit-dorefa.py``), full precision."""

    def __init__(self, num_classes=10):
        super().__init__()
        layers = [("conv0", nn.Conv2d(3, 48, 5)), ("pool0", nn.MaxPool2d(2, 2)), ("act0", ClippedAbs())]
        layers += _conv_bn(1, 48, 64, 3, 1) + [("act1", ClippedAbs())]
        layers += _conv_bn(2, 64, 64, 3, 1) + [("pool1", nn.MaxPool2d(2, 2)), ("act2", ClippedAbs())]
        layers += _conv_bn(3, 64, 128, 3, 0) + [("act3", ClippedAbs())]
        layers += _conv_bn(4, 128, 128, 3, 1) + [("act4", ClippedAbs())]
        layers += _conv_bn(5, 128, 128, 3, 0) + [("act5", ClippedAbs()), ("dropout", nn.Dropout(0.5))]
        layers += _conv_bn(6, 128, 512, 5, 0) + [("act6", ClippedAbs())]
        for name, module in layers:
            self.add_module(name, module)
        self.fc1 = nn.Linear(512, num_classes)

    def forward(self, x):
        for name, module in self.named_children():
            if name == "fc1":
                x = x.flatten(1)
            x = module(x)
        return x
