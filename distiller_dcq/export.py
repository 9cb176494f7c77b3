"""Ship what was quantized: a Distiller checkpoint as a bit-packed file or as ONNX.

    python -m distiller_dcq.export CHECKPOINT --arch ARCH --out FILE --format packed|onnx [--force]
    python -m distiller_dcq.export CHECKPOINT --arch ARCH --out FILE --format onnx --verify DATA

The network is loaded as Distiller evaluates it (distiller_dcq's safe loader, the quantizer rebuilt):
its saved quantized weights are what is shipped. ``packed``: each quantized
weight tensor as indices into its few float32 values (1 bit a binary weight, 2 a ternary or 2-bit one),
every other tensor as it is (``distiller_dcq.engine.packing`` documents the format; ``load_packed``
rebuilds the network, its weights bit-identical). ``onnx``: a graph onnxruntime runs without Distiller
or this package, weights exactly the quantized ones, DoReFa/PACT activation quantization as Clip, Mul,
Round, Div. ``--verify DATA`` then runs the test set through onnxruntime and through the Distiller
network of the checkpoint and compares top-1 and logits. Needs Distiller; ONNX needs ``pip install
"distiller-dcq[export]"`` (onnx, onnxruntime).
"""
import argparse
import json
import os
import sys
import time
import warnings

import torch

from .engine.packing import MAX_CODE_BITS, ClippedActivation, read_packed, to_codes, write_packed

EXPORTABLE_QUANTIZERS = ("DCQQuantizer", "DorefaQuantizer", "PACTQuantizer", "WRPNQuantizer")
# what --verify accepts: top-1 within 0.05 points; logits within 1e-4 of each other, relative to the largest logit
# when it is above 1 (summation order differs between runtimes: bare-level networks have logits in the hundreds)
MAX_LOGIT_DIFFERENCE, MAX_TOP1_DIFFERENCE = 1e-4, 0.05


def quantized_network(checkpoint, arch, device="cpu"):
    """(network, quantizer) of a quantized Distiller checkpoint of ``arch``: refused (``ValueError``) when it
    has no quantizer, one the exporter does not know, or is of another arch."""
    from .adapter.checkpoints import network_of_checkpoint, read_checkpoint
    from .adapter.compat import RESTORED_QUANTIZER
    saved = read_checkpoint(checkpoint)
    if saved.get("arch") not in (None, arch):
        raise ValueError(f"checkpoint {checkpoint!r} is a {saved['arch']}, not --arch {arch}: give its own arch")
    metadata = saved.get("quantizer_metadata")
    if not metadata:
        raise ValueError(f"checkpoint {checkpoint!r} has no quantizer (an FP network?): export the checkpoint of "
                         f"a quantized run (a DCQ, DoReFa, PACT or WRPN schedule)")
    kind = metadata["type"].__name__
    if kind not in EXPORTABLE_QUANTIZERS:
        raise ValueError(f"checkpoint {checkpoint!r} was quantized by {kind}; the exporter knows "
                         f"{', '.join(EXPORTABLE_QUANTIZERS)}")
    model = network_of_checkpoint(checkpoint, arch, device)
    return model.eval(), getattr(model, RESTORED_QUANTIZER)  # the saved quantized weights: what Distiller evaluates


