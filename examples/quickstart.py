"""Quick start: DCQ vs plain quantization-aware training (QAT), binary LeNet on MNIST, plain PyTorch.

Both methods start from the same full-precision (FP) teacher, quantize every conv/linear layer to
binary weights sign(w) x mean|w| (what Distiller's 1-bit DoReFa does), and train for the same number
of steps with the same optimizer, learning-rate schedule and batches:

- QAT: the whole binary network on the labels (cross-entropy), gradients straight through;
- DCQ: the binary network cut into 4 sections; each section in turn learns to reproduce the
  teacher's activation at its end (MSE), from the already-trained binary sections before it
  (sequential mode); then the merged network is fine-tuned on the labels.

    python examples/quickstart.py [--steps 600] [--out quickstart.png]

Needs torch, torchvision, matplotlib and distiller_dcq (no Distiller). Data and teacher come from
../shared next to the repository unless --data / --teacher say otherwise.
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from distiller_dcq.engine import BinaryWeights, SectionWiring, quantize_weights_

SHARED = Path(os.environ.get("DCQ_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared"))
BOUNDARIES = ["pool1", "pool2", "relu3"]  # sections end after each weighted layer's activation
SECTIONS = BOUNDARIES + ["output"]  # the last section ends at the logits
SECTION_SHARE = 0.4  # of all steps, for DCQ's section stage (split evenly over the sections)
LR, MOMENTUM = 0.01, 0.9  # as the LeNet schedules in schedules/


class LeNet(nn.Module):
    """Distiller's simplenet_mnist: same module names, so its checkpoints load."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, 20, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(20, 50, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.fc1, self.relu3, self.fc2 = nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def load_mnist(root, train, download=False):
    """MNIST as two tensors, normalised as Distiller's loader does; a clear error if it is missing."""
    from torchvision import datasets
    try:
        data = datasets.MNIST(str(root), train=train, download=download)
    except Exception as err:  # torchvision: RuntimeError without the files, URLError etc. when offline
        how = "downloading it failed" if download else "it is not there"
        sys.exit(f"error: no MNIST at {root} ({how}: {err}).\nGive --data DIR, a folder holding torchvision's "
                 f"layout DIR/MNIST/raw/*-ubyte (e.g. ../shared/data/mnist).")
    images = (data.data.float().div(255).unsqueeze(1) - 0.1307) / 0.3081
    return images, data.targets


