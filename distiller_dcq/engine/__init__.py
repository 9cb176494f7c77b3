"""The DCQ engine: plain PyTorch, no Distiller. Sections, section losses, weight quantizers."""
from .losses import LOSSES, get_loss, register_loss
from .quantizers import (WEIGHT_QUANTIZERS, BinaryWeights, DorefaWeights, TernaryWeights, WeightQuantizer,
                         make_weight_quantizer, quantize_weights_, register_weight_quantizer)
from .sections import (OUTPUT, SectionWiring, balanced_boundaries, recalibrate_batchnorm, trace_forward,
                       validate_boundaries)

__all__ = ["LOSSES", "get_loss", "register_loss", "WEIGHT_QUANTIZERS", "WeightQuantizer", "BinaryWeights",
           "TernaryWeights", "DorefaWeights", "make_weight_quantizer", "quantize_weights_",
           "register_weight_quantizer", "OUTPUT", "SectionWiring", "balanced_boundaries", "recalibrate_batchnorm",
           "trace_forward",
           "validate_boundaries"]
