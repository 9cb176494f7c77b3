"""Training a low-bit network beside a full-precision partner (plain PyTorch).

Joint knowledge distillation (Zhuang et al., TPAMI 2022, "guided training"): the low-precision model
and an FP model learn together, each from the labels and from the other's softened class
probabilities, the other's logits detached, so that neither loss moves the other model.
"""
import torch.nn.functional as F

from .losses import kl_loss


def mutual_distillation_losses(low_logits, fp_logits, target, temperature=4.0, kd_weight=1.0, label_weight=1.0):
    """(loss of the low-precision model, loss of the FP partner): each ``label_weight`` x cross-entropy
    plus ``kd_weight`` x KL(other || self) at ``temperature`` (times temperature**2), the other detached."""
    def loss(own, other):
        total = kd_weight * kl_loss(own, other.detach(), logits=True, temperature=temperature)
        return total + label_weight * F.cross_entropy(own, target) if label_weight else total
    return loss(low_logits, fp_logits), loss(fp_logits, low_logits)