def batches(n, batch_size, seed):
    """Endless minibatch indices, reshuffled every epoch; the same sequence for both methods."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        yield from order[:n - n % batch_size].split(batch_size)


@torch.no_grad()
def accuracy(model, images, labels):
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in zip(images.split(1000), labels.split(1000)))
    return 100.0 * correct / len(labels)


def show_progress(method, step, total, stage, loss):
    """One status line, rewritten in place on a terminal (every 10% otherwise)."""
    if sys.stdout.isatty() or step % max(1, total // 10) == 0 or step == total:
        bar = "#" * (20 * step // total)
        print(f"\r{method:>4} [{bar:<20}] step {step}/{total}  {stage:<16} loss {loss:.4f}",
              end="\n" if step == total or not sys.stdout.isatty() else "", flush=True)


def train(method, student, teacher, data, test, args):
    """Train ``student`` in place with ``method`` ('QAT' or 'DCQ'); return [(step, test top-1)] and seconds spent."""
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    # the stages: (name, steps, section trained or None for cross-entropy on the whole network)
    stages = [("cross-entropy", args.steps, None)]
    if method == "DCQ":
        per_section = int(args.steps * SECTION_SHARE) // len(SECTIONS)
        stages = [(f"section {s}", per_section, s) for s in SECTIONS]
        stages.append(("fine-tune", args.steps - per_section * len(SECTIONS), None))
        wiring = SectionWiring(student, teacher, BOUNDARIES, example_input=test[0][:1], loss="mse",
                               section_inputs="student").split()
    images, labels = data
    order = batches(len(labels), args.batch_size, args.seed)
    curve, step, seconds = [(0, accuracy(student, *test))], 0, 0.0
    for stage, stage_steps, section in stages:
        if method == "DCQ":
            if section is None:
                wiring.merge()  # one ordinary binary network again, fine-tuned on the labels
            else:
                wiring.train_sections([section])  # the others are frozen
        for _ in range(stage_steps):
            start = time.perf_counter()
            idx = next(order)
            x, y = images[idx], labels[idx]
            out = student.train()(x)
            loss = F.cross_entropy(out, y) if section is None else sum(wiring.section_losses().values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            seconds += time.perf_counter() - start  # training time only, evaluation excluded
            step += 1
            show_progress(method, step, args.steps, stage, loss.item())
            if step % args.eval_every == 0:
                curve.append((step, accuracy(student, *test)))  # eval mode: always the stitched network
        if curve[-1][0] != step:  # and at the end of every stage
            curve.append((step, accuracy(student, *test)))
    return curve, seconds


def load_teacher(args, data, device):
    teacher = LeNet().to(device)
    if args.teacher is not None:
        state = torch.load(args.teacher, map_location=device, weights_only=True)
        state = state.get("state_dict", state)  # a Distiller checkpoint, or a bare state_dict
        teacher.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        return teacher.eval()
    print(f"no --teacher and none in {SHARED}/teachers: training an FP teacher for an epoch on all training images")
    images, labels = data
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    for idx in torch.randperm(len(labels)).split(64):
        loss = F.cross_entropy(teacher.train()(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval()


def resolve_inputs(args):
    """Fill in --data and --teacher from ../shared; without either, download MNIST (and train a teacher)."""
    download = False
    if args.data is None:
        args.data = SHARED / "data" / "mnist"
        if not (args.data / "MNIST" / "raw").is_dir():
            args.data, download = Path("data") / "mnist", True
            print(f"no --data and no {SHARED}/data/mnist: downloading MNIST into {args.data.resolve()}")
    if args.teacher is None and (SHARED / "teachers" / "simplenet_mnist_fp.pth.tar").is_file():
        args.teacher = SHARED / "teachers" / "simplenet_mnist_fp.pth.tar"
    if args.teacher is not None and not Path(args.teacher).is_file():
        sys.exit(f"error: no teacher checkpoint at {args.teacher}")
    return download


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        help="MNIST folder in torchvision's layout (default: ../shared/data/mnist)")
    parser.add_argument("--teacher", type=Path,
                        help="FP LeNet checkpoint (default: ../shared/teachers/simplenet_mnist_fp.pth.tar)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=10000, help="training images used (of 60,000)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between test evaluations (default: steps/6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("quickstart.png"), help="where to write the plot")
    args = parser.parse_args(argv)
    args.eval_every = args.eval_every or max(1, args.steps // 6)
    if int(args.steps * SECTION_SHARE) < len(SECTIONS):
        parser.error(f"--steps must be at least {round(len(SECTIONS) / SECTION_SHARE)}: DCQ needs a step per section")
    if not 0 < args.batch_size <= args.train_size:
        parser.error("--batch-size must be between 1 and --train-size")

    torch.manual_seed(args.seed)
    download = resolve_inputs(args)
    images, labels = load_mnist(args.data, train=True, download=download)
    test = tuple(t.to(args.device) for t in load_mnist(args.data, train=False, download=download))
    teacher = load_teacher(args, (images.to(args.device), labels.to(args.device)), args.device)
    subset = torch.randperm(len(labels))[:args.train_size]
    data = (images[subset].to(args.device), labels[subset].to(args.device))
    print(f"FP teacher: test top-1 {accuracy(teacher, *test):.2f}%; {len(subset)} training images, "
          f"{args.steps} steps x {args.batch_size} per method on {args.device}")

    results = {}
    for method in ("QAT", "DCQ"):
        torch.manual_seed(args.seed)
        student = copy.deepcopy(teacher)
        quantize_weights_(student, BinaryWeights(scale="layer"))  # every conv/linear, first and last included
        results[method] = train(method, student, copy.deepcopy(teacher), data, test, args)

    print(f"\n{'method':<8}{'start top-1':>12}{'test top-1':>12}{'train time':>12}")
    for method, (curve, seconds) in results.items():
        print(f"{method:<8}{curve[0][1]:>11.2f}%{curve[-1][1]:>11.2f}%{seconds:>11.1f}s")
    print("(start: the teacher's weights binarized; test top-1 on all 10,000 test images after the last step; "
          "train time excludes evaluation)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, (curve, _) in results.items():
        ax.plot(*zip(*curve), marker="o", label=method)
    merge = int(args.steps * SECTION_SHARE) // len(SECTIONS) * len(SECTIONS)
    ax.axvline(merge, color="grey", linestyle=":", label="DCQ: sections merged")
    ax.set(xlabel="optimizer step", ylabel="test top-1 (%)", title="Binary LeNet on MNIST, from the same FP teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
