"""Loading a checkpoint never runs code from it, and loads what Distiller really saves (real Distiller)."""
import collections
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from distiller_env import import_distiller

distiller = import_distiller()
from distiller import apputils  # noqa: E402
from distiller.models import create_model  # noqa: E402
from distiller.quantization.range_linear import PostTrainLinearQuantizer  # noqa: E402

from distiller_dcq.adapter import DCQQuantizer  # noqa: E402
from distiller_dcq.adapter.checkpoints import load_distiller_checkpoint  # noqa: E402


def lenet():
    return create_model(False, "mnist", "simplenet_mnist", parallel=False, device_ids=-1)


def evil_stats_file(tmp_path):
    """A YAML file that runs a shell command when read with PyYAML's unsafe loader (Distiller's)."""
    marker = tmp_path / "pwned"
    stats = tmp_path / "stats.yaml"
    stats.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    return stats, marker


class FakeModel:
    """Unpickles as an OrderedDict whose ``named_modules`` is ``OrderedDict``: enough of a model for
    ``Quantizer.__init__``, built from globals that torch allows by default."""

    def __reduce__(self):
        return collections.OrderedDict, (), {"named_modules": collections.OrderedDict}


class CallsPostTrainQuantizer:
    """Unpickles by calling PostTrainLinearQuantizer, which reads the YAML file named by its 9th argument."""

    def __init__(self, stats):
        self.stats = str(stats)

    def __reduce__(self):
        return PostTrainLinearQuantizer, (FakeModel(), 8, 8, 32, None, "SYMMETRIC", "NONE", False, self.stats)


def test_a_checkpoint_that_calls_an_allowed_quantizer_class_runs_no_code(tmp_path):
    stats, marker = evil_stats_file(tmp_path)
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "arch": "simplenet_mnist", "x": CallsPostTrainQuantizer(stats)}, path)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_distiller_checkpoint(str(path))
    with pytest.raises(Exception):
        apputils.load_checkpoint(lenet(), str(path))
    assert not marker.exists()


def test_a_checkpoint_whose_quantizer_metadata_names_a_file_reading_quantizer_runs_no_code(tmp_path):
    stats, marker = evil_stats_file(tmp_path)
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": lenet().state_dict(), "arch": "simplenet_mnist",
                "quantizer_metadata": {"type": PostTrainLinearQuantizer, "dummy_input": None,
                                       "params": {"model_activation_stats": str(stats)}}}, path)
    with pytest.raises(Exception, match="PostTrainLinearQuantizer"):
        apputils.load_checkpoint(lenet(), str(path))  # Distiller would call the class with these params
    assert not marker.exists()


class CraftedDtype:
    """Unpickles as ``numpy.dtype(name, *flags)`` with the given saved state (NumPy trusts its flags and sizes)."""

    def __init__(self, name, state, flags=(False, True)):
        self.name, self.state, self.flags = name, state, flags

    def __reduce__(self):
        return np.dtype, (self.name, *self.flags), self.state


class NumpyScalarOf:
    """Unpickles as NumPy's ``scalar(dtype, data)``, as a saved NumPy number does."""

    def __init__(self, dtype, data):
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        return np.float64(0).__reduce__()[0], (self.dtype, self.data)  # numpy._core.multiarray.scalar


POINTER = (0x41414141).to_bytes(8, "little")  # an address NumPy would read a Python object from


@pytest.mark.parametrize("dtype", [
    CraftedDtype("O8", (3, "|", None, None, None, 8, 8, 0)),  # object dtype, 'holds no objects'
    CraftedDtype("f8", (3, "<", None, None, None, 8, 8, 63)),  # a float dtype whose flags say 'objects'
    CraftedDtype("V8", (3, "|", None, None, None, 8, 1, 0)),   # raw bytes
], ids=["object", "float-with-object-flags", "void"])
def test_a_checkpoint_with_a_crafted_numpy_dtype_is_refused(tmp_path, dtype):
    path = tmp_path / "crafted.pth.tar"
    torch.save({"state_dict": {}, "extras": {"best_top1": NumpyScalarOf(dtype, POINTER)}}, path)
    # in a child process: without the check, printing the value dereferences the pointer (a crash)
    load = ("from distiller_dcq.adapter.checkpoints import load_distiller_checkpoint\n"
            f"try:\n    print(load_distiller_checkpoint({str(path)!r}))\nexcept ValueError as err:\n    print(err)")
    child = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert child.returncode == 0, child.stderr[-2000:]
    assert "cannot be loaded safely (UnpicklingError: the checkpoint " in child.stdout, child.stdout


