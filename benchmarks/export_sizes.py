"""What shipping a quantized network gains: file sizes and onnxruntime latency, FP against DCQ binary/ternary.

For each network: its FP teacher's checkpoint; a DCQ checkpoint as a run saves it (the teacher, the DCQ
schedule applied, one SGD step in Distiller's own loop, saved with its optimizer and schedule: FP copies,
quantized weights and momentum); that checkpoint exported packed and as ONNX; and the FP teacher exported as
ONNX the same way. Latency: median of 50 onnxruntime inferences on one CPU thread, FP and quantized ONNX one
after the other in this process, batch 1 and 64.

    PYTHONPATH=$DISTILLER_SRC python benchmarks/export_sizes.py --out benchmarks/results/export

Writes OUT/results.md and OUT/results.json (the checkpoints and exported files go to a temporary folder).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCQ_SHARED_DIR", REPO.parent / "shared"))
NETWORKS = {"simplenet_mnist": "LeNet/MNIST", "resnet20_cifar": "ResNet-20/CIFAR-10", "vgg11_bn_cifar": "VGG-11-BN/CIFAR-10"}


def dcq_checkpoint(arch, weights, folder):
    """The teacher with ``schedules/<arch>_dcq_<weights>.yaml`` applied, after one step of Distiller's loop."""
    import distiller
    from distiller import apputils
    from distiller.models import create_model
    model = create_model(False, "mnist" if arch == "simplenet_mnist" else "cifar10", arch, parallel=False,
                         device_ids=-1)
    apputils.load_lean_checkpoint(model, str(SHARED / "teachers" / f"{arch}_fp.pth.tar"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = distiller.file_config(model, optimizer, str(REPO / "schedules" / f"{arch}_dcq_{weights}.yaml"))
    scheduler.on_epoch_begin(0)
    scheduler.on_minibatch_begin(0, 0, 1, optimizer)
    model.train()
    images = torch.randn(8, *model.input_shape[1:])
    loss = torch.nn.functional.cross_entropy(model(images), torch.randint(0, 10, (8,)))
    loss = scheduler.before_backward_pass(0, 0, 1, loss, optimizer=optimizer, return_loss_components=False)
    loss.backward()
    scheduler.before_parameter_optimization(0, 0, 1, optimizer)
    optimizer.step()
    scheduler.on_minibatch_end(0, 0, 1, optimizer)
    name = f"{arch}_dcq_{weights}"
    apputils.save_checkpoint(0, arch, model, optimizer=optimizer, scheduler=scheduler, dir=str(folder), name=name)
    return folder / f"{name}_checkpoint.pth.tar"


def fp_onnx(arch, out):
    from distiller import apputils
    from distiller.models import create_model
    from distiller_dcq.export import _onnx
    model = create_model(False, "mnist" if arch == "simplenet_mnist" else "cifar10", arch, parallel=False,
                         device_ids=-1)
    apputils.load_lean_checkpoint(model, str(SHARED / "teachers" / f"{arch}_fp.pth.tar"))
    _onnx(model.eval(), model.input_shape, out)
    return model.input_shape


def kib(path):
    return round(os.path.getsize(path) / 1024, 1)


def main(argv=None):
    from distiller_dcq.export import export_onnx, export_packed, onnx_latency
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for arch in args.networks:
            row = {"network": NETWORKS[arch], "fp_checkpoint_kib": kib(SHARED / "teachers" / f"{arch}_fp.pth.tar")}
            for weights in ("binary", "ternary"):
                checkpoint = dcq_checkpoint(arch, weights, folder)
                export_packed(str(checkpoint), arch, str(folder / f"{arch}_{weights}.dcqpack"))
                export_onnx(str(checkpoint), arch, str(folder / f"{arch}_{weights}.onnx"))
                row.update({f"dcq_{weights}_checkpoint_kib": kib(checkpoint),
                            f"packed_{weights}_kib": kib(folder / f"{arch}_{weights}.dcqpack"),
                            f"onnx_{weights}_kib": kib(folder / f"{arch}_{weights}.onnx")})
            shape = fp_onnx(arch, folder / f"{arch}_fp.onnx")
            row["onnx_fp_kib"] = kib(folder / f"{arch}_fp.onnx")
            for batch in (1, 64):
                for kind in ("fp", "binary"):
                    row[f"latency_{kind}_batch{batch}_ms"] = round(
                        1000 * onnx_latency(str(folder / f"{arch}_{kind}.onnx"), shape, batch), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    import onnxruntime
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Shipping the quantized network: sizes and latency", "",
             f"Made by `PYTHONPATH=$DISTILLER_SRC python benchmarks/export_sizes.py --out {args.out}` on "
             f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, onnxruntime "
             f"{onnxruntime.__version__}, Python {platform.python_version()}.", "",
             "Sizes in KiB. DCQ checkpoint: what a run saves (FP copies, quantized weights, momentum, schedule). "
             "Packed: `python -m distiller_dcq.export CKPT --format packed` (1 bit per binary weight, 2 per "
             "ternary; BatchNorm, biases and the levels in float32).", "",
             "| network | FP checkpoint | DCQ binary checkpoint | packed binary | DCQ ternary checkpoint | packed "
             "ternary | ONNX FP | ONNX binary |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['fp_checkpoint_kib']} | {r['dcq_binary_checkpoint_kib']} | "
              f"**{r['packed_binary_kib']}** | {r['dcq_ternary_checkpoint_kib']} | **{r['packed_ternary_kib']}** | "
              f"{r['onnx_fp_kib']} | {r['onnx_binary_kib']} |" for r in rows]
    lines += ["", "onnxruntime on the CPU, one thread, median of 50 runs (ms), one measurement each: the binary "
              "network's ONNX holds float32 weights (levels x scale) and float convolutions, so it runs at the FP "
              "network's speed (the differences below are run-to-run noise); the gain is the file, not the "
              "runtime.", "",
              "| network | FP, batch 1 | binary, batch 1 | FP, batch 64 | binary, batch 64 |", "|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['latency_fp_batch1_ms']} | {r['latency_binary_batch1_ms']} | "
              f"{r['latency_fp_batch64_ms']} | {r['latency_binary_batch64_ms']} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    sys.exit(main())
