"""Loading Distiller checkpoints with ``torch.load(weights_only=True)``, and nothing more allowed.

Distiller pickles class references in its checkpoints: ``optimizer_type`` (a ``torch.optim``
class) and, for quantized models, ``quantizer_metadata['type']`` (a quantizer class, which
Distiller's ``load_checkpoint`` then calls with ``quantizer_metadata['params']``); thinned models
carry ``ThinningRecipe`` namedtuples; ``extras`` may hold NumPy scalars (top-1 values).

The unpickler may *call* any allowed global with arguments from the file, so each one is judged by
what calling it can do:

- optimizer and quantizer classes are never allowed as such: their names unpickle to an inert
  ``ClassReference``, which refuses to be called, and only ``optimizer_type`` and
  ``quantizer_metadata['type']`` are turned back into classes after loading;
- only quantizers whose constructors just build training state are rebuilt (``REBUILDABLE_QUANTIZERS``):
  Distiller's ``PostTrainLinearQuantizer``, for one, reads the (unsafe) YAML file named in its
  parameters, so a checkpoint naming it is refused;
- ``ThinningRecipe`` (a namedtuple: calling it builds a tuple) is allowed as it is;
- NumPy's own ``dtype`` and ``scalar`` are not: their names unpickle to checked stand-ins that build
  only plain numbers (NumPy's ``dtype.__setstate__`` trusts the flags and sizes in the file, and a
  crafted state makes ``scalar`` build objects from pointers chosen by the file);
- of torch's default allow-list only what a checkpoint holds (``TORCH_GLOBALS``): not the calls that
  allocate what the file asks (``bytearray(n)``, ``torch.Tensor(n)``, ``UntypedStorage(n)``). The file's
  pickle is scanned for them, for deep nesting and for oversized storages before it is unpickled
  (``pickle_scan.py``).

A saved optimizer state is loaded only into an optimizer it fits (``load_optimizer_state``): a fused
or capturable step trusts its state tensors to be as large as the parameters, and a crafted state
would make it write out of bounds.
"""
import itertools
import os
import pickle

import numpy as np
import torch

from .pickle_scan import scan_checkpoint

# Quantizers whose __init__(model, optimizer, **params) touches no file and runs no user code.
REBUILDABLE_QUANTIZERS = ("distiller.quantization.clipped_linear.DorefaQuantizer",
                          "distiller.quantization.clipped_linear.WRPNQuantizer",
                          "distiller.quantization.clipped_linear.PACTQuantizer",
                          "distiller.quantization.range_linear.QuantAwareTrainRangeLinearQuantizer",
                          "distiller.quantization.range_linear.NCFQuantAwareTrainQuantizer",
                          "distiller_dcq.adapter.quantizer.DCQQuantizer")


def _path(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


class ClassReference:
    """What a checkpoint's reference to an optimizer or quantizer class unpickles to."""

    def __init__(self, cls):
        self.cls = cls

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"the checkpoint calls {_path(self.cls)}, which a Distiller checkpoint never "
                                     f"does (it only names the class): refused")

    def __repr__(self):
        return f"ClassReference({_path(self.cls)})"


PLAIN_NUMPY_DTYPES = ("b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16")
_PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)  # (fields, names, subarray, itemsize, alignment, flags)


class NumpyDtype:
    """What ``numpy.dtype`` unpickles to: a plain numeric dtype whose saved state may set only its byte
    order (``.dtype`` is the real one)."""

    def __init__(self, name, align=False, copy=True):
        # NumPy 2 pickles (name, False, True), NumPy 1 (name, 0, 1)
        if type(name) is not str or name not in PLAIN_NUMPY_DTYPES or type(align) not in (bool, int) or align:
            raise pickle.UnpicklingError(f"the checkpoint builds NumPy dtype {name!r} (align={align!r}); only plain "
                                         f"numbers are accepted: {', '.join(PLAIN_NUMPY_DTYPES)}")
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:] == _PLAIN_DTYPE_STATE):
            raise pickle.UnpicklingError(f"the checkpoint gives NumPy dtype {self.dtype} the state {state!r}, which is "
                                         f"not a plain number's: refused")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def numpy_scalar(dtype, data):
    """What ``numpy...multiarray.scalar`` unpickles to: the number ``data`` holds, read as ``dtype``."""
    if not (isinstance(dtype, NumpyDtype) and hasattr(dtype, "dtype") and isinstance(data, bytes)
            and len(data) == dtype.dtype.itemsize):
        raise pickle.UnpicklingError(f"the checkpoint builds a NumPy scalar from {dtype!r} and {type(data).__name__}; "
                                     f"only a plain dtype and its bytes are accepted: refused")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