def test_numpy_numbers_saved_by_distiller_load_as_numpy_numbers(tmp_path):
    extras = {"best_top1": np.float64(98.75), "best_epoch": np.int64(7), "is_best": np.bool_(True),
              "top5": np.float32(99.5), "count": np.uint8(3)}
    path = tmp_path / "extras.pth.tar"
    torch.save({"state_dict": {}, "extras": extras}, path)
    loaded = load_distiller_checkpoint(str(path))["extras"]
    assert {k: (type(v), v) for k, v in loaded.items()} == {k: (type(v), v) for k, v in extras.items()}
    numpy1 = CraftedDtype("f8", (3, "<", None, None, None, -1, -1, 0), flags=(0, 1))  # how NumPy 1 pickled it
    torch.save({"extras": {"best_top1": NumpyScalarOf(numpy1, np.float64(71.25).tobytes())}}, path)
    assert load_distiller_checkpoint(str(path))["extras"]["best_top1"] == np.float64(71.25)
    with pytest.raises(ValueError, match="scalar from .* only a plain dtype and its bytes"):
        torch.save({"x": NumpyScalarOf(np.dtype("f8"), b"\0" * 4)}, path)  # 4 bytes for an 8-byte float
        load_distiller_checkpoint(str(path))


class CallsSGD:
    def __reduce__(self):
        return torch.optim.SGD, ([torch.zeros(1)], 0.1)


def test_optimizer_classes_are_only_names_in_a_checkpoint(tmp_path):
    path = tmp_path / "calls_sgd.pth.tar"
    torch.save({"state_dict": {}, "optimizer": CallsSGD()}, path)
    with pytest.raises(ValueError, match=r"calls torch.optim.sgd.SGD, which a Distiller checkpoint never does"):
        load_distiller_checkpoint(str(path))
    named = tmp_path / "names_module.pth.tar"
    torch.save({"state_dict": {}, "optimizer_type": collections.OrderedDict}, named)
    with pytest.raises(ValueError, match=r"optimizer_type is .*OrderedDict.*only these can be rebuilt: torch.optim"):
        load_distiller_checkpoint(str(named))