def deployable(model, quantizer):
    """(plain network, its state dict, meta): ``model``'s architecture with ordinary parameters holding the
    quantized weights and ``ClippedActivation`` in place of Distiller's activation quantizers; meta names
    the arch, the quantizer, each quantized tensor's bits and the activation quantizers. Unknown
    quantization modules, weights with more values than their bits allow and non-finite values are refused."""
    from distiller.models import create_model
    from distiller.quantization.clipped_linear import ClippedLinearQuantization, LearnedClippedLinearQuantization
    from distiller.quantization.q_utils import asymmetric_linear_quantization_params
    inner = getattr(model, "module", model)
    plain = create_model(False, model.dataset, model.arch, parallel=False, device_ids=-1)
    activations = {}
    for name, module in inner.named_modules():
        if isinstance(module, (ClippedLinearQuantization, LearnedClippedLinearQuantization)):
            clip = torch.as_tensor(module.clip_val, dtype=torch.float32).detach().cpu().reshape(-1)[0]
            scale, zero_point = asymmetric_linear_quantization_params(module.num_bits, 0, clip, signed=False)
            _replace(plain, name, ClippedActivation(clip, scale, zero_point))
            activations[name] = {"bits": module.num_bits, "clip_val": float(clip)}
        elif type(module).__module__.startswith("distiller.quantization"):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, which the exporter does not know (it "
                             f"knows Distiller's clipped activation quantizers and quantized weights)")
    quantized = {f"{p.module_name}.{p.q_attr_name}": p.num_bits for p in quantizer.params_to_quantize}
    for param in quantizer.params_to_quantize:
        name, bits = f"{param.module_name}.{param.q_attr_name}", param.num_bits
        if bits <= MAX_CODE_BITS:
            try:
                to_codes(getattr(param.module, param.q_attr_name), bits)
            except ValueError as err:
                raise ValueError(f"{name} {err}: the checkpoint was saved inside a training window (AdaRound's soft "
                                 f"choices, a wider stage of progressive precision)? export the run's last "
                                 f"checkpoint") from err
    weights = {}
    for name, tensor in inner.state_dict().items():
        module, _, attribute = name.rpartition(".")
        if module in activations or attribute.startswith("float_") and \
                f"{module}.{attribute[len('float_'):]}".lstrip(".") in quantized:
            continue  # an activation quantizer's own numbers (set above), or the FP copy of a quantized tensor
        weights[name] = tensor.detach().cpu()
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k.rpartition(".")[0] not in activations]:
        raise ValueError(f"the checkpoint's network does not fit {model.arch}: missing {missing}, unexpected "
                         f"{unexpected}")
    state = plain.state_dict()
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{', '.join(bad)} hold NaN or infinite values: the run diverged; export an earlier "
                         f"checkpoint")
    meta = {"arch": model.arch, "dataset": model.dataset, "quantizer": type(quantizer).__name__,
            "activations": activations, "quantized": quantized}
    return plain.eval(), state, meta


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _refuse_existing(out, force, checkpoint):
    if os.path.exists(out) and os.path.samefile(out, checkpoint):
        raise ValueError(f"--out {out!r} is the checkpoint itself: give another --out")
    if os.path.exists(out) and not force:
        raise ValueError(f"{out!r} exists: give --force to overwrite it, or another --out")


def export_packed(checkpoint, arch, out, force=False):
    """Write ``checkpoint``'s quantized network to ``out`` in the packed format; returns its meta."""
    _refuse_existing(out, force, checkpoint)
    model, quantizer = quantized_network(checkpoint, arch)
    _, state, meta = deployable(model, quantizer)
    write_packed(out, meta, state, meta["quantized"])
    return meta


def load_packed(path):
    """The network a packed file holds (Distiller's ``arch``, the weights bit-identical to the exported ones)."""
    from distiller.models import create_model
    meta, state = read_packed(path)
    model = create_model(False, meta["dataset"], meta["arch"], parallel=False, device_ids=-1)
    for name in meta["activations"]:
        _replace(model, name, ClippedActivation())
    model.load_state_dict(state)
    return model.eval()


def export_onnx(checkpoint, arch, out, force=False):
    """Write ``checkpoint``'s quantized network to ``out`` as ONNX (input ``input``, output ``logits``, any
    batch size); returns its meta."""
    _refuse_existing(out, force, checkpoint)
    model, quantizer = quantized_network(checkpoint, arch)
    plain, _, meta = deployable(model, quantizer)
    _onnx(plain, model.input_shape, out)
    return meta


