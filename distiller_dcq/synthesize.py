"""Synthesize training images from an FP teacher alone, for data-free quantization.

    python -m distiller_dcq.synthesize --arch resnet20_cifar --teacher FP.pth.tar --images 512 \\
        --data ../shared/data/cifar10-jpeg --out synthetic_512

Images are optimized from noise until the batch statistics at every BatchNorm layer of the teacher match
its running statistics (``distiller_dcq.engine.synthesis``; ``--set KEY=VALUE`` changes a key). ``--out``
becomes a *synthetic directory*: ``train/<class>/*.png``, each image under the class the teacher predicts,
and ``synthetic.json``. Given to compress_classifier.py (or ``distiller_dcq.subsets``) as the dataset
directory, its images are the training set, while the validation and test sets are the real ones of
``--data``, split as in a run on ``--data`` itself (same ``--vs``, same ``--seed``): no image of ``--data``
is trained on, and none of its training images is read at all with ``--vs 0`` (Distiller then validates on
the test set). Networks without BatchNorm (LeNet) are refused: they hold no statistics of their data.
"""
import argparse
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .engine.synthesis import SynthesisConfig, predicted_classes, synthesize
from .subsets import is_subset_dir

MANIFEST = "synthetic.json"
IMAGES = "train"
STAGING = ".synthesizing-"  # a directory inside --out where a run writes before it swaps its images in
QUANTIZED_VALUES = 16  # a Conv/Linear weight tensor with this few distinct values is a quantized one


def is_synthetic_dir(data_dir):
    return os.path.isfile(os.path.join(data_dir, MANIFEST))


def read_synthetic_dir(data_dir):
    """(real dataset directory, images directory, image channels) of a synthetic directory."""
    manifest = json.loads(Path(data_dir, MANIFEST).read_text())
    return (os.path.normpath(os.path.join(data_dir, manifest["source"])), os.path.join(data_dir, IMAGES),
            manifest["channels"])


def open_image(path, mode):
    from PIL import Image
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def synthetic_images(data_dir, transform):
    """The images of a synthetic directory as an ImageFolder (targets: the teacher's classes)."""
    from torchvision import datasets
    _, images, channels = read_synthetic_dir(data_dir)
    return datasets.ImageFolder(images, transform=transform, allow_empty=True,
                                loader=functools.partial(open_image, mode="L" if channels == 1 else "RGB"))


def class_folder(index, num_classes):
    """A class's folder name; zero-padded, so that ImageFolder's sorted order is the class order."""
    return f"{index:0{len(str(num_classes - 1))}d}"


def load_teacher(arch, teacher, device):
    """The FP teacher of ``arch`` in ``teacher``; refused (``ValueError``): an unknown arch, a checkpoint of
    another arch or of a quantized network, a network without BatchNorm."""
    import distiller.models
    from .adapter.checkpoints import network_of_checkpoint, read_checkpoint
    if arch not in distiller.models.ALL_MODEL_NAMES:
        raise ValueError(f"--arch {arch!r} is not a network Distiller knows (distiller.models.ALL_MODEL_NAMES)")
    saved = read_checkpoint(teacher)
    if saved.get("arch") not in (None, arch):
        raise ValueError(f"{teacher!r} is a {saved['arch']} checkpoint, not --arch {arch}: give {arch}'s FP teacher")
    if saved.get("quantizer_metadata"):
        raise ValueError(f"{teacher!r} is a quantized network ({saved['quantizer_metadata'].get('type')}): "
                         f"synthesis matches an FP teacher's statistics; give the FP checkpoint the quantized "
                         f"run started from")
    model = network_of_checkpoint(teacher, arch, device)
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) or module.weight.numel() <= QUANTIZED_VALUES:
            continue
        values = module.weight.unique().numel()
        if values <= QUANTIZED_VALUES:
            raise ValueError(f"{teacher!r}: the weights of {name} take {values} values, those of a quantized "
                             f"network; give the FP teacher")
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(f"{arch} has no BatchNorm layer: its weights hold no statistics of its training data to "
                         f"synthesize images from; quantize it from a few real images instead (report.fewshot)")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def input_space(arch, data_dir):
    """(input shape, number of classes, (mean, std) per channel) of ``arch``'s real dataset in ``data_dir``,
    read from its test transform: the synthetic images are kept to what its pixels can be."""
    from distiller.apputils import classification_dataset_str_from_arch, classification_num_classes
    from torchvision import transforms
    from .export import test_loader
    dataset = test_loader(arch, data_dir).dataset
    shape = tuple(dataset[0][0].shape)
    transform = getattr(dataset, "transform", None)
    normalize = [t for t in getattr(transform, "transforms", [transform]) if isinstance(t, transforms.Normalize)]
    mean, std = (torch.as_tensor(normalize[0].mean, dtype=torch.float32), torch.as_tensor(
        normalize[0].std, dtype=torch.float32)) if normalize else (torch.zeros(1), torch.ones(1))
    channels = shape[0]
    return shape, classification_num_classes(classification_dataset_str_from_arch(arch)), \
        (mean.expand(channels).clone(), std.expand(channels).clone())


