"""Run-time patches that let Distiller 0.4 run on Python 3.11 / PyTorch 2.x / pandas 3.

Each patch is idempotent, does nothing on a stack that does not need it, and touches only the
Distiller module it fixes (Distiller's files are never edited).
"""
import functools

import torch

from .checkpoints import distiller_checkpoint_globals


def _pandas_needs_precision_alias(pd):
    try:
        pd.get_option("precision")
        return False
    except Exception:  # pandas >= 1.3: "Pattern matched multiple keys"
        return True


class _PandasWithPrecisionAlias:
    """pandas, except that ``set_option('precision', n)`` means ``display.precision``."""

    def __init__(self, pandas):
        self._pandas = pandas

    def set_option(self, *args, **kwargs):
        args = tuple("display.precision" if i % 2 == 0 and a == "precision" else a for i, a in enumerate(args))
        return self._pandas.set_option(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pandas, name)


def patch_pandas_precision(model_summaries):
    """``distiller.model_summaries`` calls ``pd.set_option('precision', n)`` after every epoch,
    which pandas >= 1.3 rejects; give that module a pandas that accepts it."""
    pd = model_summaries.pd
    if isinstance(pd, _PandasWithPrecisionAlias) or not _pandas_needs_precision_alias(pd):
        return
    model_summaries.pd = _PandasWithPrecisionAlias(pd)


def _torch_loads_weights_only_by_default():
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


def patch_checkpoint_loading(checkpoint_module):
    """Under torch >= 2.6, ``torch.load`` is ``weights_only=True`` and refuses the optimizer and
    quantizer classes Distiller pickles: load them with exactly those classes allow-listed."""
    original = checkpoint_module.load_checkpoint
    if getattr(original, "patched_by_distiller_dcq", False) or not _torch_loads_weights_only_by_default():
        return

    @functools.wraps(original)
    def load_checkpoint(*args, **kwargs):
        with torch.serialization.safe_globals(distiller_checkpoint_globals()):
            return original(*args, **kwargs)

    load_checkpoint.patched_by_distiller_dcq = True
    checkpoint_module.load_checkpoint = load_checkpoint
