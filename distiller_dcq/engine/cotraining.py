"""Training a low-bit network beside full-precision help that is discarded afterwards (plain PyTorch).

- Joint knowledge distillation (Zhuang et al., TPAMI 2022, "guided training"): the low-precision
  model and an FP model learn together, each from the labels and from the other's softened class
  probabilities, the other's logits detached, so that neither loss moves the other model.
- The full-precision auxiliary module (Zhuang et al., CVPR 2020): an FP side path with its own
  classifier, fed by the low-precision network's feature maps.
"""
import torch.nn as nn
import torch.nn.functional as F

from .losses import kl_loss


def mutual_distillation_losses(low_logits, fp_logits, target, temperature=4.0, kd_weight=1.0, label_weight=1.0):
    """(loss of the low-precision model, loss of the FP partner): each ``label_weight`` x cross-entropy
    plus ``kd_weight`` x KL(other || self) at ``temperature`` (times temperature**2), the other detached."""
    def loss(own, other):
        total = kd_weight * kl_loss(own, other.detach(), logits=True, temperature=temperature)
        return total + label_weight * F.cross_entropy(own, target) if label_weight else total
    return loss(low_logits, fp_logits), loss(fp_logits, low_logits)


class AuxiliaryModule(nn.Module):
    """The full-precision auxiliary module of Zhuang, Liu, Tan, Shen, Reid ("Training Quantized Neural
    Networks with a Full-precision Auxiliary Module", CVPR 2020; the authors' code): an FP side path
    over feature maps tapped from the low-precision network, first to last. Each tap goes through an
    adaptor (1x1 conv + BN); the path adds it to its running sum (carried through a 1x1 conv + BN
    where channels or resolution change) and applies a ReLU; global average pooling and a linear
    classifier end it. Gradients flow back into the low-precision network through the adaptors.

    Args:
        shapes: the (channels, height, width) of each tapped feature map, in forward order.
        num_classes: outputs of the auxiliary classifier.
    """

    def __init__(self, shapes, num_classes):
        super().__init__()
        self.adaptors = nn.ModuleList(_conv1x1_bn(c, c) for c, _, _ in shapes)
        transitions = [nn.Identity()]
        for (c_in, h_in, w_in), (c_out, h_out, w_out) in zip(shapes, shapes[1:]):
            if h_in % h_out or w_in % w_out or h_in // h_out != w_in // w_out:
                raise ValueError(f"tapped feature maps of {h_in}x{w_in} then {h_out}x{w_out}: the auxiliary path "
                                 f"shrinks a map by an integer stride, the same in both directions; tap other modules")
            same = (c_in, h_in) == (c_out, h_out)
            transitions.append(nn.Identity() if same else _conv1x1_bn(c_in, c_out, stride=h_in // h_out))
        self.transitions = nn.ModuleList(transitions)
        self.classifier = nn.Linear(shapes[-1][0], num_classes)

    def forward(self, features):
        path = self.adaptors[0](features[0])
        for adaptor, transition, feature in zip(self.adaptors[1:], self.transitions[1:], features[1:]):
            path = F.relu(transition(path) + adaptor(feature))
        return self.classifier(path.mean((2, 3)))


def _conv1x1_bn(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
