"""Section losses: how far a student section's output is from the teacher's, in one registry.

Every loss has the signature ``loss(student, teacher, *, logits, temperature) -> scalar``:

- ``logits=False``: ``student``/``teacher`` are the activations at a section boundary (any shape,
  batch first). Losses compare them element by element (``poisson``, ``mse``, ``l1``), as one
  vector per sample (``cosine``), or as one distribution per sample (``kl``: a softmax over all
  features of a sample at ``temperature``).
- ``logits=True``: the last section, whose outputs are class scores. ``poisson``, ``kl`` and
  ``cosine`` compare the softened class probabilities ``softmax(z / temperature)``; ``mse`` and ``l1``
  compare raw logits (logit matching).

A new loss is one function plus ``@register_loss("name")``; the name is the YAML key.
"""
import torch
import torch.nn.functional as F

LOSSES = {}

# Keras' epsilon for log(y_hat): keeps the Poisson loss finite where a ReLU output is exactly 0.
POISSON_EPS = 1e-7


def register_loss(name):
    """Register ``fn`` under ``name`` (the value of the YAML key ``loss:``)."""
    def decorator(fn):
        if name in LOSSES:
            raise ValueError(f"a section loss named {name!r} is already registered")
        LOSSES[name] = fn
        return fn
    return decorator


def get_loss(name):
    """The registered loss called ``name``; an unknown name lists the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown section loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}") from None


@register_loss("poisson")
def poisson_loss(student, teacher, *, logits, temperature=1.0):
    """The paper's loss, mean(y_hat - y * log(y_hat)); its minimum (y_hat = y) is not 0.

    Feature maps must be non-negative rates (cut after a ReLU or a pooling of one); on logits it
    compares softened class probabilities, computed in log space so it is never NaN. Averaged over
    the C classes, that is soft-target cross-entropy / C (+ 1/C): 1/(C T^2) of ``kl``'s gradient.
    """
    if logits:
        log_p_student = F.log_softmax(student / temperature, dim=1)
        p_teacher = F.softmax(teacher / temperature, dim=1)
        return (log_p_student.exp() - p_teacher * log_p_student).mean()
    if bool((teacher < 0).any()):
        raise ValueError(
            f"the poisson loss needs non-negative activations, but the teacher's boundary output has "
            f"values down to {teacher.min().item():.3g}: cut the network after a ReLU (or a pooling of "
            f"one), or use another loss (mse, l1, cosine, kl)")
    student = student.clamp(min=0)
    return (student - teacher * torch.log(student + POISSON_EPS)).mean()


@register_loss("kl")
def kl_loss(student, teacher, *, logits, temperature=1.0):
    """KL(teacher || student) of per-sample softmax distributions, times temperature**2 (Hinton)."""
    if not logits:
        student, teacher = student.flatten(1), teacher.flatten(1)
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


@register_loss("mse")
def mse_loss(student, teacher, *, logits, temperature=1.0):
    """Mean squared error, element by element (raw logits on the last section)."""
    return F.mse_loss(student, teacher)


@register_loss("l1")
def l1_loss(student, teacher, *, logits, temperature=1.0):
    """Mean absolute error, element by element (raw logits on the last section)."""
    return F.l1_loss(student, teacher)


@register_loss("cosine")
def cosine_loss(student, teacher, *, logits, temperature=1.0):
    """1 - cosine similarity of each sample's flattened output (probabilities on the last section)."""
    if logits:
        student, teacher = F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1)
    return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1, eps=1e-8)).mean()