def test_a_thinned_checkpoint_loads(tmp_path):
    from distiller.thinning import ThinningRecipe
    model = lenet()
    keep = torch.arange(0, 500, 2)  # fc1's even outputs, fc2's matching inputs
    model.thinning_recipes = [ThinningRecipe(modules={}, parameters={"fc1.weight": [(0, keep)],
                                                                     "fc1.bias": [(0, keep)],
                                                                     "fc2.weight": [(1, keep)]})]
    distiller.execute_thinning_recipes_list(model, None, model.thinning_recipes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    apputils.save_checkpoint(1, "simplenet_mnist", model, optimizer=optimizer, dir=str(tmp_path))
    checkpoint = load_distiller_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    assert type(checkpoint["thinning_recipes"][0]) is ThinningRecipe and checkpoint["optimizer_type"] is torch.optim.SGD
    loaded, _, optimizer, _ = apputils.load_checkpoint(lenet(), str(tmp_path / "checkpoint.pth.tar"))
    assert loaded.fc2.weight.shape == (10, 250) and torch.equal(loaded.fc2.weight, model.fc2.weight)
    assert type(optimizer) is torch.optim.SGD


def test_a_thinning_recipe_may_set_only_what_thinning_sets(tmp_path):
    from distiller.thinning import ThinningRecipe
    model = lenet()
    model.thinning_recipes = [ThinningRecipe(modules={"fc2": {"forward": 3}}, parameters={})]  # setattr(fc2, ...)
    apputils.save_checkpoint(1, "simplenet_mnist", model, dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"thinning recipe sets \['forward'\] on module 'fc2'; thinning only sets"):
        apputils.load_checkpoint(lenet(), str(tmp_path / "checkpoint.pth.tar"))


def test_every_quantization_aware_training_quantizer_is_rebuilt_from_its_checkpoint(tmp_path):
    from distiller.quantization import DorefaQuantizer, QuantAwareTrainRangeLinearQuantizer, WRPNQuantizer
    # (quantize_inputs=True would patch Simplenet.forward for the whole process: Distiller does that)
    for cls, kwargs in [(DorefaQuantizer, dict(bits_weights=2)), (WRPNQuantizer, dict(bits_weights=4)),
                        (QuantAwareTrainRangeLinearQuantizer, dict(bits_weights=4, quantize_inputs=False)),
                        (DCQQuantizer, dict(weight_mode="ternary"))]:
        model = lenet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        cls(model, optimizer, **kwargs).prepare_model()
        apputils.save_checkpoint(1, "simplenet_mnist", model, optimizer=optimizer, dir=str(tmp_path))
        restored, _, _, _ = apputils.load_checkpoint(lenet(), str(tmp_path / "checkpoint.pth.tar"))
        assert hasattr(restored.fc1, "float_weight"), cls
        assert torch.equal(restored.fc1.float_weight, model.fc1.float_weight), cls


def test_a_checkpoint_saved_without_dataparallel_loads_into_a_dataparallel_model_and_back(tmp_path):
    from conftest import LENET_TEACHER
    wrapped = torch.nn.DataParallel(lenet())  # what compress_classifier builds on GPUs
    apputils.load_lean_checkpoint(wrapped, str(LENET_TEACHER))  # the FP teacher was saved on a CPU
    teacher = load_distiller_checkpoint(str(LENET_TEACHER))["state_dict"]
    assert torch.equal(wrapped.module.fc2.weight, teacher["fc2.weight"])
    apputils.save_checkpoint(0, "simplenet_mnist", wrapped, dir=str(tmp_path))
    plain = apputils.load_lean_checkpoint(lenet(), str(tmp_path / "checkpoint.pth.tar"))
    assert torch.equal(plain.fc2.weight, teacher["fc2.weight"])


def test_a_quantized_checkpoint_loads_across_dataparallel_both_ways(tmp_path):
    """A quantizer renames ``weight`` to ``float_weight`` only when the checkpoint's quantizer is rebuilt,
    after the names were fitted: a GPU run's checkpoint (``module.fc1.float_weight``) must still load
    into a plain model (distiller_dcq.recalibrate, --cpu), and a CPU run's into a wrapped one."""
    from distiller.quantization import DorefaQuantizer

    def wrapped():
        model = torch.nn.DataParallel(lenet())
        model.src_device_obj = torch.device("cpu")  # what DataParallel has on a GPU machine; Distiller reads it
        return model

    for cls, kwargs in [(DCQQuantizer, dict(weight_mode="binary")), (DorefaQuantizer, dict(bits_weights=2))]:
        for saved_wrapped in (False, True):
            saved = wrapped() if saved_wrapped else lenet()
            optimizer = torch.optim.SGD(saved.parameters(), lr=0.1)
            cls(saved, optimizer, **kwargs).prepare_model()
            apputils.save_checkpoint(1, "simplenet_mnist", saved, optimizer=optimizer, dir=str(tmp_path))
            target = lenet() if saved_wrapped else wrapped()
            loaded = apputils.load_lean_checkpoint(target, str(tmp_path / "checkpoint.pth.tar"))
            plain_saved = saved.module if saved_wrapped else saved
            plain_loaded = loaded if saved_wrapped else loaded.module
            assert torch.equal(plain_loaded.fc1.float_weight, plain_saved.fc1.float_weight), (cls, saved_wrapped)
            x = torch.randn(4, 1, 28, 28)
            assert torch.equal(plain_loaded.eval()(x), plain_saved.eval()(x)), (cls, saved_wrapped)


def test_a_vgg_checkpoint_with_pruning_masks_loads_across_dataparallel_both_ways(tmp_path):
    """On GPUs compress_classifier wraps only VGG's ``features`` (``features.module.0.weight``)."""
    def vgg(wrapped):
        model = create_model(False, "cifar10", "vgg11_bn_cifar", parallel=False, device_ids=-1)
        if wrapped:
            model.features = torch.nn.DataParallel(model.features)
        return model

    for saved_wrapped in (False, True):
        saved = vgg(saved_wrapped)
        scheduler = distiller.CompressionScheduler(saved)
        conv = "features.module.0.weight" if saved_wrapped else "features.0.weight"
        scheduler.zeros_mask_dict[conv].mask = (torch.rand_like(saved.state_dict()[conv]) > 0.5).float()
        apputils.save_checkpoint(0, "vgg11_bn_cifar", saved, scheduler=scheduler, dir=str(tmp_path))
        loaded, loaded_scheduler, _, _ = apputils.load_checkpoint(vgg(not saved_wrapped),
                                                                   str(tmp_path / "checkpoint.pth.tar"))
        other = "features.0.weight" if saved_wrapped else "features.module.0.weight"
        assert torch.equal(loaded.state_dict()[other], saved.state_dict()[conv])
        assert torch.equal(loaded_scheduler.zeros_mask_dict[other].mask, scheduler.zeros_mask_dict[conv].mask)


def lenet_checkpoint_with_optimizer(tmp_path, optimizer_cls, **kwargs):
    """A LeNet checkpoint saved by Distiller after one training step with ``optimizer_cls``, and its contents."""
    model = lenet()
    optimizer = optimizer_cls(model.parameters(), lr=0.01, **kwargs)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    apputils.save_checkpoint(0, "simplenet_mnist", model, optimizer=optimizer, dir=str(tmp_path))
    path = tmp_path / "checkpoint.pth.tar"
    return path, load_distiller_checkpoint(str(path))  # the allow-list: optimizer_type comes back as its class


def in_a_child(code):
    """Run ``code`` in a new interpreter (a crash must not take the tests down); its stdout, or the crash."""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert child.returncode == 0, f"rc {child.returncode}: {child.stderr[-2000:]}"
    return child.stdout


RESUME_AND_STEP = """
import torch
from distiller import apputils
from distiller.models import create_model
model = create_model(False, "mnist", "simplenet_mnist", parallel=False, device_ids=-1)
try:
    model, _, optimizer, _ = apputils.load_checkpoint(model, {path!r})
except ValueError as err:
    print(err)
else:
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    print("stepped")
"""


@pytest.mark.parametrize("optimizer_cls, kwargs", [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.Adam, {})],
                         ids=["SGD", "Adam"])
