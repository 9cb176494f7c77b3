"""Re-estimate a trained network's BatchNorm statistics on its own training images, and test it.

A quantized network's BatchNorm running statistics are moving averages taken while its weights still
moved (binary weights flip from step to step) or, in DCQ's section stage with ``mode: parallel`` or
``mixed``, while sections saw the teacher's activations instead of the quantized network's. One pass
over the training images with the final weights (training-mode forwards: no labels, no gradients,
no weight changes) re-estimates them. DCQ's ``recalibrate_bn`` does this at its merge; this command
does it for any Distiller checkpoint, a DoReFa or KD baseline's too:

    python -m distiller_dcq.recalibrate --arch resnet20_cifar DATA CHECKPOINT --seed 0 --save OUT

DATA, ``--vs``, ``--seed`` and ``--deterministic`` must be the run's: they decide which images are the
training part (a subset directory's N images) and which the validation set. Prints one JSON line:
validation and test top-1 before and after. A checkpoint or data directory that cannot be used is one
line on stderr naming it, exit status 2.
"""
import argparse
import itertools
import json
import os
import sys

import torch

from .report.runs import add_device_options, resolve_device


def load_quantized(arch, checkpoint, device):
    """(network, the checkpoint's contents) of a Distiller checkpoint, its quantizer rebuilt (safely:
    distiller_dcq's loader); a checkpoint that is missing, refused or not of ``arch`` is a ``ValueError``."""
    from .adapter.checkpoints import network_of_checkpoint, read_checkpoint
    saved = read_checkpoint(checkpoint)  # its own clear errors, before Distiller's
    return network_of_checkpoint(checkpoint, arch, device), saved


def run_loaders(arch, dataset, data_dir, seed, validation_split, effective_valid_size, batch_size,
                effective_test_size=1.0, deterministic=False, workers=0):
    """The training, validation and test loaders of a compress_classifier.py run with these options
    (its ``--deterministic`` reseeds to 0 before the split is drawn: so does this)."""
    import distiller
    from distiller.apputils import load_data
    if not os.path.isdir(data_dir):
        raise ValueError(f"data directory {data_dir!r} does not exist: give the run's dataset or subset directory")
    if not 0 <= validation_split < 1:
        raise ValueError(f"--vs is the run's validation fraction, in [0, 1), got {validation_split}")
    if deterministic:  # as compress_classifier.py seeds before it splits off the validation set
        distiller.set_deterministic(seed)
    else:
        distiller.set_seed(seed)
    try:
        train, valid, test, _ = load_data(dataset, arch, data_dir, batch_size, workers,
                                          validation_split=validation_split, deterministic=deterministic,
                                          effective_train_size=1.0, effective_valid_size=effective_valid_size,
                                          effective_test_size=effective_test_size)
    except Exception as err:  # a folder without the dataset: torchvision tries to download it, or finds no images
        raise ValueError(f"data directory {data_dir!r} holds no {dataset} dataset Distiller can read "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): give the run's "
                         f"dataset or subset directory") from err
    return train, valid, test


def top1(model, loader):
    device = next(model.parameters()).device
    model.eval()
    right = seen = 0
    with torch.no_grad():
        for inputs, targets in loader:
            right += (model(inputs.to(device)).argmax(1) == targets.to(device)).sum().item()
            seen += len(targets)
    return 100.0 * right / seen


def recalibrate(arch, data_dir, checkpoint, seed, validation_split=0.1, effective_valid_size=1.0, batch_size=128,
                train_batches=None, device="cpu", save=None, effective_test_size=1.0, test_before=True,
                deterministic=False, workers=0):
    """Top-1 of ``checkpoint``'s network before (if ``test_before``) and after re-estimating its BatchNorm
    statistics on one pass over the run's training images (its first ``train_batches`` batches, if
    given); ``save``: where to write the recalibrated checkpoint."""
    from .engine import recalibrate_batchnorm
    if train_batches is not None and (not isinstance(train_batches, int) or train_batches < 1):
        raise ValueError(f"train_batches is a number of training batches (>= 1), got {train_batches!r}")
    if save and not os.path.isdir(os.path.dirname(os.path.abspath(save))):
        raise ValueError(f"--save {save!r}: its directory does not exist")
    model, saved = load_quantized(arch, checkpoint, device)
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(f"{arch} has no BatchNorm layer: there are no statistics to re-estimate")
    train, valid, test = run_loaders(arch, model.dataset, data_dir, seed, validation_split, effective_valid_size,
                                     batch_size, effective_test_size, deterministic, workers)
    result = {"val_top1_before": top1(model, valid), "test_top1_before": top1(model, test)} if test_before else {}
    batches = [(inputs,) for inputs, _ in itertools.islice(train, train_batches)]
    recalibrate_batchnorm(model, batches)
    result.update(val_top1=top1(model, valid), test_top1=top1(model, test),
                  training_images=sum(len(inputs) for inputs, in batches))
    if save:
        saved["state_dict"] = model.state_dict()
        torch.save(saved, save)
    return model, result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m distiller_dcq.recalibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the run's dataset directory or subset directory")
    parser.add_argument("checkpoint", help="a Distiller checkpoint of the run (e.g. NAME_checkpoint.pth.tar)")
    parser.add_argument("--arch", "-a", required=True, help="the run's --arch")
    parser.add_argument("--seed", type=int, required=True, help="the run's --seed (it draws the validation set)")
    parser.add_argument("--deterministic", "--det", action="store_true",
                        help="the run used --deterministic (it changes which images are the validation set)")
    parser.add_argument("--vs", type=float, default=0.1, help="the run's --vs (default 0.1, Distiller's)")
    parser.add_argument("--effective-valid-size", type=float, default=1.0, help="part of the validation set to test")
    parser.add_argument("--effective-test-size", type=float, default=1.0, help="part of the test set to test")
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("--train-batches", type=int, help="re-estimate on this many training batches (default: "
                                                             "one pass over the training part)")
    add_device_options(parser, "the loaders")
    parser.add_argument("--skip-before", action="store_true", help="test only after (the run's log has before)")
    parser.add_argument("--save", help="write the network with its new statistics to this checkpoint file")
    args = parser.parse_args(argv)
    try:
        args.device, args.workers = resolve_device(args.device, args.workers)
        _, result = recalibrate(args.arch, args.data, args.checkpoint, args.seed, args.vs, args.effective_valid_size,
                                args.batch_size, args.train_batches, args.device, args.save, args.effective_test_size,
                                not args.skip_before, args.deterministic, args.workers)
    except (ValueError, OSError) as err:  # FileNotFoundError included
        print(f"{parser.prog}: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
