"""Data and networks for compress_classifier beyond Distiller's: fixed training subsets, CIFAR-10
stored as image folders, and SVHN with DoReFa-Net's SVHN network."""
import logging
import os

import torch
from torchvision import datasets, transforms

from ..subsets import balanced_indices, is_subset_dir, read_subset_dir
from ..svhn import SVHN_INPUT_SIZE, SVHNDigits, SVHNDoReFaNet
from ..synthesize import is_synthetic_dir, read_synthetic_dir, synthetic_images
from .compat import route

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


def patch_cifar10_image_folders(data_loaders, apputils):
    """Let ``--arch *_cifar DATA_DIR`` read CIFAR-10 from image folders; torchvision's layout is
    still read by Distiller's own loader."""
    route((data_loaders, apputils), "cifar10_get_datasets", lambda data_dir, *a, **k: is_image_folder_layout(data_dir),
          cifar10_image_folders)


# --- synthetic training images (distiller_dcq.synthesize) ------------------------------------------------

def patch_synthetic_dirs(data_loaders, apputils):
    """Let compress_classifier read a synthetic directory: its images are the training set, with the training
    transform of the real dataset it names; validation and test are that real dataset's, split as usual."""
    original = data_loaders.get_data_loaders

    def synthetic_data_loaders(datasets_fn, data_dir, batch_size, num_workers, *args, **kwargs):
        source, _, _ = read_synthetic_dir(data_dir)
        if not os.path.isdir(source):
            raise ValueError(f"{data_dir} takes its validation and test sets from {source}, which does not exist: "
                             f"synthesize again with --data naming the real dataset directory")
        train, valid, test, input_shape = original(datasets_fn, source, batch_size, num_workers, *args, **kwargs)
        if train is None:
            return train, valid, test, input_shape
        images = synthetic_images(data_dir, train.dataset.transform)
        logging.getLogger().info("Training set: the %d synthetic images of %s; validation and test sets: the real "
                                 "ones of %s", len(images), data_dir, source)
        sampler = data_loaders.SwitchingSubsetRandomSampler(list(range(len(images))),
                                                            kwargs.get("effective_train_size", 1.0))
        train = torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                            pin_memory=True, worker_init_fn=train.worker_init_fn)
        return train, valid, test, input_shape

    route((data_loaders, apputils), "get_data_loaders",
          lambda datasets_fn, data_dir, *a, **k: is_synthetic_dir(data_dir), synthetic_data_loaders)


# --- fixed training subsets (distiller_dcq.subsets) -------------------------------------------------------

def patch_subset_dirs(data_loaders, apputils):
    """Let compress_classifier read a subset directory: Distiller's loaders of its source dataset,
    with the training part cut down to the subset's fixed, class-balanced images."""
    original = data_loaders.get_data_loaders

    def subset_data_loaders(datasets_fn, data_dir, batch_size, num_workers, *args, **kwargs):
        source, size, seed, repeat = read_subset_dir(data_dir)
        if kwargs.get("effective_train_size", 1.0) != 1.0:
            raise ValueError(f"{data_dir} already fixes the training images ({size} of {source}): drop "
                             f"--effective-train-size")
        train, valid, test, input_shape = original(datasets_fn, source, batch_size, num_workers, *args, **kwargs)
        if train is None:
            return train, valid, test, input_shape
        targets = getattr(train.dataset, "targets", None)
        if targets is None:
            raise ValueError(f"{type(train.dataset).__name__} has no targets: subset directories need a dataset "
                             f"with per-image labels (MNIST, CIFAR-10, SVHN)")
        # train.sampler holds the training part's indices, validation already taken out as in a full run
        indices = balanced_indices(targets, list(train.sampler.data_source), size, seed)
        train = torch.utils.data.DataLoader(train.dataset, batch_size=batch_size,
                                            sampler=torch.utils.data.SubsetRandomSampler(indices * repeat),
                                            num_workers=num_workers, pin_memory=True,
                                            worker_init_fn=train.worker_init_fn)
        return train, valid, test, input_shape

    route((data_loaders, apputils), "get_data_loaders",
          lambda datasets_fn, data_dir, *a, **k: is_subset_dir(data_dir), subset_data_loaders)


# --- SVHN: a dataset and a network Distiller does not have ---------------------------------------------

SVHN = "svhn"
SVHN_MODELS = {"svhn_dorefa": SVHNDoReFaNet}


def svhn_get_datasets(data_dir, load_train=True, load_test=True, verify=True):
    """SVHN for Distiller's ``load_data`` (which splits train/validation as for every dataset):
    resized to 40x40 as in DoReFa-Net, pixels in [0, 1] (DoReFa-Net divides by 256). The files are
    checked against the official sizes and md5s unless ``verify=False``."""
    transform = transforms.Compose([transforms.Resize((SVHN_INPUT_SIZE, SVHN_INPUT_SIZE)), transforms.ToTensor()])
    return (SVHNDigits(data_dir, "train", transform, verify) if load_train else None,
            SVHNDigits(data_dir, "test", transform, verify) if load_test else None)


def _create_svhn_model(pretrained, arch, parallel, device_ids):
    import torch
    from distiller.utils import set_model_input_shape_attr
    if arch not in SVHN_MODELS:
        raise ValueError(f"no SVHN network named {arch!r}; SVHN networks: {', '.join(SVHN_MODELS)}")
    if pretrained:
        raise ValueError(f"there are no pretrained weights for {arch}: drop --pretrained")
    model = SVHN_MODELS[arch]()
    on_gpu = torch.cuda.is_available() and device_ids != -1
    if on_gpu and parallel:
        model = torch.nn.DataParallel(model, device_ids=device_ids)
    model.is_parallel = on_gpu and parallel
    set_model_input_shape_attr(model, input_shape=(1, 3, SVHN_INPUT_SIZE, SVHN_INPUT_SIZE))
    model.arch, model.dataset = arch, SVHN
    return model.to("cuda" if on_gpu else "cpu")


def register_svhn(data_loaders, apputils, models):
    """Teach Distiller the ``svhn`` dataset (inferred from ``--arch svhn_*``) and its networks.
    Functions are replaced where they are defined and where they are re-exported."""
    if SVHN in data_loaders.DATASETS_NAMES:
        return
    data_loaders.DATASETS_NAMES.append(SVHN)
    models.SUPPORTED_DATASETS = tuple(models.SUPPORTED_DATASETS) + (SVHN,)
    models.ALL_MODEL_NAMES.extend(sorted(SVHN_MODELS))

    loaders = (data_loaders, apputils)
    route(loaders, "classification_dataset_str_from_arch", lambda arch: SVHN in arch, lambda arch: SVHN)
    route(loaders, "classification_num_classes", lambda dataset: dataset == SVHN, lambda dataset: 10)
    route(loaders, "classification_get_input_shape", lambda dataset: dataset == SVHN,
          lambda dataset: (1, 3, SVHN_INPUT_SIZE, SVHN_INPUT_SIZE))
    route(loaders, "__dataset_factory", lambda dataset, arch: dataset == SVHN, lambda dataset, arch: svhn_get_datasets)
    route((models,), "create_model", lambda pretrained, dataset, arch, *a, **k: dataset.lower() == SVHN,
          lambda pretrained, dataset, arch, parallel=True, device_ids=None:
          _create_svhn_model(pretrained, arch, parallel, device_ids))
