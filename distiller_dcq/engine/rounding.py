"""Learned level choices for binary and ternary weights, AdaRound-style (plain PyTorch).

AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020) and
BRECQ (Li et al., ICLR 2021, block by block) keep the FP weights frozen and learn, per weight, only
whether it rounds down or up: a soft choice h(V) in [0, 1] (a rectified sigmoid of a free variable V)
in the forward pass, a regularizer that pushes every h to 0 or 1 (its exponent beta annealed from high
to low), and the hard choice at the end. For binary and ternary weights the two candidates of a weight
are its directly quantized level and the adjacent level towards its FP value (within the levels'
range): the choice is whether it leaves its direct level. Weights whose FP value lies beyond the
outermost level (|w| >= alpha) have no other candidate.
"""
import torch
import torch.nn as nn

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1 exactly


def rectified_sigmoid(v):
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class LevelChoice(nn.Module):
    """The learned choice between two levels for each weight of one tensor.

    Args:
        fp: the frozen FP weights.
        quantized: their direct quantization, ``alpha * levels`` with levels in {-1, 0, 1} (binary: {-1, 1}).
        alpha: the scale (a scalar tensor, > 0).
        ternary: whether the levels are ternary (else binary).
    """

    def __init__(self, fp, quantized, alpha, ternary):
        super().__init__()
        fp, quantized, alpha = fp.detach(), quantized.detach(), alpha.detach()
        level = torch.round(quantized / alpha)
        position = (fp / alpha).clamp(-1, 1)
        toward = torch.sign(position - level)  # from the direct level towards the FP value
        other = (level + toward * (1 if ternary else 2)).clamp(-1, 1)
        if not ternary:  # a binary weight's only other level is the opposite one
            other = torch.where(other.abs() == 1, other, level)
        self.register_buffer("alpha", alpha)
        self.register_buffer("lower", torch.minimum(level, other))
        self.register_buffer("upper", torch.maximum(level, other))
        self.register_buffer("has_choice", self.upper != self.lower)
        span = (self.upper - self.lower).clamp_min(1)
        # start at the FP value's place between the two, on the direct level's side of the middle
        start = ((position - self.lower) / span).clamp(0.01, 0.99)
        start = torch.where(level == self.upper, start.clamp_min(0.51), start.clamp_max(0.49))
        self.logits = nn.Parameter(-torch.log((ZETA - GAMMA) / (start - GAMMA) - 1))

    def soft(self):
        """The weights with every choice soft: between the two levels, differentiable in ``logits``."""
        return self.alpha * (self.lower + (self.upper - self.lower) * rectified_sigmoid(self.logits))

    def hard(self):
        """The weights with every choice made."""
        return self.alpha * torch.where(self.logits >= 0, self.upper, self.lower)

    def regularizer(self, beta):
        """AdaRound's 1 - |2h - 1|^beta, averaged over the weights with a choice: 0 when every h is 0 or 1,
        at most 1 whatever the layer's size (AdaRound sums it, against a reconstruction error summed over
        the layer's outputs; our section losses are means)."""
        h = rectified_sigmoid(self.logits)[self.has_choice]
        return (1 - (2 * h - 1).abs().pow(beta)).mean() if h.numel() else h.sum()


def annealed_beta(progress, warmup=0.2, start=20.0, end=2.0):
    """The regularizer's exponent at ``progress`` (0: the first step, 1: the end), as BRECQ's
    ``LinearTempDecay``: None (no regularizer) during ``warmup``, then falling linearly from ``start``
    to ``end``."""
    if progress < warmup:
        return None
    return end + (start - end) * max(0.0, 1 - (progress - warmup) / (1 - warmup))
