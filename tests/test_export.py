"""distiller_dcq.export against a real Distiller: checkpoints of every schedule family, made here, shipped as
bit-packed files (rebuilt bit for bit) and as ONNX that onnxruntime runs with Distiller's top-1 and logits;
every refusal."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import LENET_TEACHER, MNIST_DIR, ROOT, SHARED
from distiller_env import import_distiller, train_epochs, unavailable

distiller = import_distiller()
from distiller import apputils  # noqa: E402
from distiller.models import create_model  # noqa: E402

from distiller_dcq import export  # noqa: E402
from distiller_dcq.adapter.checkpoints import load_distiller_checkpoint  # noqa: E402

SCHEDULES = ROOT / "schedules"
RESNET_TEACHER = SHARED / "teachers" / "resnet20_cifar_fp.pth.tar"
CIFAR = SHARED / "data" / "cifar10-jpeg"
FAMILIES = {  # schedule -> epochs to train (a window must end within them)
    "simplenet_mnist_dcq_binary.yaml": 1, "simplenet_mnist_dcq_binary_unscaled.yaml": 1,
    "simplenet_mnist_dcq_ternary.yaml": 1, "simplenet_mnist_dorefa_binary.yaml": 1,
    "simplenet_mnist_dorefa_w2a2.yaml": 1, "simplenet_mnist_dcq_w2a2.yaml": 1,
    "simplenet_mnist_stochastic_binary.yaml": 1, "simplenet_mnist_progressive_w2a2.yaml": 6,
    "simplenet_mnist_dcq_binary_adaround_labelfree.yaml": 2,
}


def trained_checkpoint(tmp_path, monkeypatch, schedule, arch="simplenet_mnist", teacher=LENET_TEACHER, text=None,
                       epochs=None, validate=False):
    """A checkpoint of ``schedule`` after a few minibatches of Distiller's own loop, from the FP teacher;
    ``validate``: an evaluation-mode forward after each epoch, as compress_classifier validates before saving."""
    if not teacher.exists():
        unavailable(f"{teacher} is missing")
    model = create_model(False, "mnist" if arch == "simplenet_mnist" else "cifar10", arch, parallel=False,
                         device_ids=-1)
    apputils.load_lean_checkpoint(model, str(teacher))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    path = SCHEDULES / schedule
    if text is not None:
        path = tmp_path / schedule
        path.write_text(text)
    scheduler = distiller.file_config(model, optimizer, str(path))
    def validation(epoch, when):
        if validate and when == "end":
            with torch.no_grad():
                model.eval()(torch.randn(4, *model.input_shape[1:]))
    train_epochs(model, optimizer, scheduler, range(epochs or FAMILIES.get(schedule, 1)), monkeypatch, batches=2,
                 on_epoch=validation)
    apputils.save_checkpoint(0, arch, model, optimizer=optimizer, scheduler=scheduler, dir=str(tmp_path), name="run")
    return tmp_path / "run_checkpoint.pth.tar"


def adaround_in_two_epochs(schedule):
    """The LeNet AdaRound schedule with its section stage and window over epochs 0-1."""
    return (SCHEDULES / schedule).read_text().replace("ending_epoch: 1\n", "ending_epoch: 2\n").replace(
        "starting_epoch: 1\n", "starting_epoch: 2\n")


@pytest.mark.parametrize("schedule", FAMILIES)
def test_every_family_ships_packed_bit_for_bit_and_as_onnx_with_distillers_top1_and_logits(tmp_path, monkeypatch,
                                                                                           schedule):
    pytest.importorskip("onnxruntime", reason="pip install \".[export]\"")
    text = adaround_in_two_epochs(schedule) if "adaround" in schedule else None
    checkpoint = trained_checkpoint(tmp_path, monkeypatch, schedule, text=text)
    model, quantizer = export.quantized_network(str(checkpoint), "simplenet_mnist")
    _, state, meta = export.deployable(model, quantizer)
    assert set(meta["quantized"]) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert bool(meta["activations"]) == ("a2" in schedule or "w2a2" in schedule)

    export.export_packed(str(checkpoint), "simplenet_mnist", str(tmp_path / "net.dcqpack"))
    rebuilt = export.load_packed(str(tmp_path / "net.dcqpack"))
    assert all(torch.equal(tensor, rebuilt.state_dict()[name]) for name, tensor in state.items())
    for param in quantizer.params_to_quantize:  # the checkpoint's quantized weights, bit for bit
        assert torch.equal(getattr(param.module, param.q_attr_name), rebuilt.get_submodule(param.module_name).weight)
    images = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(images), rebuilt(images))  # the same network: Distiller's modules or ours
    bits = {1: 1, 2: 2}[max(meta["quantized"].values())]
    weights = sum(state[name].numel() for name in meta["quantized"])
    assert (tmp_path / "net.dcqpack").stat().st_size < weights * bits / 8 + 40_000  # + biases, levels, header

    export.export_onnx(str(checkpoint), "simplenet_mnist", str(tmp_path / "net.onnx"))
    agreement = export.verify_onnx(str(checkpoint), "simplenet_mnist", str(tmp_path / "net.onnx"), str(MNIST_DIR),
                                   effective_test_size=0.05)
    assert agreement["images"] == 500 and agreement["agree"], agreement


def test_a_resnet_with_batchnorm_ships_both_ways(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="pip install \".[export]\"")
    if not (CIFAR / "test").is_dir():
        unavailable(f"{CIFAR} is missing")
    checkpoint = trained_checkpoint(tmp_path, monkeypatch, "resnet20_cifar_dcq_binary.yaml", arch="resnet20_cifar",
                                    teacher=RESNET_TEACHER)
    export.export_packed(str(checkpoint), "resnet20_cifar", str(tmp_path / "net.dcqpack"))
    model, quantizer = export.quantized_network(str(checkpoint), "resnet20_cifar")
    _, state, meta = export.deployable(model, quantizer)
    rebuilt = export.load_packed(str(tmp_path / "net.dcqpack"))
    assert len(meta["quantized"]) == 22 and all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in state.items())
    assert (tmp_path / "net.dcqpack").stat().st_size < checkpoint.stat().st_size / 12
    export.export_onnx(str(checkpoint), "resnet20_cifar", str(tmp_path / "net.onnx"))
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(tmp_path / "net.onnx")).graph
    assert sum(node.op_type == "BatchNormalization" for node in graph.node) == 21  # not folded into the weights
    initializers = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    assert torch.equal(initializers["conv1.weight"], state["conv1.weight"])  # exactly the quantized weights
    assert initializers["layer2.0.conv1.weight"].unique().numel() == 2
    agreement = export.verify_onnx(str(checkpoint), "resnet20_cifar", str(tmp_path / "net.onnx"), str(CIFAR),
                                   effective_test_size=0.02)
    assert agreement["images"] == 200 and agreement["agree"], agreement


def test_a_checkpoint_saved_inside_a_window_ships_what_distiller_evaluates_or_is_refused(tmp_path, monkeypatch):
    """Found by review: re-quantizing the FP weights shipped another network than the checkpoint's. Inside
    AdaRound's window compress_classifier saves after validation, which puts the hard choices in place: those
    are shipped. A progressive-precision run saved in its 8-bit stage has no 2-bit weights to ship: refused."""
    schedule = "simplenet_mnist_dcq_binary_adaround_labelfree.yaml"
    checkpoint = trained_checkpoint(tmp_path, monkeypatch, schedule, text=adaround_in_two_epochs(schedule), epochs=1,
                                    validate=True)
    distillers, _ = export.quantized_network(str(checkpoint), "simplenet_mnist")
    export.export_packed(str(checkpoint), "simplenet_mnist", str(tmp_path / "net.dcqpack"))
    rebuilt, images = export.load_packed(str(tmp_path / "net.dcqpack")), torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(distillers(images), rebuilt(images))
    (tmp_path / "p").mkdir()
    checkpoint = trained_checkpoint(tmp_path / "p", monkeypatch, "simplenet_mnist_progressive_w2a2.yaml", epochs=1)
    with pytest.raises(ValueError, match=r"conv1.weight holds \d+ distinct values .*: not 2-bit weights: the "
                                         r"checkpoint was saved inside a training window"):
        export.export_packed(str(checkpoint), "simplenet_mnist", str(tmp_path / "net2.dcqpack"))
    assert not (tmp_path / "net2.dcqpack").exists()


def test_tensors_wider_than_8_bits_are_stored_as_they_are(tmp_path, monkeypatch):
    """Found by review: a 32-bit DoReFa bias went through 8-bit codes and came back wrong."""
    text = (SCHEDULES / "simplenet_mnist_dorefa_binary.yaml").read_text().replace(
        "bits_bias: null\n", "bits_bias: 32\n")
    assert "bits_bias: 32" in text
    checkpoint = trained_checkpoint(tmp_path, monkeypatch, "dorefa_bias32.yaml", text=text)
    model, quantizer = export.quantized_network(str(checkpoint), "simplenet_mnist")
    _, state, meta = export.deployable(model, quantizer)
    assert meta["quantized"]["fc1.bias"] == 32
    export.export_packed(str(checkpoint), "simplenet_mnist", str(tmp_path / "net.dcqpack"))
    rebuilt = export.load_packed(str(tmp_path / "net.dcqpack"))
    assert all(torch.equal(tensor, rebuilt.state_dict()[name]) for name, tensor in state.items())


def run_export(*args):
    done = subprocess.run([sys.executable, "-m", "distiller_dcq.export", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


def test_the_command_writes_and_verifies_and_refuses_to_overwrite(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="pip install \".[export]\"")
    checkpoint = trained_checkpoint(tmp_path, monkeypatch, "simplenet_mnist_dcq_binary.yaml")
    out = tmp_path / "net.onnx"
    rc, stdout, stderr = run_export(checkpoint, "--arch", "simplenet_mnist", "--out", out, "--format", "onnx",
                                    "--verify", MNIST_DIR, "--effective-test-size", "0.02")
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["agree"] and result["images"] == 200 and result["quantized_tensors"] == 4
    rc, _, stderr = run_export(checkpoint, "--arch", "simplenet_mnist", "--out", out, "--format", "onnx")
    assert rc == 2 and stderr.strip() == f"python -m distiller_dcq.export: {str(out)!r} exists: give --force to " \
                                         f"overwrite it, or another --out"
    rc, stdout, _ = run_export(checkpoint, "--arch", "simplenet_mnist", "--out", out, "--format", "onnx", "--force")
    assert rc == 0 and json.loads(stdout)["bytes"] == out.stat().st_size


def _qat_checkpoint(tmp_path):
    from distiller.quantization import QuantAwareTrainRangeLinearQuantizer
    model = create_model(False, "mnist", "simplenet_mnist", parallel=False, device_ids=-1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    QuantAwareTrainRangeLinearQuantizer(model, optimizer, bits_weights=4, quantize_inputs=False).prepare_model()
    apputils.save_checkpoint(0, "simplenet_mnist", model, optimizer=optimizer, dir=str(tmp_path), name="qat")
    return tmp_path / "qat_checkpoint.pth.tar"


def _nan_checkpoint(tmp_path, monkeypatch):
    checkpoint = trained_checkpoint(tmp_path, monkeypatch, "simplenet_mnist_dcq_binary.yaml")
    saved = load_distiller_checkpoint(str(checkpoint))  # the allow-list: class references come back as classes
    saved["state_dict"]["fc2.bias"][3] = float("nan")
    torch.save(saved, checkpoint)
    return checkpoint


@pytest.mark.parametrize("case, message", [
    ("fp", "has no quantizer (an FP network?): export the checkpoint of a quantized run"),
    ("qat", "was quantized by QuantAwareTrainRangeLinearQuantizer; the exporter knows DCQQuantizer"),
    ("arch", "is a simplenet_mnist, not --arch resnet20_cifar: give its own arch"),
    ("nan", "fc2.bias hold NaN or infinite values: the run diverged"),
    ("verify-packed", "--verify compares onnxruntime with Distiller: it needs --format onnx"),
    ("missing", "does not exist or is not a file"),
    ("verify-nowhere", "data directory '/nowhere' does not exist: give the dataset directory of --arch"),
])
def test_what_cannot_be_exported_is_one_line_naming_the_fix(tmp_path, monkeypatch, case, message):
    checkpoint, arch, extra = LENET_TEACHER, "simplenet_mnist", []
    if case == "qat":
        checkpoint = _qat_checkpoint(tmp_path)
    elif case == "arch":
        checkpoint, arch = trained_checkpoint(tmp_path, monkeypatch, "simplenet_mnist_dcq_binary.yaml"), "resnet20_cifar"
    elif case == "nan":
        checkpoint = _nan_checkpoint(tmp_path, monkeypatch)
    elif case == "verify-packed":
        extra = ["--verify", MNIST_DIR]
    elif case == "missing":
        checkpoint = tmp_path / "nowhere.pth.tar"
    elif case == "verify-nowhere":
        pytest.importorskip("onnxruntime", reason="pip install \".[export]\"")
        checkpoint = trained_checkpoint(tmp_path, monkeypatch, "simplenet_mnist_dcq_binary.yaml")
        extra = ["--verify", "/nowhere"]
    fmt = "onnx" if case == "verify-nowhere" else "packed"
    rc, _, stderr = run_export(checkpoint, "--arch", arch, "--out", tmp_path / "out", "--format", fmt, *extra)
    assert rc == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_packed_is_refused_by_the_loader(tmp_path):
    (tmp_path / "x.dcqpack").write_bytes(b"not packed")
    with pytest.raises(ValueError, match="is not a distiller-dcq packed file"):
        export.load_packed(str(tmp_path / "x.dcqpack"))
