"""Quick start, where DCQ earns its place: a binary LeNet from 60 MNIST images, without their labels.

With all the labelled data, DCQ ties plain quantization-aware training (examples/quickstart.py). With
few images it does not: each section learns to reproduce the FP teacher's activations, thousands of
numbers per image, where cross-entropy gets one label per image. Three methods, from the same FP
teacher, the same class-balanced 60 training images (6 per class), the same optimizer steps:

- QAT with labels: the whole binary network on cross-entropy (the few-shot study's best baseline at
  N = 60: DoReFa with labels);
- KD without labels: the whole binary network on the teacher's logits (KL at temperature 4);
- DCQ without labels: the 4 sections all at once against the teacher's activations (MSE), each section's
  input drawn element by element from the teacher's or the binary network's (QDrop's mix), then the
  merged network on the teacher's logits, as KD.

    python examples/quickstart_fewshot.py [--images 60] [--steps 300]

Needs torch, torchvision and distiller_dcq (no Distiller); data and teacher as examples/quickstart.py.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import BOUNDARIES, LR, MOMENTUM, accuracy, load_mnist, load_teacher, resolve_inputs  # noqa: E402

from distiller_dcq.engine import BinaryWeights, SectionWiring, quantize_weights_  # noqa: E402

SECTION_SHARE = 0.4  # of all steps, for DCQ's section stage (as the few-shot study's schedules)
TEMPERATURE = 4.0
METHODS = {"QAT, labels": "labels", "KD, no labels": "logits", "DCQ, no labels": "sections"}


def balanced_subset(labels, per_class, seed):
    """Indices of ``per_class`` training images of each class, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    picked = [torch.nonzero(labels == c).flatten() for c in range(10)]
    return torch.cat([idx[torch.randperm(len(idx), generator=generator)[:per_class]] for idx in picked])


def kd_loss(student_logits, teacher_logits):
    return F.kl_div(F.log_softmax(student_logits / TEMPERATURE, 1), F.softmax(teacher_logits / TEMPERATURE, 1),
                    reduction="batchmean") * TEMPERATURE ** 2


def train(method, student, teacher, images, labels, steps):
    """``steps`` full-batch steps on the few images with ``method``'s loss; the seconds they took."""
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    section_steps = int(steps * SECTION_SHARE) if METHODS[method] == "sections" else 0
    wiring = None
    if section_steps:
        wiring = SectionWiring(student, teacher, BOUNDARIES, example_input=images[:1], loss="mse",
                               section_inputs="mixed").split()
    with torch.no_grad():
        teacher_logits = teacher(images)
    start = time.perf_counter()
    for step in range(steps):
        if wiring is not None and step == section_steps:
            wiring.merge()  # one ordinary binary network again, distilled on the teacher's logits
            wiring = None
        out = student.train()(images)
        if wiring is not None:
            loss = sum(wiring.section_losses().values())
        elif METHODS[method] == "labels":
            loss = F.cross_entropy(out, labels)
        else:
            loss = kd_loss(out, teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="MNIST folder in torchvision's layout (default: ../shared/data/mnist)")
    parser.add_argument("--teacher", type=Path,
                        help="FP LeNet checkpoint (default: ../shared/teachers/simplenet_mnist_fp.pth.tar)")
    parser.add_argument("--images", type=int, default=60, help="training images, a multiple of 10 (default 60)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.images < 10 or args.images % 10:
        parser.error("--images is a multiple of 10 (the same number of each digit)")
    if int(args.steps * SECTION_SHARE) < 1:
        parser.error("--steps must be at least 3: DCQ's section stage needs a step")

    download = resolve_inputs(args)
    all_images, all_labels = load_mnist(args.data, train=True, download=download)
    test = tuple(t.to(args.device) for t in load_mnist(args.data, train=False, download=download))
    teacher = load_teacher(args, (all_images.to(args.device), all_labels.to(args.device)), args.device)
    subset = balanced_subset(all_labels, args.images // 10, args.seed)
    images, labels = all_images[subset].to(args.device), all_labels[subset].to(args.device)
    print(f"FP teacher: test top-1 {accuracy(teacher, *test):.2f}%. Each method: {args.images} training images "
          f"({args.images // 10} of each digit), {args.steps} steps on all of them at once, on {args.device}")

    results = {}
    for method in METHODS:
        torch.manual_seed(args.seed)
        student = copy.deepcopy(teacher)
        quantize_weights_(student, BinaryWeights(scale="layer"))  # every conv/linear, first and last included
        seconds = train(method, student, copy.deepcopy(teacher), images, labels, args.steps)
        results[method] = accuracy(student, *test), seconds
        print(f"  {method:<16} test top-1 {results[method][0]:6.2f}%   ({seconds:.1f} s)")

    best_baseline = max((m for m in METHODS if m != "DCQ, no labels"), key=lambda m: results[m][0])
    gap = results["DCQ, no labels"][0] - results[best_baseline][0]
    print(f"\nWhat this shows: from {args.images} images and no labels, DCQ's binary LeNet tests "
          f"{results['DCQ, no labels'][0]:.2f}%, {abs(gap):.2f} points {'above' if gap >= 0 else 'below'} the best "
          f"baseline ({best_baseline}, {results[best_baseline][0]:.2f}%), which "
          f"{'had the labels' if METHODS[best_baseline] == 'labels' else 'had no labels either'}. Each section "
          f"matches the teacher's activations, many numbers per image, where the baselines get one label or one "
          f"output vector per image. One seed on the whole test set; the few-shot study (README, 'When to use "
          f"DCQ') has three.")


if __name__ == "__main__":
    main()
