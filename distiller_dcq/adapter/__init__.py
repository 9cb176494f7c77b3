"""The Distiller adapter: YAML classes, registration with ``distiller.config``, compat patches.

The only package that imports Distiller; ``distiller_dcq.engine`` never does.
"""
import sys

from .._hooks import when_imported
from .batchnorm import BatchNormRecalibrationPolicy
from .compat import (patch_checkpoint_loading, patch_class_name_errors, patch_criterion_inputs, patch_criterion_loss,
                     patch_imagenet_resnets, patch_pandas_precision, patch_policy_windows, patch_quantizer_prepare,
                     patch_resumed_lr, patch_scheduler_state)
from .datasets import patch_cifar10_image_folders, patch_subset_dirs, patch_synthetic_dirs, register_svhn
from .policy import SectionalKDPolicy
from .quantizer import DCQQuantizer
from .relatives import (AuxiliaryModulePolicy, JointKDPolicy, ProgressivePrecisionPolicy, SPEQPolicy,
                        StochasticPrecisionPolicy)
from .rounding import AdaRoundPolicy

YAML_CLASSES = (DCQQuantizer, SectionalKDPolicy, SPEQPolicy, ProgressivePrecisionPolicy, StochasticPrecisionPolicy,
                JointKDPolicy, AuxiliaryModulePolicy, AdaRoundPolicy, BatchNormRecalibrationPolicy)


def register(distiller):
    """Make our classes resolvable as YAML ``class:`` names and apply the compat patches (once)."""
    import distiller.apputils.checkpoint as checkpoint_module
    import distiller.apputils.data_loaders as data_loaders
    import distiller.config as config
    import distiller.model_summaries as model_summaries
    import distiller.models.imagenet.resnet as imagenet_resnets
    import distiller.quantization.quantizer as quantizer_module
    if getattr(config, SectionalKDPolicy.__name__, None) is SectionalKDPolicy:
        return
    for cls in YAML_CLASSES:
        setattr(config, cls.__name__, cls)
    patch_pandas_precision(model_summaries)
    patch_imagenet_resnets(imagenet_resnets)
    patch_checkpoint_loading(checkpoint_module, distiller.apputils)
    patch_quantizer_prepare(quantizer_module)
    patch_resumed_lr(config, distiller.LRPolicy)
    patch_scheduler_state(distiller.CompressionScheduler)
    patch_criterion_loss(distiller.CompressionScheduler)
    patch_class_name_errors(config)
    patch_cifar10_image_folders(data_loaders, distiller.apputils)
    patch_synthetic_dirs(data_loaders, distiller.apputils)  # before subsets: a subset may draw from synthetic images
    patch_subset_dirs(data_loaders, distiller.apputils)
    register_svhn(data_loaders, distiller.apputils, distiller.models)
    # image_classifier imports compress_classifier's own parser.py: patch it only when an application loads it
    when_imported("distiller.apputils.image_classifier", _patch_image_classifier)


def _patch_image_classifier(image_classifier):
    patch_policy_windows(image_classifier, SectionalKDPolicy)
    patch_criterion_inputs(image_classifier)


register(sys.modules["distiller"])  # when this module was imported before Distiller (the hook waited for it)

__all__ = ["DCQQuantizer", "SectionalKDPolicy", "SPEQPolicy", "ProgressivePrecisionPolicy", "StochasticPrecisionPolicy",
           "JointKDPolicy", "AuxiliaryModulePolicy", "AdaRoundPolicy", "BatchNormRecalibrationPolicy", "register",
           "YAML_CLASSES"]
