"""Fixed, class-balanced training subsets of N images, for few-shot runs of compress_classifier.py.

Distiller's ``--effective-train-size`` draws a new random part of the training set every epoch, so
it cannot say "train on these 512 images". A *subset directory* can: it holds only ``subset.json``
(the dataset directory it draws from, N and a seed) and is given to compress_classifier.py in place
of the dataset directory. Distiller then splits the source's training set into training and
validation parts exactly as for the full run (same ``--vs``, same ``--seed``: the same validation and
test sets), and the training part is cut down to N images, N/C of each of the C classes (a class with
fewer gives its share to the others), drawn with
the subset's seed; every epoch goes over those N images in a new order, ``--repeat`` K times each
(so that few-shot runs keep a schedule's epochs and its number of steps: N x K images per epoch).

    python -m distiller_dcq.subsets ../shared/data/mnist --size 300 --seed 0 --out mnist_300
    python compress_classifier.py --arch simplenet_mnist mnist_300 ...
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np

MANIFEST = "subset.json"


def is_subset_dir(data_dir):
    return os.path.isfile(os.path.join(data_dir, MANIFEST))


def write_subset_dir(source, size, seed, out, repeat=1):
    """Make ``out`` a subset directory of ``size`` training images of the dataset in ``source``, each
    seen ``repeat`` times per epoch."""
    if not os.path.isdir(source):
        raise ValueError(f"dataset directory {source!r} does not exist")
    if is_subset_dir(source):
        raise ValueError(f"{source!r} is itself a subset directory: give the dataset directory it draws from")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"the subset size is a number of images >= 1, got {size!r}")
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat is how many times per epoch each image is seen (>= 1), got {repeat!r}")
    os.makedirs(out, exist_ok=True)
    manifest = {"source": os.path.relpath(os.path.abspath(source), os.path.abspath(out)), "size": size, "seed": seed,
                "repeat": repeat}
    Path(out, MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_subset_dir(data_dir):
    """(source directory, size, seed, repeat) of a subset directory; the source path is relative to it."""
    manifest = json.loads(Path(data_dir, MANIFEST).read_text())
    return (os.path.normpath(os.path.join(data_dir, manifest["source"])), manifest["size"], manifest["seed"],
            manifest.get("repeat", 1))


def balanced_indices(labels, candidates, size, seed):
    """``size`` of the ``candidates`` (dataset indices), as many of each class as possible (the
    remainder of size / classes goes to classes drawn at random; a class with too few images gives
    its share to the others), drawn with ``seed``."""
    labels, candidates = np.asarray(labels), np.asarray(candidates)
    if size > len(candidates):
        raise ValueError(f"a subset of {size} images needs more than the {len(candidates)} of the training part: "
                         f"ask for fewer images")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[candidates])
    per_class = np.full(len(classes), size // len(classes))
    per_class[rng.choice(len(classes), size % len(classes), replace=False)] += 1
    available = np.array([np.sum(labels[candidates] == cls) for cls in classes])
    while np.any(per_class > available):  # a short class (a synthetic directory's, say): the others make up for it
        per_class = np.minimum(per_class, available)
        room = np.flatnonzero(per_class < available)
        short = size - per_class.sum()
        extra = np.full(len(room), short // len(room))
        extra[rng.choice(len(room), short % len(room), replace=False)] += 1
        per_class[room] += extra
    chosen = []
    for cls, count in zip(classes, per_class):
        chosen += rng.choice(candidates[labels[candidates] == cls], count, replace=False).tolist()
    return sorted(chosen)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m distiller_dcq.subsets", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the dataset directory (as given to compress_classifier.py)")
    parser.add_argument("--size", type=int, required=True, help="number of training images")
    parser.add_argument("--seed", type=int, default=0, help="which images (default 0)")
    parser.add_argument("--repeat", type=int, default=1, help="times each image is seen per epoch (default 1)")
    parser.add_argument("--out", required=True, help="the subset directory to write")
    args = parser.parse_args(argv)
    try:
        write_subset_dir(args.source, args.size, args.seed, args.out, args.repeat)
    except ValueError as err:
        parser.error(str(err))
    print(f"{args.out}: {args.size} training images of {args.source} (seed {args.seed}), {args.repeat} time(s) "
          f"each per epoch; give it to "
          f"compress_classifier.py as the dataset directory")


if __name__ == "__main__":
    main()