def test_resuming_from_a_fused_optimizer_state_with_short_buffers_is_refused_before_any_step(tmp_path, optimizer_cls,
                                                                                             kwargs):
    """The review's crafted checkpoint: fused, buffers of one element. Resumed and stepped, it wrote out of bounds."""
    path, checkpoint = lenet_checkpoint_with_optimizer(tmp_path, optimizer_cls, **kwargs)
    checkpoint["optimizer_state_dict"]["param_groups"][0]["fused"] = True
    for state in checkpoint["optimizer_state_dict"]["state"].values():
        state.update({k: torch.zeros(1) for k in state if k != "step"})
    torch.save(checkpoint, path)
    said = in_a_child(RESUME_AND_STEP.format(path=str(path)))
    assert f"the saved {optimizer_cls.__name__} state turns on fused in group 0" in said, said


def _set(key, value):
    return lambda state: state["param_groups"][0].update({key: value})


def _first_buffer(value):
    return lambda state: next(iter(state["state"].values())).update(momentum_buffer=value)


@pytest.mark.parametrize("crafted, message", [
    (_set("capturable", True), "turns on capturable in group 0"),
    (_set("differentiable", True), "turns on differentiable in group 0"),
    (_set("lr_lambda", 3), "sets lr_lambda in group 0, which SGD does not have"),
    (_first_buffer(torch.zeros(1)), r"holds 'momentum_buffer' of parameter 0 as torch.float32 \(1,\); the parameter "
                                    r"is torch.float32 \(20, 1, 5, 5\)"),
    (_first_buffer(torch.zeros(20, 1, 5, 5, dtype=torch.float64)), "holds 'momentum_buffer' of parameter 0 as torch.float64"),
    (_first_buffer([1.0]), "holds a list as 'momentum_buffer'"),
    (lambda state: state["state"].update({99: {}}), "holds state for parameter 99, which none of its groups lists"),
    (lambda state: state["param_groups"][0]["params"].pop(), "has 7 parameters in group 0, the optimizer 8"),
    (lambda state: state["param_groups"].append(dict(state["param_groups"][0])), "has 2 parameter groups"),
], ids=["capturable", "differentiable", "unknown-key", "short-buffer", "other-dtype", "not-a-tensor",
        "unknown-parameter", "fewer-parameters", "more-groups"])
