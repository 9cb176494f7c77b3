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
- ``ThinningRecipe`` (a namedtuple: calling it builds a tuple) and NumPy's scalar/dtype constructors
  (they build numbers) are allowed as they are.
"""
import os
import pickle

import numpy as np
import torch

try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import scalar as _numpy_scalar

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


def _optimizer_classes():
    return [c for c in vars(torch.optim).values() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer]


def _quantizer_classes():
    import distiller.quantization
    from .quantizer import DCQQuantizer
    classes = [c for c in vars(distiller.quantization).values() if isinstance(c, type)] + [DCQQuantizer]
    return [c for c in classes if _path(c) in REBUILDABLE_QUANTIZERS]


def _allowed_globals(references):
    from distiller.thinning import ThinningRecipe
    numpy_scalars = [_numpy_scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64)]
    return [(ref, _path(ref.cls)) for ref in references] + [ThinningRecipe] + numpy_scalars


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
    with torch.serialization.safe_globals(_allowed_globals(references)):
        checkpoint = torch_load(*args, **{**kwargs, "weights_only": True})
    if isinstance(checkpoint, dict):
        if checkpoint.get("optimizer_type") is not None:
            checkpoint["optimizer_type"] = _class_from(checkpoint["optimizer_type"], optimizers, "optimizer_type")
        metadata = checkpoint.get("quantizer_metadata")
        if metadata:
            metadata["type"] = _class_from(metadata.get("type"), quantizers, "quantizer_metadata['type']")
    return checkpoint


def _reason(err):
    """The line of a load error that says what was refused (torch's own starts with generic advice)."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    return f"{type(err).__name__}: {next((line.strip() for line in text.splitlines() if line.strip()), '')}"


def load_distiller_checkpoint(path, map_location="cpu"):
    """Load a Distiller checkpoint file safely; a file that is missing, corrupt or wants more than the
    allow-list is a ``FileNotFoundError``/``ValueError`` naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: check the path")
    try:
        return torch_load_distiller_checkpoint(torch.load, path, map_location=map_location)
    except Exception as err:
        raise ValueError(f"checkpoint {path!r} cannot be loaded safely ({_reason(err)}); only tensors, numbers, strings, "
                         f"thinning recipes, optimizer and quantization-aware-training quantizer classes are "
                         f"accepted: is it a Distiller checkpoint?") from err