def _onnx(model, input_shape, out):
    example = torch.zeros(1, *input_shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; it needs no onnxscript
        torch.onnx.export(model, (example,), out, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=False)  # folding would merge BatchNorm into the quantized weights


def test_loader(arch, data_dir, batch_size=256, effective_test_size=1.0):
    """Distiller's test loader of ``arch``'s dataset in ``data_dir``; a ``ValueError`` naming it if it cannot be."""
    from distiller.apputils import classification_dataset_str_from_arch, load_data
    if not 0 < effective_test_size <= 1:
        raise ValueError(f"--effective-test-size is a fraction of the test set in (0, 1], got {effective_test_size}")
    if not os.path.isdir(data_dir):
        raise ValueError(f"data directory {data_dir!r} does not exist: give the dataset directory of --arch {arch}")
    dataset = classification_dataset_str_from_arch(arch)
    try:
        return load_data(dataset, arch, data_dir, batch_size, 0, effective_test_size=effective_test_size,
                         test_only=True)[2]
    except Exception as err:
        raise ValueError(f"data directory {data_dir!r} holds no {dataset} test set Distiller can read "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def verify_onnx(checkpoint, arch, onnx_path, data_dir, batch_size=256, effective_test_size=1.0, test=None):
    """Top-1 of the test set (``test``: a loader, else ``data_dir``'s) through onnxruntime and through the
    Distiller network of ``checkpoint``, and the largest logit difference between them."""
    import onnxruntime
    model, _ = quantized_network(checkpoint, arch)
    test = test or test_loader(arch, data_dir, batch_size, effective_test_size)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    right = {"distiller": 0, "onnxruntime": 0}
    seen, largest, magnitude = 0, 0.0, 1.0
    with torch.no_grad():
        for images, labels in test:
            ours = model(images)
            theirs = torch.from_numpy(session.run(["logits"], {"input": images.numpy()})[0])
            largest = max(largest, (ours - theirs).abs().max().item())
            magnitude = max(magnitude, ours.abs().max().item())
            right["distiller"] += (ours.argmax(1) == labels).sum().item()
            right["onnxruntime"] += (theirs.argmax(1) == labels).sum().item()
            seen += len(labels)
    top1 = {k: 100.0 * v / seen for k, v in right.items()}
    return {"images": seen, "top1_distiller": top1["distiller"], "top1_onnxruntime": top1["onnxruntime"],
            "max_logit_difference": largest, "max_logit": magnitude,
            "agree": abs(top1["distiller"] - top1["onnxruntime"]) <= MAX_TOP1_DIFFERENCE
            and largest <= MAX_LOGIT_DIFFERENCE * magnitude}


def onnx_latency(onnx_path, input_shape, batch, repeats=50):
    """Median seconds of one onnxruntime inference on the CPU (one thread) of a batch of random inputs."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    feed = {"input": torch.randn(batch, *input_shape[1:]).numpy()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m distiller_dcq.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a Distiller checkpoint of a quantized run")
    parser.add_argument("--arch", "-a", required=True, help="the run's --arch")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--format", choices=("packed", "onnx"), required=True)
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--verify", metavar="DATA", help="onnx: compare with Distiller's network on DATA's test set")
    parser.add_argument("--effective-test-size", type=float, default=1.0, help="part of the test set to verify on")
    args = parser.parse_args(argv)
    try:
        if args.verify and args.format != "onnx":
            raise ValueError("--verify compares onnxruntime with Distiller: it needs --format onnx")
        if args.verify:
            __import__("onnxruntime")  # before anything is written, as the test set is
        test = test_loader(args.arch, args.verify, effective_test_size=args.effective_test_size) if args.verify \
            else None
        export = export_onnx if args.format == "onnx" else export_packed
        meta = export(args.checkpoint, args.arch, args.out, args.force)
        result = {"out": args.out, "bytes": os.path.getsize(args.out), "checkpoint_bytes":
                  os.path.getsize(args.checkpoint), "quantized_tensors": len(meta["quantized"]),
                  "activation_quantizers": len(meta["activations"])}
        if args.verify:
            result.update(verify_onnx(args.checkpoint, args.arch, args.out, args.verify, test=test))
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        sys.exit(2)
    except ImportError as err:
        print(f"{parser.prog}: {err.name or err} is not installed: pip install \"distiller-dcq[export]\"",
              file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    if args.verify and not result["agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