def test_a_resumed_optimizer_state_that_does_not_fit_the_model_is_refused(tmp_path, crafted, message):
    path, checkpoint = lenet_checkpoint_with_optimizer(tmp_path, torch.optim.SGD, momentum=0.9)
    crafted(checkpoint["optimizer_state_dict"])
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f"checkpoint '{path}': the saved SGD state {message}"):
        apputils.load_checkpoint(lenet(), str(path))


def test_an_optimizer_state_distiller_saved_after_an_lr_scheduler_resumes(tmp_path):
    model = lenet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)  # adds initial_lr, max_lr, ...
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    apputils.save_checkpoint(0, "simplenet_mnist", model, optimizer=optimizer, dir=str(tmp_path))
    _, _, resumed, _ = apputils.load_checkpoint(lenet(), str(tmp_path / "checkpoint.pth.tar"))
    assert type(resumed) is torch.optim.Adam
    assert all(torch.equal(resumed.state_dict()["state"][i]["exp_avg"], s["exp_avg"])
               for i, s in optimizer.state_dict()["state"].items())


def checkpoint_with_pickle(path, data, like=None):
    """A torch zip checkpoint whose data.pkl is ``data`` (its other records copied from ``like``'s)."""
    if like is None:
        torch.save({}, path)
        like = path
    with zipfile.ZipFile(like) as source:
        records = [(info, source.read(info)) for info in source.infolist()]
    prefix = records[0][0].filename.split("/")[0]
    with zipfile.ZipFile(path, "w") as archive:
        for info, content in records:
            info.filename = f"{path.stem.split('.')[0]}/{info.filename[len(prefix) + 1:]}"
            archive.writestr(info, data if info.filename.endswith("/data.pkl") else content)
    return path


def test_a_tuple_nested_a_million_deep_is_refused_before_it_crashes_the_interpreter(tmp_path):
    """As a dict key, hashing it recursed in C: torch.load(weights_only=True) itself died (rc 139)."""
    deep = b"\x80\x02}K\x00" + b"\x85" * 1_500_000 + b"K\x01s."  # {(((...(0,)...),): 1}, TUPLE1 opcodes
    path = checkpoint_with_pickle(tmp_path / "deep.pth.tar", deep)
    loads = ("from distiller_dcq.adapter.checkpoints import load_distiller_checkpoint\n"
             f"try:\n    load_distiller_checkpoint({str(path)!r})\nexcept ValueError as err:\n    print(err)")
    said = in_a_child(loads)
    assert "cannot be loaded safely (UnsafePickle: objects nest more than 1000 deep" in said, said
    said = in_a_child(RESUME_AND_STEP.format(path=str(path)))  # Distiller's own load: compress_classifier's path
    assert "objects nest more than 1000 deep" in said, said


def test_nesting_built_by_mutating_what_is_already_held_is_seen(tmp_path):
    """Lists appended to lists after they were put in a tuple: the depth grows after the holders were made."""
    body = b"".join(b"]q" + bytes([i]) for i in range(1, 200))  # 199 empty lists, memo 1..199
    links = b"".join(b"h" + bytes([i]) + b"h" + bytes([i + 1]) + b"a" for i in range(198, 0, -1))  # i holds i+1
    nested = b"\x80\x02(" + body + b"h\x01\x85" + links + b"t."  # (..., (list 1,), ...), then 1 holds 2 holds 3 ...
    path = checkpoint_with_pickle(tmp_path / "lists.pth.tar", nested)
    from distiller_dcq.adapter import pickle_scan
    limit = pickle_scan.MAX_NESTING
    try:
        pickle_scan.MAX_NESTING = 150
        with pytest.raises(ValueError, match="objects nest more than 150 deep"):
            load_distiller_checkpoint(str(path))
    finally:
        pickle_scan.MAX_NESTING = limit
    assert len(load_distiller_checkpoint(str(path))) == 199 + 1 + 198  # within the real limit: loads