# what Distiller's thinning writes into a module (ThinningRecipe.modules); loading sets each one
THINNING_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "num_features", "running_mean",
                       "running_var")

_NUMPY_STAND_INS = [(NumpyDtype, "numpy.dtype"),
                    (numpy_scalar, "numpy._core.multiarray.scalar"),
                    (numpy_scalar, "numpy.core.multiarray.scalar")]  # NumPy 1 names it so


# what torch.save writes for a checkpoint's tensors, dicts, devices, dtypes and bytes (NumPy scalars' data)
TORCH_GLOBALS = ("collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                 "torch._utils._rebuild_parameter", "torch.Size", "torch.device", "_codecs.encode", "builtins.set",
                 "builtins.complex", "torch.storage.UntypedStorage")  # the last: a storage id's type, never called


def _torch_global_names():
    """``TORCH_GLOBALS``, the legacy storage types a saved storage names (inert: torch's weights-only
    unpickler turns them into its ``StorageType``) and the dtypes."""
    storages = [f"torch.{t.__name__}" for t in torch._storage_classes
                if t not in (torch.storage.TypedStorage, torch.storage.UntypedStorage)]
    dtypes = [str(t) for t in vars(torch).values() if isinstance(t, torch.dtype)]
    return set(TORCH_GLOBALS) | set(storages) | set(dtypes)


def _optimizer_classes():
    return [c for c in vars(torch.optim).values() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer]


def _quantizer_classes():
    import distiller.quantization
    from .quantizer import DCQQuantizer
    classes = [c for c in vars(distiller.quantization).values() if isinstance(c, type)] + [DCQQuantizer]
    return [c for c in classes if _path(c) in REBUILDABLE_QUANTIZERS]


def _allowed_globals(references):
    """(object, name) pairs for ``torch.serialization.safe_globals``."""
    from distiller.thinning import ThinningRecipe
    return [(ref, _path(ref.cls)) for ref in references] + [(ThinningRecipe, _path(ThinningRecipe))] + _NUMPY_STAND_INS


def _class_from(reference, allowed, what):
    if isinstance(reference, ClassReference) and reference.cls in allowed:
        return reference.cls
    raise ValueError(f"the checkpoint's {what} is {reference!r}; only these can be rebuilt: "
                     f"{', '.join(sorted(_path(c) for c in allowed))}")


def torch_load_distiller_checkpoint(torch_load, *args, **kwargs):
    """``torch_load(*args, weights_only=True)`` with the allow-list above; class references come back
    as classes where Distiller expects them, after checking they are what those keys may hold."""
    optimizers, quantizers = _optimizer_classes(), _quantizer_classes()
    references = [ClassReference(c) for c in optimizers + quantizers]
    allowed = _allowed_globals(references)
    scan_checkpoint(args[0] if args else kwargs["f"], _torch_global_names() | {name for _, name in allowed})
    with torch.serialization.safe_globals(allowed):
        checkpoint = torch_load(*args, **{**kwargs, "weights_only": True})
    if isinstance(checkpoint, dict):
        if checkpoint.get("optimizer_type") is not None:
            checkpoint["optimizer_type"] = _class_from(checkpoint["optimizer_type"], optimizers, "optimizer_type")
        metadata = checkpoint.get("quantizer_metadata")
        if metadata:
            metadata["type"] = _class_from(metadata.get("type"), quantizers, "quantizer_metadata['type']")
        for recipe in checkpoint.get("thinning_recipes") or []:
            _check_thinning_recipe(recipe)
    return checkpoint