def to_pixels(images, mean, std):
    """8-bit pixels (as PNG stores them) of images in the network's input space: image x std + mean."""
    return (images * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1).mul(255).round().to(torch.uint8)


def write_images(pixels, classes, out, num_classes):
    """PNG files ``out/train/<class>/<index>.png``."""
    from PIL import Image
    for c in range(num_classes):
        os.makedirs(os.path.join(out, IMAGES, class_folder(c, num_classes)), exist_ok=True)
    for i, (image, cls) in enumerate(zip(pixels, classes)):
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(
            os.path.join(out, IMAGES, class_folder(cls, num_classes), f"{i:06d}.png"))


def save_grid(data_dir, out, per_class=10):
    """A PNG of a synthetic directory's images: one row per class (in class order), its first ``per_class``
    images (a class with fewer: blank)."""
    from torchvision import transforms
    from torchvision.utils import save_image
    images = synthetic_images(data_dir, transforms.ToTensor())
    shape = images[0][0].shape
    rows = [[i for i, target in enumerate(images.targets) if target == c][:per_class]  # decode only these
            for c in range(len(images.classes))]
    tiles = [images[row[k]][0] if k < len(row) else torch.ones(shape) for row in rows for k in range(per_class)]
    save_image(torch.stack(tiles), out, nrow=per_class, padding=1, pad_value=1.0)


def _check_out(out, force):
    """Refuse an ``--out`` that holds anything but a synthetic directory (and an unfinished run's staging
    directory), and a synthetic one without ``force``."""
    if os.path.exists(out) and (not os.path.isdir(out) or
                                any(not entry.startswith(STAGING) for entry in os.listdir(out))):
        if not is_synthetic_dir(out):
            raise ValueError(f"--out {out!r} exists and is not a synthetic directory: give a new or empty directory")
        if not force:
            raise ValueError(f"--out {out!r} already holds synthetic images: --force replaces them")


def _swap_in(staging, out):
    """Move the images and manifest written in ``staging`` (inside ``out``) into ``out``: the old images are
    renamed aside first and deleted last, so that no step deletes a set before the new one is in place."""
    old = os.path.join(staging, "replaced")
    if os.path.lexists(os.path.join(out, IMAGES)):
        os.replace(os.path.join(out, IMAGES), old)
    os.replace(os.path.join(staging, IMAGES), os.path.join(out, IMAGES))
    os.replace(os.path.join(staging, MANIFEST), os.path.join(out, MANIFEST))


