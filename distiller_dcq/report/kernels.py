"""What quantization-aware training changed in the low-bit kernels (the paper's Fig. 3 and 4).

Given the FP checkpoint and a binary/ternary checkpoint trained from it (Distiller checkpoints),
for every quantized layer: the fraction of weights whose level ({-1,+1} or {-1,0,+1}) differs from
quantizing the FP weights directly; a histogram of the FP magnitudes of those altered weights; and
an image grid of one conv layer's kernels: FP / directly quantized / trained.

    python -m distiller_dcq.report.kernels FP.pth.tar QUANTIZED.pth.tar --out DIR [--layer conv1]
"""
import argparse
import os
import sys

import torch

from ..engine.quantizers import make_weight_quantizer


def _levels(q):
    return torch.sign(q)  # binary and ternary levels, whatever the scale


def weight_mode_of(checkpoint):
    """``binary`` or ``ternary`` (and the ternary threshold) from a quantized checkpoint's metadata."""
    metadata = checkpoint.get("quantizer_metadata")
    if not metadata:
        raise ValueError("the second checkpoint is not quantized (no quantizer_metadata): give the checkpoint of a "
                         "binary or ternary run")
    params = metadata["params"]
    mode = params.get("weight_mode") or {1: "binary"}.get(params.get("bits_weights"))
    if mode not in ("binary", "ternary"):
        raise ValueError(f"kernel diagnostics cover binary and ternary weights; this checkpoint has "
                         f"weight_mode={params.get('weight_mode')}, bits_weights={params.get('bits_weights')}")
    return mode, params.get("ternary_threshold", 0.7)


def kernel_changes(fp_state, q_checkpoint):
    """Per quantized layer: FP weights, directly quantized levels, trained levels."""
    mode, threshold = weight_mode_of(q_checkpoint)
    direct = make_weight_quantizer(mode, scale="none", **({"threshold": threshold} if mode == "ternary" else {}))
    q_state = q_checkpoint["state_dict"]
    layers = {}
    for key in q_state:
        if not key.endswith(".float_weight"):
            continue
        layer = key[:-len(".float_weight")]
        fp_key = layer + ".weight"
        if fp_key not in fp_state:
            raise ValueError(f"the FP checkpoint has no {fp_key}: give the FP checkpoint the quantized run started from")
        fp = fp_state[fp_key].float()
        layers[layer] = {"fp": fp, "direct": _levels(direct(fp)), "trained": _levels(q_state[fp_key].float())}
    if not layers:
        raise ValueError("no quantized layers (<layer>.float_weight) in the second checkpoint")
    return mode, layers


def write_report(fp_path, q_path, out_dir, layer=None):
    """Write ``kernels.md``, ``altered_magnitudes.png`` and ``kernels_<layer>.png`` into ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..adapter.checkpoints import load_distiller_checkpoint

    fp_state = {k.replace("module.", "", 1): v for k, v in load_distiller_checkpoint(fp_path)["state_dict"].items()}
    q_checkpoint = load_distiller_checkpoint(q_path)
    q_checkpoint["state_dict"] = {k.replace("module.", "", 1): v for k, v in q_checkpoint["state_dict"].items()}
    mode, layers = kernel_changes(fp_state, q_checkpoint)
    os.makedirs(out_dir, exist_ok=True)

    rows = ["| layer | weights | altered by training | altered fraction |", "|---|---|---|---|"]
    altered_magnitudes = {}
    for name, t in layers.items():
        altered = t["trained"] != t["direct"]
        altered_magnitudes[name] = t["fp"][altered].abs()
        rows.append(f"| {name} | {t['fp'].numel()} | {int(altered.sum())} | {altered.float().mean().item():.4f} |")
    with open(os.path.join(out_dir, "kernels.md"), "w") as f:
        f.write(f"# Kernel changes ({mode} weights)\n\nFP: `{fp_path}`  \nquantized: `{q_path}`\n\n"
                f"A weight is *altered* when its trained level differs from quantizing its FP value directly.\n\n"
                + "\n".join(rows) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, magnitudes in altered_magnitudes.items():
        if magnitudes.numel():
            ax.hist(magnitudes.numpy(), bins=50, histtype="step", density=True,
                    label=f"{name} ({magnitudes.numel()} altered)")
    ax.set(title=f"FP magnitude of the weights training altered ({mode})", xlabel="|FP weight|",
           ylabel="density, per layer", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "altered_magnitudes.png"), dpi=120)
    plt.close(fig)

    convs = [n for n, t in layers.items() if t["fp"].dim() == 4]
    layer = layer or (convs[0] if convs else None)
    if layer is not None:
        if layer not in convs:
            raise ValueError(f"no quantized conv layer {layer!r}; quantized conv layers: {', '.join(convs)}")
        _kernel_grid(plt, layers[layer], layer, mode, os.path.join(out_dir, f"kernels_{layer}.png"))
    return layers


def _kernel_grid(plt, t, layer, mode, path, count=16):
    kernels = min(count, t["fp"].shape[0])
    fig, axes = plt.subplots(3, kernels, figsize=(kernels * 0.8, 3), squeeze=False)
    for row, (label, weights) in enumerate([("FP", t["fp"]), ("direct", t["direct"]), ("trained", t["trained"])]):
        for k in range(kernels):
            ax = axes[row][k]
            ax.imshow(weights[k, 0].numpy(), cmap="coolwarm", vmin=-weights.abs().max().item(),
                      vmax=weights.abs().max().item())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(label)
    fig.suptitle(f"{layer}: first input channel of {kernels} kernels, FP / directly quantized / trained ({mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp_checkpoint")
    parser.add_argument("quantized_checkpoint")
    parser.add_argument("--out", required=True, help="directory for kernels.md and the PNGs")
    parser.add_argument("--layer", help="conv layer for the kernel grid (default: the first quantized conv)")
    args = parser.parse_args(argv)
    import distiller  # noqa: F401  (the checkpoints reference Distiller's classes)
    layers = write_report(args.fp_checkpoint, args.quantized_checkpoint, args.out, args.layer)
    with open(os.path.join(args.out, "kernels.md"), "a") as f:
        f.write(f"\nMade by `python -m distiller_dcq.report.kernels {' '.join(argv or sys.argv[1:])}` in "
                f"`{os.path.relpath(os.getcwd(), args.out)}` (relative to this file's folder).\n")
    print(f"{len(layers)} quantized layers; wrote {args.out}/kernels.md and PNGs")


if __name__ == "__main__":
    main()
