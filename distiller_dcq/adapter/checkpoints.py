"""Loading Distiller checkpoints with ``torch.load(weights_only=True)`` and nothing more allowed.

Distiller pickles two kinds of class references in its checkpoints: ``optimizer_type`` (a
``torch.optim`` class) and, for quantized models, ``quantizer_metadata['type']`` (a Distiller
quantizer class); its ``extras`` may hold NumPy scalars (top-1 values). These, and only these,
are allow-listed; anything else in a checkpoint (e.g. code smuggled into a pickle) is refused.
"""
import os

import numpy as np
import torch

try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import scalar as _numpy_scalar


def _subclasses(cls):
    found = set()
    stack = [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


def distiller_checkpoint_globals():
    """The classes a Distiller checkpoint may reference: optimizers, quantizers, NumPy scalars."""
    from distiller.quantization import Quantizer
    optimizers = {c for c in vars(torch.optim).values() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)}
    numpy_scalars = {_numpy_scalar, np.dtype} | {type(np.dtype(t)) for t in (np.float64, np.float32, np.int64)}
    return sorted(optimizers | _subclasses(Quantizer) | {Quantizer} | numpy_scalars, key=repr)


def load_distiller_checkpoint(path, map_location="cpu"):
    """``torch.load`` a Distiller checkpoint safely (``weights_only=True`` plus the allow-list)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: check the path")
    try:
        with torch.serialization.safe_globals(distiller_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path!r} cannot be loaded safely ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); only tensors, numbers, strings, "
                         f"optimizer and quantizer classes are accepted: is it a Distiller checkpoint?") from err
