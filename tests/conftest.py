"""Shared fixtures: a LeNet with Distiller's simplenet_mnist module names, real MNIST slices, the FP teacher."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCQ_SHARED_DIR", ROOT.parent / "shared"))
MNIST_DIR = SHARED / "data" / "mnist"
LENET_TEACHER = SHARED / "teachers" / "simplenet_mnist_fp.pth.tar"


class LeNet(nn.Module):
    """Same modules, names and forward as Distiller's simplenet_mnist (without importing Distiller)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, 20, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(20, 50, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.fc1, self.relu3, self.fc2 = nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _require(path):
    if not path.exists():
        pytest.skip(f"{path} is missing: the tests read real data from ../shared (or DCQ_SHARED_DIR)")


@pytest.fixture(scope="session")
def mnist_test_set():
    """The 10,000 MNIST test images, normalised as Distiller's MNIST loader does."""
    _require(MNIST_DIR / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
    from torchvision import datasets, transforms
    data = datasets.MNIST(str(MNIST_DIR), train=False, download=False,
                          transform=transforms.Compose([transforms.ToTensor(),
                                                        transforms.Normalize((0.1307,), (0.3081,))]))
    images = torch.stack([data[i][0] for i in range(len(data))])
    return images, data.targets.clone()


@pytest.fixture(scope="session")
def teacher_state():
    _require(LENET_TEACHER)
    return torch.load(LENET_TEACHER, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture
def lenet_teacher(teacher_state):
    model = LeNet()
    model.load_state_dict(teacher_state)
    return model.eval()
