"""Which parts of a quantized network run at which precision, step by step: the engine of DCQ's
relatives that train a low-bit network with help from higher precision (plain PyTorch).

- SPEQ (Boo et al., AAAI 2021): the teacher is the student itself with each activation quantizer
  drawn, per forward, at a high precision with probability u (``independent_draws``).
- Stochastic precision (Zhuang et al., TPAMI 2022): each unit (a residual block, or a layer in plain
  nets: ``precision_units``) is quantized with a probability rising to 1 (``rising_probability``).
- Progressive quantization (same paper): precision lowered stage by stage (``PrecisionStages``).

A teacher pass through the student must not move BatchNorm's running statistics
(``batchnorm_statistics_kept``).
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn


def independent_draws(count, probability, generator=None, device=None):
    """``count`` independent draws, each True with ``probability`` (which quantizers run at high
    precision, which units are quantized)."""
    if not 0 <= probability <= 1:
        raise ValueError(f"a probability lies in [0, 1], got {probability}")
    return (torch.rand(count, generator=generator, device=device) < probability).tolist()


def rising_probability(progress, start, full_at):
    """The probability of quantizing a unit at ``progress`` (0: the stage's first step, 1: its end):
    ``start`` at 0, rising linearly to 1 at ``full_at`` and staying there."""
    if not 0 <= start <= 1 or not 0 < full_at <= 1:
        raise ValueError(f"start must lie in [0, 1] and full_at in (0, 1], got start {start}, full_at {full_at}")
    return min(1.0, start + (1 - start) * progress / full_at)


@dataclass
class PrecisionUnit:
    """A part of the network that is quantized or left FP as a whole."""
    name: str
    weight_modules: list  # modules whose weights are quantized
    activation_modules: list  # activation quantizers that follow them


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def precision_units(model, has_quantized_weights, is_activation_quantizer):
    """The units of ``model``: the outermost modules holding quantized weights that are not plain
    containers (so a ResNet's blocks, a plain net's layers), in registration order; each activation
    quantizer belongs to the unit it lies in, or else to the unit registered before it (the layer it
    follows)."""
    units, owner = [], {}

    def visit(module, prefix):
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            inside = [m for m in child.modules() if has_quantized_weights(m)]
            if inside and isinstance(child, _CONTAINERS):
                visit(child, full)
            elif inside:
                unit = PrecisionUnit(full, inside, [m for m in child.modules() if is_activation_quantizer(m)])
                units.append(unit)
                owner.update({id(m): unit for m in child.modules()})
            else:
                for m in child.modules():
                    if is_activation_quantizer(m) and id(m) not in owner:
                        if not units:
                            raise ValueError(f"activation quantizer '{full}' comes before any quantized layer: "
                                             f"it belongs to no unit")
                        units[-1].activation_modules.append(m)
                        owner[id(m)] = units[-1]

    visit(model, "")
    return units


@contextlib.contextmanager
def batchnorm_statistics_kept(model):
    """Forward passes inside leave every BatchNorm's running statistics as they were (batch statistics
    are still used in training mode). They update copies: the tensors themselves stay untouched, since
    the backward pass of an earlier training-mode forward still needs them unmodified."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [dict(m._buffers) for m in norms]
    try:
        for m, buffers in zip(norms, saved):
            m._buffers.update({k: v.clone() for k, v in buffers.items() if v is not None})
        yield
    finally:
        for m, buffers in zip(norms, saved):
            m._buffers.update(buffers)


@dataclass
class PrecisionStage:
    epochs: int
    bits_weights: int = None  # None: the quantizer's own
    bits_activations: int = None  # None: full precision


class PrecisionStages:
    """Progressive quantization's stages, in order; their epochs must fill the policy's window."""

    def __init__(self, stages):
        if not stages:
            raise ValueError("stages must list at least one stage: {epochs: E, bits_weights: B, bits_activations: A}")
        self.stages = []
        for i, stage in enumerate(stages):
            unknown = set(stage) - {"epochs", "bits_weights", "bits_activations"}
            if unknown or not isinstance(stage.get("epochs"), int) or stage["epochs"] < 1:
                raise ValueError(f"stage {i} ({stage}) needs epochs: a positive integer, and may set only bits_weights "
                                 f"and bits_activations" + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
            for key in ("bits_weights", "bits_activations"):
                if stage.get(key) is not None and (not isinstance(stage[key], int) or stage[key] < 1):
                    raise ValueError(f"stage {i}: {key} is a number of bits (an integer >= 1) or null, got {stage[key]!r}")
            self.stages.append(PrecisionStage(**stage))

    def at(self, offset, window):
        """The stage of the window's epoch ``offset``; the stages' epochs must add up to ``window``."""
        total = sum(s.epochs for s in self.stages)
        if total != window:
            raise ValueError(f"the stages' epochs add up to {total}, but the policy's window has {window} epochs: "
                             f"make them equal")
        for stage in self.stages:
            if offset < stage.epochs:
                return stage
            offset -= stage.epochs
        raise ValueError(f"epoch offset {offset} lies past the last stage")
