"""Datasets for compress_classifier beyond what Distiller reads: CIFAR-10 stored as image folders."""
import functools
import os

from torchvision import datasets, transforms

from .compat import _is_patched, _mark

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Distiller's CIFAR-10 pipeline (distiller.apputils.data_loaders.cifar10_get_datasets), unchanged.
_NORMALIZE = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CIFAR10_TRAIN_TRANSFORM = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                              transforms.ToTensor(), _NORMALIZE])
CIFAR10_TEST_TRANSFORM = transforms.Compose([transforms.ToTensor(), _NORMALIZE])


def is_image_folder_layout(data_dir):
    """``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (torchvision's ImageFolder)."""
    return all(os.path.isdir(os.path.join(data_dir, split)) and
               any(e.is_dir() for e in os.scandir(os.path.join(data_dir, split))) for split in ("train", "test"))


def cifar10_image_folders(data_dir, load_train=True, load_test=True):
    """CIFAR-10 from image folders, with Distiller's transforms; class folders must be CIFAR-10's."""
    def folder(split, transform):
        dataset = datasets.ImageFolder(os.path.join(data_dir, split), transform=transform)
        if dataset.classes != CIFAR10_CLASSES:
            raise ValueError(f"{os.path.join(data_dir, split)} has class folders {dataset.classes}; CIFAR-10 in "
                             f"image folders needs exactly {CIFAR10_CLASSES} (they sort into CIFAR-10's label order)")
        return dataset
    return (folder("train", CIFAR10_TRAIN_TRANSFORM) if load_train else None,
            folder("test", CIFAR10_TEST_TRANSFORM) if load_test else None)


def patch_cifar10_image_folders(data_loaders):
    """Let ``--arch *_cifar DATA_DIR`` read CIFAR-10 from image folders; torchvision's layout is
    still read by Distiller's own loader."""
    if _is_patched(data_loaders.cifar10_get_datasets):
        return
    original = data_loaders.cifar10_get_datasets

    @functools.wraps(original)
    def cifar10_get_datasets(data_dir, load_train=True, load_test=True):
        if is_image_folder_layout(data_dir):
            return cifar10_image_folders(data_dir, load_train, load_test)
        return original(data_dir, load_train, load_test)

    data_loaders.cifar10_get_datasets = _mark(cifar10_get_datasets)