@pytest.mark.parametrize("pickled, name", [
    (b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x60\x85R.", "builtins.bytearray"),  # bytearray(1.5 GiB)
    (b"\x80\x02ctorch\nTensor\nJ\x00\x00\x00\x60\x85R.", "torch.Tensor"),          # torch.Tensor(1.5 G)
    (b"\x80\x02ctorch.storage\nUntypedStorage\nJ\x00\x00\x00\x60\x85R.", "torch.storage.UntypedStorage"),
], ids=["bytearray", "Tensor", "UntypedStorage"])
def test_a_tiny_checkpoint_that_allocates_gigabytes_is_refused_before_it_allocates(tmp_path, pickled, name):
    path = checkpoint_with_pickle(tmp_path / "alloc.pth.tar", pickled)
    assert path.stat().st_size < 2000
    refusal = ("the pickle calls torch.storage.UntypedStorage, which a checkpoint only names" if "Storage" in name
               else f"the checkpoint names {name}, which a Distiller checkpoint does not hold")
    with pytest.raises(ValueError, match=refusal):
        load_distiller_checkpoint(str(path))


def test_a_storage_claiming_more_bytes_than_its_record_holds_is_refused(tmp_path):
    real = tmp_path / "real.pth.tar"
    torch.save({"state_dict": {"w": torch.ones(3)}}, real)
    with zipfile.ZipFile(real) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    size = data.index(b"cpu") + 5  # the storage's location (memoized), then its size: 3 floats
    assert data[size:size + 3] == b"K\x03t"
    path = checkpoint_with_pickle(tmp_path / "big.pth.tar", data[:size] + b"J\x00\x00\x00\x40" + data[size + 2:],
                                  like=real)
    with pytest.raises(ValueError, match=r"a storage claims 4294967296 bytes, but its record 'data/0' holds 12"):
        load_distiller_checkpoint(str(path))
    assert torch.equal(load_distiller_checkpoint(str(checkpoint_with_pickle(tmp_path / "same.pth.tar", data, like=real)))
                       ["state_dict"]["w"], torch.ones(3))


def test_a_legacy_format_checkpoint_still_loads_and_is_scanned(tmp_path):
    path = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict": lenet().state_dict(), "extras": {"best_top1": np.float64(99.1)}}, path,
               _use_new_zipfile_serialization=False)
    loaded = load_distiller_checkpoint(str(path))
    assert loaded["extras"]["best_top1"] == np.float64(99.1) and loaded["state_dict"]["fc2.weight"].shape == (10, 500)
    torch.save({"x": bytearray(10)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="names builtins.bytearray"):
        load_distiller_checkpoint(str(path))


def _torch_zip(payload=None):
    """The bytes of a torch.save'd (benign) checkpoint; with ``payload``: its data.pkl replaced."""
    import io
    buffer = io.BytesIO()
    torch.save({"state_dict": {}}, buffer)
    return buffer.getvalue()


ALLOCATES = b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x60\x85R."  # bytearray(1.5 GiB)


def test_the_scan_reads_the_bytes_torch_reads_in_a_polyglot_file(tmp_path):
    """Found by review: files that Python's zipfile and torch's reader see differently. A legacy pickle with a
    benign zip appended (torch decides by the first 4 bytes: legacy); 'archive/DATA.PKL' beside a benign
    'archive/sub/data.pkl' (torch's miniz looks names up ignoring case); each is refused for what torch would run."""
    prepended = tmp_path / "prepended.pth.tar"
    prepended.write_bytes(ALLOCATES + _torch_zip())
    cased = tmp_path / "cased.pth.tar"
    with zipfile.ZipFile(__import__("io").BytesIO(_torch_zip())) as source, zipfile.ZipFile(cased, "w") as archive:
        for info in source.infolist():
            if info.filename.endswith("/data.pkl"):
                archive.writestr(info.filename.replace("data.pkl", "DATA.PKL"), ALLOCATES)
                archive.writestr(info.filename.replace("data.pkl", "sub/data.pkl"), source.read(info))
            else:
                archive.writestr(info, source.read(info))
    for path in (prepended, cased):
        with pytest.raises(ValueError, match="the checkpoint names builtins.bytearray"):
            load_distiller_checkpoint(str(path))
        with pytest.raises(Exception, match="the checkpoint names builtins.bytearray"):
            apputils.load_checkpoint(lenet(), str(path))


def test_a_tensor_with_more_elements_than_its_storage_is_refused(tmp_path):
    """A 1.5-million-element thinning index over 8 bytes of storage (stride 0): Distiller's index_select would
    allocate all of it. Views inside their storage still load."""
    from distiller.thinning import ThinningRecipe
    model = lenet()
    huge = torch.zeros(1, dtype=torch.long).expand(1_500_000)
    model.thinning_recipes = [ThinningRecipe(modules={}, parameters={"fc1.weight": [(0, huge)]})]
    apputils.save_checkpoint(1, "simplenet_mnist", model, dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"a tensor of size \(1500000,\) \(stride \(0,\), offset 0\) claims more than"):
        load_distiller_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    whole = torch.arange(12.0)
    torch.save({"views": [whole[2:5], whole.view(3, 4)[:, 1], whole.view(3, 4).t()]}, tmp_path / "views.pth.tar")
    views = load_distiller_checkpoint(str(tmp_path / "views.pth.tar"))["views"]
    assert [v.tolist() for v in views] == [[2.0, 3.0, 4.0], [1.0, 5.0, 9.0], whole.view(3, 4).t().tolist()]


def test_tensors_of_every_dtype_and_complex_numbers_still_load(tmp_path):
    values = {str(dtype): torch.ones(3, dtype=dtype) for dtype in (torch.float8_e4m3fn, torch.uint16, torch.uint32,
                                                                    torch.uint64, torch.bfloat16, torch.bool)}
    torch.save({"state_dict": values, "extras": {"z": complex(1, 2)}}, tmp_path / "dtypes.pth.tar")
    loaded = load_distiller_checkpoint(str(tmp_path / "dtypes.pth.tar"))
    assert all(torch.equal(loaded["state_dict"][k].float(), v.float()) for k, v in values.items())
    assert loaded["extras"]["z"] == complex(1, 2)


def test_the_scan_costs_time_linear_in_the_file_however_its_objects_hold_each_other(tmp_path):
    """Found by review: one list held by K lists, then deepened a thousand times, made the scan walk all K holders
    at every step (10 s for a 90 KB file). Refused with a bounded amount of work."""
    import time
    holders = 20_000
    pickled = bytearray(b"\x80\x02]q\x00(" + b"]h\x00a" * holders + b"]q\x01")
    for _ in range(990):
        pickled += b"h\x00]h\x01aq\x01a"  # list 0 holds a new list holding the last one
    pickled += b"t."
    path = checkpoint_with_pickle(tmp_path / "entangled.pth.tar", bytes(pickled))
    started = time.process_time()
    with pytest.raises(ValueError, match="objects are held by each other far more often than in any checkpoint"):
        load_distiller_checkpoint(str(path))
    assert time.process_time() - started < 5


@pytest.mark.parametrize("build", [
    lambda m: (torch.optim.Adafactor(m.parameters(), lr=0.01), None),
    lambda m: (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), "swa"),
    lambda m: (torch.optim.SGD(m.named_parameters(), lr=0.01, momentum=0.9), None),
    lambda m: (torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True), None),
    lambda m: (torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.9, centered=True), None),
], ids=["Adafactor", "SGD-with-SWALR", "SGD-of-named-parameters", "Adam-amsgrad", "RMSprop-centered"])
def test_optimizer_states_torch_itself_writes_still_resume(tmp_path, build):
    model = lenet()
    optimizer, scheduler = build(model)
    if scheduler == "swa":
        torch.optim.swa_utils.SWALR(optimizer, swa_lr=0.05)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    apputils.save_checkpoint(0, "simplenet_mnist", model, optimizer=optimizer, dir=str(tmp_path))
    _, _, resumed, _ = apputils.load_checkpoint(lenet(), str(tmp_path / "checkpoint.pth.tar"))
    assert type(resumed) is type(optimizer) and len(resumed.state) == len(optimizer.state)