def make_synthetic_dir(arch, teacher, count, data_dir, out, config=SynthesisConfig(), seed=0, device="cpu",
                       force=False, log=None):
    """Synthesize ``count`` images from ``teacher`` and write ``out`` as a synthetic directory whose validation
    and test sets are ``data_dir``'s; returns its manifest."""
    if count < config.batch_size or count % config.batch_size:
        raise ValueError(f"--images {count}: images are made in batches of {config.batch_size} (the batch whose "
                         f"statistics are matched), so ask for a multiple of it, or --set batch_size=...")
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data {data_dir!r} does not exist: give the real dataset directory (its validation and "
                         f"test sets are the runs')")
    if is_synthetic_dir(data_dir) or is_subset_dir(data_dir):
        raise ValueError(f"--data {data_dir!r} is a {'synthetic' if is_synthetic_dir(data_dir) else 'subset'} "
                         f"directory: give the real dataset directory it comes from")
    _check_out(out, force)
    model = load_teacher(arch, teacher, device)
    shape, num_classes, (mean, std) = input_space(arch, data_dir)
    pixel_range = ((0 - mean) / std, (1 - mean) / std)
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING, dir=out)  # inside --out: its filesystem, made before the hours of work
    try:
        started = time.time()
        images, aimed, errors = synthesize(model, count, shape, pixel_range, num_classes, config, seed, log)
        pixels = to_pixels(images, mean, std)
        # each image's class: the teacher's prediction of what training will read, the 8-bit image normalized again
        classes = predicted_classes(model, (pixels / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
        per_layer = {name: max(batch[name] for batch in errors) for name in errors[0]}
        manifest = {"source": os.path.relpath(os.path.abspath(data_dir), os.path.abspath(out)), "channels": shape[0],
                    "arch": arch, "teacher": os.path.basename(teacher), "teacher_sha256": file_sha256(teacher),
                    "images": count, "seed": seed, "device": device,
                    "config": config.as_dict(), "seconds": round(time.time() - started),
                    "images_per_class": [classes.count(c) for c in range(num_classes)],
                    # with no class term the classes aimed at mean nothing
                    "predicted_as_aimed": sum(a == c for a, c in zip(aimed, classes)) / count if config.class_weight
                    else None,
                    "statistics_error_max": max(per_layer.values()), "statistics_error_per_layer": per_layer}
        write_images(pixels, classes, staging, num_classes)
        Path(staging, MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for entry in os.listdir(out):  # what runs killed before the swap left
        if entry.startswith(STAGING):
            shutil.rmtree(os.path.join(out, entry), ignore_errors=True)
    return manifest


def file_sha256(path):
    """The SHA-256 of a file's bytes (the teacher a synthetic directory was made from, whatever its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None):
    from .report.runs import DEVICES, resolve_device
    parser = argparse.ArgumentParser(prog="python -m distiller_dcq.synthesize", description=__doc__.split("\n\n")[0],
                                     epilog="keys of --set (defaults): " + ", ".join(
                                         f"{k}={v}" for k, v in SynthesisConfig().as_dict().items()))
    parser.add_argument("--arch", "-a", required=True, help="the teacher's Distiller --arch")
    parser.add_argument("--teacher", required=True, help="the FP teacher's Distiller checkpoint")
    parser.add_argument("--images", type=int, required=True, help="how many images (a multiple of batch_size)")
    parser.add_argument("--data", required=True, help="the real dataset directory: the runs' validation and test "
                                                      "sets, and its pixel range and classes (no training image "
                                                      "of it is read)")
    parser.add_argument("--out", required=True, help="the synthetic directory to write")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (on the CPU; CUDA's kernels "
                                                             "may differ from run to run)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="synthesis keys (see below)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto (default): cuda when torch sees a GPU")
    parser.add_argument("--force", action="store_true", help="replace the images of an existing synthetic directory")
    args = parser.parse_args(argv)
    try:
        try:
            config = SynthesisConfig.from_pairs(args.set)
        except ValueError as err:
            raise ValueError(f"--set {err}") from None
        device, _ = resolve_device(args.device, 0)
        manifest = make_synthetic_dir(args.arch, args.teacher, args.images, args.data, args.out, config, args.seed,
                                      device, args.force, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.images} images to {os.path.join(args.out, IMAGES)} in {manifest['seconds']} s "
          f"(per class, as the teacher predicts them: {manifest['images_per_class']}"
          + (f"; {100 * manifest['predicted_as_aimed']:.1f}% of the class each aimed at"
             if manifest["predicted_as_aimed"] is not None else "") + "); worst BatchNorm statistics "
          f"error {manifest['statistics_error_max']:.3f}. Validation and test sets: the real ones of {args.data}. "
          f"Give {args.out} to compress_classifier.py as the dataset directory.")


if __name__ == "__main__":
    main()
