"""Weight quantizers: small modules mapping FP weights to quantized ones, one registry by mode.

Every quantizer returns ``levels * alpha`` in the forward pass and passes the gradient straight
through to the FP weights (STE), so the FP weights keep learning.

- ``binary``: levels sign(w) in {-1, +1} (0 maps to +1).
- ``ternary``: levels in {-1, 0, +1}: 0 where |w| <= threshold * mean|w| (TWN's rule, Li & Liu 2016,
  threshold 0.7 by default), sign(w) elsewhere.
- ``dorefa``: DoReFa-Net's k-bit weights (k >= 2), the formula of Distiller's DorefaQuantizer:
  2 * round_k(tanh(w) / (2 max|tanh(w)|) + 0.5) - 1, gradient through tanh.

``scale``: ``"none"`` keeps the bare levels (the paper's "mere binary and ternary kernels");
``"layer"`` multiplies them by one per-tensor alpha = <w, q> / <q, q>, the least-squares fit to
the FP weights: mean|w| for binary (what Distiller's 1-bit DoReFa does), the mean |w| above the
threshold for ternary (TWN).
"""
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

WEIGHT_QUANTIZERS = {}
SCALES = ("none", "layer")


def register_weight_quantizer(name):
    """Register a ``WeightQuantizer`` subclass under ``name`` (the YAML ``weight_mode``)."""
    def decorator(cls):
        if name in WEIGHT_QUANTIZERS:
            raise ValueError(f"a weight quantizer named {name!r} is already registered")
        WEIGHT_QUANTIZERS[name] = cls
        cls.mode = name
        return cls
    return decorator


def _straight_through(w, q):
    """Value of ``q``, gradient of ``w``."""
    return w + (q - w).detach()


class WeightQuantizer(nn.Module):
    """Base class: subclasses define ``levels(w)``, values in [-1, 1] carrying a gradient to ``w``."""
    bits = None

    def __init__(self, scale="layer"):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"unknown weight scale {scale!r}; choose one of: {', '.join(SCALES)}")
        self.scale = scale

    def levels(self, w):
        raise NotImplementedError

    def unrounded_levels(self, w):
        """``w`` mapped onto the levels' range without rounding: by default w / mean|w|."""
        return w / w.abs().mean().clamp_min(torch.finfo(w.dtype).tiny)

    def _alpha(self, w, q):
        with torch.no_grad():
            return (w * q).sum() / (q * q).sum().clamp_min(torch.finfo(q.dtype).tiny)

    def forward(self, w):
        q = self.levels(w)
        if self.scale == "layer":
            q = q + ((self._alpha(w, q) - 1) * q).detach()
        return q

    def unrounded(self, w):
        """The FP counterpart of ``forward(w)``: the same mapping and scale, no rounding, so that a layer
        left in full precision beside quantized ones (stochastic precision) keeps their scale."""
        c = self.unrounded_levels(w)
        return c * self._alpha(w, self.levels(w)) if self.scale == "layer" else c

    def extra_repr(self):
        return f"scale={self.scale}"


@register_weight_quantizer("binary")
class BinaryWeights(WeightQuantizer):
    """Weights in {-1, +1} (times alpha when ``scale="layer"``)."""
    bits = 1

    def levels(self, w):
        return _straight_through(w, torch.where(w >= 0, 1.0, -1.0).to(w.dtype))


@register_weight_quantizer("ternary")
class TernaryWeights(WeightQuantizer):
    """Weights in {-1, 0, +1}: zero where |w| <= threshold * mean|w| (TWN)."""
    bits = 2

    def __init__(self, scale="layer", threshold=0.7):
        super().__init__(scale)
        if not threshold > 0:
            raise ValueError(f"ternary threshold must be > 0 (a fraction of mean|w|, TWN uses 0.7), got {threshold}")
        self.threshold = threshold

    def levels(self, w):
        with torch.no_grad():
            delta = self.threshold * w.abs().mean()
            q = torch.sign(w) * (w.abs() > delta)
        return _straight_through(w, q)

    def extra_repr(self):
        return f"scale={self.scale}, threshold={self.threshold}"


@register_weight_quantizer("dorefa")
class DorefaWeights(WeightQuantizer):
    """DoReFa-Net k-bit weights (k >= 2), as in Distiller's ``dorefa_quantize_param``."""

    def __init__(self, bits, scale="none"):
        super().__init__(scale)
        if not isinstance(bits, int) or bits < 2:
            raise ValueError(f"dorefa weights need an integer bit width >= 2 (use weight_mode binary for 1 bit), "
                             f"got {bits!r}")
        self.bits = bits

    def levels(self, w):
        n = 2 ** self.bits - 1
        t = torch.tanh(w)
        t = t / (2 * t.abs().max()) + 0.5
        return 2 * _straight_through(t, torch.round(t * n) / n) - 1

    def unrounded_levels(self, w):
        t = torch.tanh(w)
        return t / t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)

    def extra_repr(self):
        return f"bits={self.bits}, scale={self.scale}"


def make_weight_quantizer(mode, **kwargs):
    """Build the quantizer registered as ``mode``; an unknown mode lists the valid ones."""
    try:
        cls = WEIGHT_QUANTIZERS[mode]
    except KeyError:
        raise ValueError(f"unknown weight mode {mode!r}; choose one of: {', '.join(sorted(WEIGHT_QUANTIZERS))}") from None
    return cls(**kwargs)


def quantize_weights_(model, quantizer, layer_types=(nn.Conv2d, nn.Linear), skip=()):
    """Quantize in place the ``weight`` of every ``layer_types`` module of ``model`` (first and last
    included) not named in ``skip``, with ``torch.nn.utils.parametrize``: the FP weight stays the
    trained parameter (``<layer>.parametrizations.weight.original``). Returns the names quantized."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, layer_types) and name not in skip:
            parametrize.register_parametrization(module, "weight", quantizer)
            names.append(name)
    return names