def _check_thinning_recipe(recipe):
    """Distiller sets every attribute a recipe names on its module: only thinning's own are accepted."""
    from distiller.thinning import ThinningRecipe
    if type(recipe) is not ThinningRecipe or not isinstance(recipe.modules, dict):
        raise ValueError(f"the checkpoint's thinning_recipes hold {type(recipe).__name__}, not ThinningRecipe")
    for module, directives in recipe.modules.items():
        other = [attr for attr in (directives if isinstance(directives, dict) else [None])
                 if attr not in THINNING_ATTRIBUTES]
        if other:
            raise ValueError(f"the checkpoint's thinning recipe sets {other} on module {module!r}; thinning only "
                             f"sets {', '.join(THINNING_ATTRIBUTES)}: refused")


def _without_dataparallel(name):
    return ".".join(part for part in name.split(".") if part != "module")


def fit_dataparallel_names(checkpoint, model):
    """compress_classifier wraps the model (VGG's and AlexNet's ``features`` only) in DataParallel on
    GPUs, which puts ``module.`` into every name; a checkpoint saved the other way (on a CPU, say) gets
    its names fitted to the model: weights, pruning masks and thinning recipes. A name the model lacks
    for now (a quantizer's ``float_weight``, made when Distiller rebuilds the checkpoint's quantizer, after
    this) gets its module's path fitted. Distiller itself only strips a leading ``module.``, and only for
    checkpoints that hold a compression schedule."""
    names = itertools.chain(model.state_dict(), (name for name, _ in model.named_modules()))
    wanted = {_without_dataparallel(name): name for name in names}

    def fit(name):
        if not isinstance(name, str):
            return name
        if _without_dataparallel(name) in wanted:
            return wanted[_without_dataparallel(name)]
        module, _, attribute = name.rpartition(".")
        module = wanted.get(_without_dataparallel(module))
        return name if module is None else ".".join(filter(None, (module, attribute)))

    def fitted(mapping):
        return type(mapping)((fit(k), v) for k, v in mapping.items())

    if isinstance(checkpoint.get("state_dict"), dict):
        checkpoint["state_dict"] = fitted(checkpoint["state_dict"])
    schedule = checkpoint.get("compression_sched")
    if isinstance(schedule, dict) and isinstance(schedule.get("masks_dict"), dict):
        schedule["masks_dict"] = fitted(schedule["masks_dict"])
    if isinstance(checkpoint.get("thinning_recipes"), list):
        checkpoint["thinning_recipes"] = [recipe._replace(modules=fitted(recipe.modules),
                                                          parameters=fitted(recipe.parameters))
                                          for recipe in checkpoint["thinning_recipes"]]


def _reason(err):
    """The line of a load error that says what was refused (torch's own starts with generic advice)."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    return f"{type(err).__name__}: {next((line.strip() for line in text.splitlines() if line.strip()), '')}"


def load_distiller_checkpoint(path, map_location="cpu"):
    """Load a Distiller checkpoint file safely; a file that is missing, corrupt or wants more than the
    allow-list is a ``FileNotFoundError``/``ValueError`` naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist or is not a file: check the path")
    try:
        return torch_load_distiller_checkpoint(torch.load, path, map_location=map_location)
    except Exception as err:
        raise ValueError(f"checkpoint {path!r} cannot be loaded safely ({_reason(err)}); only tensors, numbers, strings, "
                         f"thinning recipes, optimizer and quantization-aware-training quantizer classes are "
                         f"accepted: is it a Distiller checkpoint?") from err


def read_checkpoint(path):
    """``load_distiller_checkpoint(path)``, refused (``ValueError``) unless it holds a state_dict of weights."""
    saved = load_distiller_checkpoint(path)
    if not (isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict)):
        raise ValueError(f"checkpoint {path!r} holds no state_dict of weights: is it a Distiller checkpoint?")
    return saved


def network_of_checkpoint(path, arch, device="cpu"):
    """Distiller's ``arch`` with the checkpoint loaded as Distiller evaluates it (its quantizer rebuilt, the
    saved quantized weights); a checkpoint that does not fit ``arch`` is a ``ValueError`` naming it."""
    from distiller.apputils import classification_dataset_str_from_arch, load_lean_checkpoint
    from distiller.models import create_model
    model = create_model(False, classification_dataset_str_from_arch(arch), arch, parallel=False,
                         device_ids=-1 if device == "cpu" else None)
    try:
        return load_lean_checkpoint(model, path, model_device=device)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint {path!r} does not load into {arch} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}): is it a run of --arch {arch}?") from err


