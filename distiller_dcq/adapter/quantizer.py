"""``DCQQuantizer``: Distiller's DorefaQuantizer with binary, ternary and k-bit weight modes."""
import weakref

from distiller.quantization.clipped_linear import DorefaQuantizer

from ..engine.quantizers import BinaryWeights, DorefaWeights, make_weight_quantizer

_MODE_BITS = {"binary": 1, "ternary": 2}
# scale when the YAML gives none: least-squares per layer for binary/ternary (what Distiller's 1-bit
# DoReFa does), none for k-bit DoReFa (Distiller's formula, which has no scale)
DEFAULT_SCALE = {"binary": "layer", "ternary": "layer", "dorefa": "none"}
_QUANTIZER_OF = weakref.WeakKeyDictionary()  # model -> the DCQQuantizer that prepared it


def quantizer_of(model):
    """The ``DCQQuantizer`` built for ``model`` in this process, or None."""
    return _QUANTIZER_OF.get(model)


class DCQQuantizer(DorefaQuantizer):
    """Quantization-aware training of every conv/linear weight (first and last layers included).

    Args (YAML keys):
        weight_mode: ``binary`` {-1,+1}, ``ternary`` {-1,0,+1} or ``dorefa`` (k-bit, needs bits_weights).
        scale: ``layer`` (one least-squares scale per tensor) or ``none`` (bare levels); default: ``layer``
            for binary/ternary weights, ``none`` for k-bit DoReFa (Distiller's formula), per layer kind.
        ternary_threshold: ternary zeroes |w| <= ternary_threshold * mean|w| (TWN: 0.7).
        bits_weights: only for ``dorefa``; binary is 1 bit and ternary is stored as 2.
        bits_activations: DoReFa activation bits (ReLU -> clipped [0, 1] levels); None keeps FP activations.
        bits_bias: bias bits; None (default) keeps biases FP.
        overrides: Distiller's per-layer overrides; ``bits_weights: null`` keeps a layer FP, another
            bit width gives that layer k-bit DoReFa weights (1 bit: binary).
    """

    def __init__(self, model, optimizer, weight_mode="binary", scale=None, ternary_threshold=0.7,
                 bits_weights=None, bits_activations=None, bits_bias=None, overrides=None):
        self.weight_quantizer = self._main_quantizer(weight_mode, scale, ternary_threshold, bits_weights)
        super().__init__(model, optimizer, bits_activations=bits_activations,
                         bits_weights=self.weight_quantizer.bits, bits_bias=bits_bias, overrides=overrides)
        self.scale = scale
        self._by_bits = {self.weight_quantizer.bits: self.weight_quantizer}
        self.param_quantization_fn = self._quantize_param
        model.quantizer_metadata["params"].update(weight_mode=weight_mode, scale=scale,
                                                  ternary_threshold=ternary_threshold)
        _QUANTIZER_OF[model] = self

    @staticmethod
    def _main_quantizer(weight_mode, scale, ternary_threshold, bits_weights):
        scale = scale or DEFAULT_SCALE.get(weight_mode, "layer")
        if weight_mode in _MODE_BITS and bits_weights not in (None, _MODE_BITS[weight_mode]):
            raise ValueError(f"weight_mode {weight_mode} has {_MODE_BITS[weight_mode]} bit(s), but bits_weights is "
                             f"{bits_weights}: drop bits_weights, or use weight_mode dorefa for k-bit weights")
        if weight_mode == "ternary":
            return make_weight_quantizer(weight_mode, scale=scale, threshold=ternary_threshold)
        if weight_mode == "dorefa":
            if bits_weights is None:
                raise ValueError("weight_mode dorefa needs bits_weights (an integer >= 2)")
            return make_weight_quantizer(weight_mode, bits=bits_weights, scale=scale)
        return make_weight_quantizer(weight_mode, scale=scale)

    def weight_quantizer_for(self, bits):
        """The weight quantizer of ``bits``-bit parameters: the main one, or binary / k-bit DoReFa."""
        if bits not in self._by_bits:
            kind = "binary" if bits == 1 else "dorefa"
            scale = self.scale or DEFAULT_SCALE[kind]
            self._by_bits[bits] = BinaryWeights(scale) if bits == 1 else DorefaWeights(bits, scale)
        return self._by_bits[bits]

    def _quantize_param(self, param_fp, param_meta):
        return self.weight_quantizer_for(param_meta.num_bits)(param_fp)