# param_group keys that pick a step kernel: a fused, capturable or differentiable step trusts the state's tensors
KERNEL_KEYS = ("fused", "capturable", "differentiable")
# param_group keys torch writes beside an optimizer's own: its LR schedulers' (SWALR's too), named parameters'
TORCH_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr", "param_names")
SCALAR_STATE = ("step", "eta", "mu", "mu_product")  # the per-parameter state that is one number
# the per-parameter buffers of torch's optimizers: as large as their parameter (a fused or foreach step trusts it)
BUFFER_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg", "acc_delta",
                "sum", "exp_inf", "ax", "prev", "step_size")


def check_optimizer_state(optimizer, state, what):
    """Refuse (``ValueError`` naming ``what``) a saved ``Optimizer.state_dict()`` that does not fit
    ``optimizer``: other groups or parameter counts, a param_group key neither the optimizer nor torch's
    LR schedulers write, ``fused``/``capturable``/``differentiable`` turned on, a buffer (``BUFFER_STATE``)
    whose shape or dtype is not its parameter's, a ``SCALAR_STATE`` that is not one number. Other state
    (Adafactor's row and column variances, LBFGS's history) is left to its own, non-fused step, which
    checks shapes. ``load_state_dict`` then moves each tensor to its parameter's device."""
    def refuse(problem):
        raise ValueError(f"{what}: the saved {type(optimizer).__name__} state {problem}; refused (a crafted state "
                         f"can make a fused step write out of bounds): resume from the run's own checkpoint")
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        refuse("is not an optimizer state_dict (state and param_groups)")
    groups, own_groups = state["param_groups"], optimizer.param_groups
    if len(groups) != len(own_groups):
        refuse(f"has {len(groups)} parameter groups, the optimizer {len(own_groups)}")
    params = {}
    for index, (group, own) in enumerate(zip(groups, own_groups)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            refuse(f"has a parameter group {index} without a list of params")
        if len(group["params"]) != len(own["params"]):
            refuse(f"has {len(group['params'])} parameters in group {index}, the optimizer {len(own['params'])}")
        turned_on = [k for k in KERNEL_KEYS if group.get(k)]
        if turned_on:
            refuse(f"turns on {', '.join(turned_on)} in group {index} (a kernel that trusts the state's sizes)")
        unknown = sorted(str(k) for k in group if k not in own and k not in TORCH_GROUP_KEYS)
        if unknown:
            refuse(f"sets {', '.join(unknown)} in group {index}, which {type(optimizer).__name__} does not have")
        params.update(zip(group["params"], own["params"]))
    for key, param_state in state["state"].items():
        if key not in params or not isinstance(param_state, dict):
            refuse(f"holds state for parameter {key!r}, which none of its groups lists")
        param = params[key]
        for name, value in param_state.items():
            if name in SCALAR_STATE:
                if not (type(value) in (int, float) or isinstance(value, torch.Tensor) and value.numel() == 1
                        and not value.is_complex()):
                    refuse(f"holds {name!r} of parameter {key} as {type(value).__name__} "
                           f"{tuple(getattr(value, 'shape', ()))}, not one number")
            elif name in BUFFER_STATE and value is not None:
                if not isinstance(value, torch.Tensor):
                    refuse(f"holds a {type(value).__name__} as {name!r} of parameter {key}")
                if value.shape != param.shape or value.dtype != param.dtype or value.layout != param.layout:
                    refuse(f"holds {name!r} of parameter {key} as {value.dtype} {tuple(value.shape)}; the parameter "
                           f"is {param.dtype} {tuple(param.shape)}")


def load_optimizer_state(optimizer, state, what):
    """``optimizer.load_state_dict(state)`` once ``check_optimizer_state`` accepts it."""
    check_optimizer_state(optimizer, state, what)
    optimizer.load_state_dict(state)


def optimizer_with_checked_state(optimizer_cls, state, what):
    """What a Distiller checkpoint's ``optimizer_type`` becomes for Distiller's ``load_checkpoint``: it builds
    the optimizer (``cls(model.parameters(), lr=1)``) and checks ``state`` against it before Distiller
    loads that state into it."""
    def build(params, *args, **kwargs):
        optimizer = optimizer_cls(params, *args, **kwargs)
        check_optimizer_state(optimizer, state, what)
        return optimizer
    return build
