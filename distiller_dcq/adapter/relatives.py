"""DCQ's relatives as Distiller policies: methods that train a low-bit network with help from higher
precision, declared under ``extensions:`` and scheduled under ``policies:`` after the quantizer.

- ``SPEQPolicy``: stochastic precision ensemble, self-distillation (Boo et al., AAAI 2021).
- ``ProgressivePrecisionPolicy``: precision lowered stage by stage (Zhuang et al., TPAMI 2022).
- ``StochasticPrecisionPolicy``: units quantized at random, ever more often (same paper).
- ``JointKDPolicy``: an FP partner trained beside the low-bit model, each distilled from the other
  (same paper, the authors' "guided training").
- ``AuxiliaryModulePolicy``: an FP side path with its own classifier on the low-bit network's
  feature maps, trained with it and discarded (Zhuang et al., CVPR 2020).

Their engine parts are ``distiller_dcq.engine.precision`` and ``distiller_dcq.engine.cotraining``.
"""
import contextlib
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from distiller.policy import LossComponent, PolicyLoss, ScheduledTrainingPolicy
from distiller.quantization.clipped_linear import ClippedLinearQuantization
from distiller.quantization.q_utils import asymmetric_linear_quantization_params
from distiller.quantization.quantizer import FP_BKP_PREFIX

from ..engine.cotraining import AuxiliaryModule, mutual_distillation_losses
from ..engine.losses import cosine_loss
from ..engine.precision import (PrecisionStages, batchnorm_statistics_kept, independent_draws, precision_units,
                                rising_probability)
from .checkpoints import load_optimizer_state
from .compat import RESUMED_POLICY_STATES, criterion_inputs, reweighted_criterion
from .policy import fp_teacher, input_shape
from .quantizer import quantizer_of

msglogger = logging.getLogger()
# "full precision" for one of Distiller's clipped activation quantizers: 2**32 levels in [0, clip_val],
# the clipped activation within float32 rounding
FP_ACTIVATION_BITS = 32


def activation_quantizers(model):
    """Distiller's quantized activations (each ReLU replaced by a ``ClippedLinearQuantization``)."""
    return [m for m in model.modules() if isinstance(m, ClippedLinearQuantization)]


def set_activation_bits(quantizer, bits):
    """Make a ``ClippedLinearQuantization`` quantize to ``bits`` (None: full precision)."""
    quantizer.num_bits = FP_ACTIVATION_BITS if bits is None else bits
    quantizer.scale, quantizer.zero_point = asymmetric_linear_quantization_params(
        quantizer.num_bits, 0, quantizer.clip_val, signed=False)


@contextlib.contextmanager
def activation_bits(quantizers, bits):
    """Inside, each of ``quantizers`` quantizes to its entry of ``bits``; after, to what it did before."""
    before = [q.num_bits for q in quantizers]
    try:
        for q, b in zip(quantizers, bits):
            set_activation_bits(q, b)
        yield
    finally:
        for q, b in zip(quantizers, before):
            set_activation_bits(q, b)


def _has_quantized_weights(module):
    return hasattr(module, FP_BKP_PREFIX + "weight")


def _inner(model):
    """The network inside DataParallel (whose only child is ``module``)."""
    return getattr(model, "module", model)


def _dcq_quantizer(model, policy):
    quantizer = quantizer_of(model)
    if quantizer is None:
        raise ValueError(f"{policy} works with DCQQuantizer (for Distiller's DoReFa weights: weight_mode dorefa): "
                         f"declare the quantizer as class: DCQQuantizer")
    return quantizer


def _training_pass(module):
    """A forward that trains the model: in training mode, with gradients (not a teacher's pass)."""
    return module.training and torch.is_grad_enabled()


class _LastInput:
    """Keeps the input of the model's last training forward pass (not of passes while paused)."""

    def __init__(self, model):
        self.value, self._paused = None, False
        model.register_forward_pre_hook(self._record)

    def _record(self, module, inputs):
        if _training_pass(module) and not self._paused:
            self.value = inputs[0]

    @contextlib.contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def _needs_quantized_activations(model, policy):
    quantizers = activation_quantizers(model)
    if not quantizers:
        raise ValueError(f"{policy} needs quantized activations, and the model has none: set bits_activations on "
                         f"the quantizer (e.g. DCQQuantizer with bits_activations: 2) and schedule the quantizer from "
                         f"the policy's first epoch")
    return quantizers


class SPEQPolicy(ScheduledTrainingPolicy):
    """SPEQ (Boo, Shin, Choi, Sung, "Stochastic Precision Ensemble: Self-Knowledge Distillation for
    Quantized Deep Neural Networks", AAAI 2021): the teacher is the student itself, its weights
    shared, each activation quantizer taking ``high_bits`` with probability ``u`` or its own bits
    otherwise, drawn anew for every teacher forward; the student learns the teacher's soft labels
    by cosine similarity, beside the labels' cross-entropy. The teacher pass leaves BatchNorm's
    running statistics alone and carries no gradient.

    Args (YAML keys):
        u: probability of the high precision, per quantizer and forward (default 0.5).
        high_bits: the high precision (default 8).
        temperature: softens both soft labels (default 1).
        loss_weight: weight of the cosine loss (default 1).
        label_weight: weight of the criterion's cross-entropy (default 1).
    """

    def __init__(self, model, name="speq", u=0.5, high_bits=8, temperature=1.0, loss_weight=1.0, label_weight=1.0):
        super().__init__()
        if not 0 <= u <= 1:
            raise ValueError(f"SPEQ's u is a probability in [0, 1], got {u}")
        if not isinstance(high_bits, int) or high_bits < 2:
            raise ValueError(f"SPEQ's high_bits is a number of bits (an integer >= 2), got {high_bits!r}")
        self.name, self.u, self.high_bits = name, float(u), high_bits
        self.temperature, self.loss_weight, self.label_weight = float(temperature), float(loss_weight), float(label_weight)
        self.quantizers, self._input = None, _LastInput(model)

    def on_epoch_begin(self, model, zeros_mask_dict, meta, **kwargs):
        if self.quantizers is None:
            self.quantizers = _needs_quantized_activations(model, f"SPEQ policy {self.name!r}")
            low = max(q.num_bits for q in self.quantizers)
            if self.high_bits <= low:
                raise ValueError(f"SPEQ policy {self.name!r}: high_bits {self.high_bits} is not above the activations' "
                                 f"{low} bits: the teacher must have the higher precision")
            msglogger.info("SPEQ %s: teacher = the student with each of its %d activation quantizers at %d bits with "
                           "probability %g", self.name, len(self.quantizers), self.high_bits, self.u)

    def teacher_logits(self, model, inputs):
        """One forward of the stochastic-precision teacher: no gradient, BatchNorm statistics kept."""
        high = independent_draws(len(self.quantizers), self.u)
        bits = [self.high_bits if h else q.num_bits for h, q in zip(high, self.quantizers)]
        with torch.no_grad(), self._input.paused(), batchnorm_statistics_kept(model), \
                activation_bits(self.quantizers, bits):
            return model(inputs)

    def before_backward_pass(self, model, epoch, minibatch_id, minibatches_per_epoch, loss, zeros_mask_dict,
                             optimizer=None):
        student, _ = criterion_inputs(f"SPEQ policy {self.name!r}")
        teacher = self.teacher_logits(model, self._input.value)
        cosine = cosine_loss(student, teacher, logits=True, temperature=self.temperature)
        overall = reweighted_criterion(loss, self.label_weight, self.loss_weight * cosine)
        return PolicyLoss(overall, [LossComponent("SPEQ cosine", cosine)])


class ProgressivePrecisionPolicy(ScheduledTrainingPolicy):
    """Progressive quantization (Zhuang, Tan, Liu, Liu, Reid, Shen, "Effective Training of Convolutional
    Neural Networks with Low-Bitwidth Weights and Activations", TPAMI 2022): the window's epochs run
    in stages, each with its own weight and activation bits, each starting from the weights the stage
    before it left: weights first, then activations (``bits_activations: null`` = FP in the first
    stage), or bits lowered stage by stage (8 -> 4 -> 2). Needs ``DCQQuantizer`` (k-bit weights:
    ``weight_mode: dorefa``) and, for activation stages, its ``bits_activations``.

    Args (YAML keys):
        stages: a list of ``{epochs: E, bits_weights: B, bits_activations: A}``; ``bits_weights`` null
            keeps the quantizer's, ``bits_activations`` null is full precision; the epochs fill the window.
    """

    must_finish_window = True  # a run that stops mid-way would test an earlier stage's precision

    def __init__(self, model, stages, name="progressive"):
        super().__init__()
        self.name, self.stages, self._current, self._main_weights = name, PrecisionStages(stages), None, None

    def _check_last_stage(self, quantizer):
        last, main = self.stages.stages[-1], quantizer.weight_quantizer.bits
        activations = quantizer.default_qbits.acts
        if (last.bits_weights or main) != main or last.bits_activations != activations:
            raise ValueError(f"progressive policy {self.name!r}: the last stage trains weights at "
                             f"{last.bits_weights or main} bits and activations at {last.bits_activations or 'FP'}, but "
                             f"the quantizer (and the saved network) says {main} and {activations or 'FP'}: end with the "
                             f"quantizer's precision")

    def on_epoch_begin(self, model, zeros_mask_dict, meta, **kwargs):
        quantizer = _dcq_quantizer(model, f"progressive policy {self.name!r}")
        if self._main_weights is None:
            self._check_last_stage(quantizer)
            main = quantizer.weight_quantizer.bits  # layers overridden to other bits keep them
            self._main_weights = [p for p in quantizer.params_to_quantize if p.q_attr_name == "weight" and p.num_bits == main]
        stage = self.stages.at(meta["current_epoch"] - meta["starting_epoch"],
                               meta["ending_epoch"] - meta["starting_epoch"])
        if any(s.bits_activations is not None for s in self.stages.stages):
            quantizers = _needs_quantized_activations(model, f"progressive policy {self.name!r}")
        else:
            quantizers = activation_quantizers(model)
        for q in quantizers:
            set_activation_bits(q, stage.bits_activations)
        for param in self._main_weights:
            param.num_bits = stage.bits_weights or quantizer.weight_quantizer.bits
        quantizer.quantize_params()  # the stage's first forward already sees its bits
        if stage is not self._current:
            self._current = stage
            msglogger.info("progressive %s: epoch %d starts a stage of %d epoch(s): weights %s bits, activations %s",
                           self.name, meta["current_epoch"], stage.epochs,
                           stage.bits_weights or quantizer.weight_quantizer.bits, stage.bits_activations or "FP")


class StochasticPrecisionPolicy(ScheduledTrainingPolicy):
    """Stochastic precision (Zhuang et al., TPAMI 2022): at each training step every unit (a module
    holding quantized weights that is not a plain container: a ResNet's residual blocks, a plain
    net's layers, with the activation quantizers that follow them) is quantized with probability
    p(t) and otherwise runs in full precision (its FP weights mapped as the quantizer maps them, without
    rounding, so on the quantized weights' scale; activations clipped but not rounded); p rises
    linearly from ``start_probability`` to 1 at ``full_at`` of the window and stays there. Evaluation
    always quantizes everything. Needs DCQQuantizer; schedule it after the quantizer.

    Args (YAML keys):
        start_probability: p at the window's first step (default 0.5).
        full_at: the fraction of the window at which p reaches 1 (default 0.8).
    """

    def __init__(self, model, name="stochastic_precision", start_probability=0.5, full_at=0.8):
        super().__init__()
        rising_probability(0, start_probability, full_at)  # checks the values
        self.name, self.start_probability, self.full_at = name, float(start_probability), float(full_at)
        self.units, self.quantizer, self._window, self._fp_activations, self._restore = None, None, None, [], False

    def on_epoch_begin(self, model, zeros_mask_dict, meta, **kwargs):
        self._window = meta["starting_epoch"], meta["ending_epoch"]
        self.quantizer = _dcq_quantizer(model, f"stochastic precision policy {self.name!r}")
        if self.units is None:
            self.units = precision_units(_inner(model), _has_quantized_weights,
                                         lambda m: isinstance(m, ClippedLinearQuantization))
            if not self.units:
                raise ValueError(f"stochastic precision policy {self.name!r} found no quantized weights: schedule "
                                 f"the quantizer from the policy's first epoch")
            msglogger.info("stochastic precision %s: %d units: %s", self.name, len(self.units),
                           ", ".join(u.name for u in self.units))

    def quantize_probability(self, epoch, minibatch_id, minibatches_per_epoch):
        start, end = self._window
        return rising_probability((epoch - start + minibatch_id / minibatches_per_epoch) / (end - start),
                                  self.start_probability, self.full_at)

    def on_minibatch_begin(self, model, epoch, minibatch_id, minibatches_per_epoch, zeros_mask_dict, meta,
                           optimizer=None):
        p = self.quantize_probability(epoch, minibatch_id, minibatches_per_epoch)
        if p == 1:  # no draw: from here on, the run is plain QAT, random numbers included
            return
        quantized = independent_draws(len(self.units), p)
        fp_units = [unit for unit, keep in zip(self.units, quantized) if not keep]
        fp_modules = {id(m) for unit in fp_units for m in unit.weight_modules}
        for param in self.quantizer.params_to_quantize:
            if id(param.module) in fp_modules:  # until the step's end, the unrounded weights
                fp = getattr(param.module, param.fp_attr_name)
                setattr(param.module, param.q_attr_name,
                        self.quantizer.weight_quantizer_for(param.num_bits).unrounded(fp))
        self._fp_activations = [(q, q.num_bits) for unit in fp_units for q in unit.activation_modules]
        for q, _ in self._fp_activations:
            set_activation_bits(q, None)
        self._restore = bool(fp_units)

    def on_minibatch_end(self, model, epoch, minibatch_id, minibatches_per_epoch, zeros_mask_dict, optimizer):
        for q, bits in self._fp_activations:
            set_activation_bits(q, bits)
        self._fp_activations = []
        if self._restore:  # whether or not the quantizer's own window still runs
            self.quantizer.quantize_params()
            self._restore = False


class JointKDPolicy(ScheduledTrainingPolicy):
    """Joint knowledge distillation (Zhuang et al., TPAMI 2022; the authors' guided training): an FP
    partner, a copy of the model as loaded (the FP teacher), trains beside the low-bit model with its
    own SGD optimizer; each learns from the labels (cross-entropy) and from the other's softened class
    probabilities (KL at ``temperature``), the other's logits detached. The partner is not part of the
    model: the saved network is the low-bit one alone.

    Args (YAML keys):
        temperature: of both KL terms (default 4).
        kd_weight: weight of each KL term (default 1).
        label_weight: weight of each cross-entropy term (default 1).
        partner_lr, partner_momentum, partner_weight_decay: the partner's SGD (default 0.01, 0.9, 0).
        partner: path to an FP checkpoint to start the partner from; default: the model as loaded.
    """

    def __init__(self, model, name="joint_kd", temperature=4.0, kd_weight=1.0, label_weight=1.0, partner_lr=0.01,
                 partner_momentum=0.9, partner_weight_decay=0.0, partner=None):
        super().__init__()
        self.name, self.temperature = name, float(temperature)
        self.kd_weight, self.label_weight = float(kd_weight), float(label_weight)
        resumed = getattr(model, RESUMED_POLICY_STATES, {}).get(name)
        # made as DCQ's FP teacher is: the model as loaded, or the resumed run's partner
        self.partner = fp_teacher(model, name, partner, resumed and {"teacher": resumed["partner"]}, key="partner")
        self.partner.to(next(model.parameters()).device).train()
        for m in self.partner.modules():  # a copy of the model carries the hooks other policies put on it
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        self.optimizer = torch.optim.SGD(self.partner.parameters(), lr=partner_lr, momentum=partner_momentum,
                                         weight_decay=partner_weight_decay)
        if resumed:
            load_optimizer_state(self.optimizer, resumed["optimizer"], f"joint KD policy {name!r}")
        self._input = _LastInput(model)

    def checkpoint_state(self):
        """The partner and its optimizer, for a resumed run (saved with the scheduler's state)."""
        partner = getattr(self.partner, "module", self.partner)
        return {"partner": partner.state_dict(), "optimizer": self.optimizer.state_dict()}

    def before_backward_pass(self, model, epoch, minibatch_id, minibatches_per_epoch, loss, zeros_mask_dict,
                             optimizer=None):
        low, target = criterion_inputs(f"joint KD policy {self.name!r}")
        fp = self.partner(self._input.value)
        low_loss, fp_loss = mutual_distillation_losses(low, fp, target, self.temperature, self.kd_weight,
                                                       self.label_weight)
        self.optimizer.zero_grad()
        fp_loss.backward()
        self.optimizer.step()
        # low_loss holds the labels' cross-entropy itself: it replaces the criterion's
        return PolicyLoss(reweighted_criterion(loss, 0.0, low_loss), [LossComponent("joint KD low-bit loss", low_loss),
                                                               LossComponent("joint KD partner loss", fp_loss.detach())])


class AuxiliaryModulePolicy(ScheduledTrainingPolicy):
    """The full-precision auxiliary module (Zhuang, Liu, Tan, Shen, Reid, "Training Quantized Neural
    Networks with a Full-precision Auxiliary Module", CVPR 2020): an FP side path
    (``distiller_dcq.engine.cotraining.AuxiliaryModule``) reads feature maps of the low-bit network
    through forward hooks, never changing them, and ends in its own classifier; the loss is the
    network's cross-entropy plus ``aux_weight`` x the auxiliary classifier's, one backward pass. The
    module's SGD follows the model optimizer's learning rate, momentum and weight decay at every step;
    it is kept apart from the model and its optimizer, so the saved network is the low-bit one alone.

    Args (YAML keys):
        taps: module names whose outputs (4-D feature maps) feed the side path, in forward order;
            default: every outermost module with weights that is not a plain container and gives a
            feature map (a ResNet's stem conv and residual blocks, a plain net's conv layers).
        aux_weight: weight of the auxiliary cross-entropy (default 1).
    """

    def __init__(self, model, name="auxiliary", taps=None, aux_weight=1.0):
        super().__init__()
        self.name, self.aux_weight = name, float(aux_weight)
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            raise ValueError(f"auxiliary module {name!r} reads feature maps on one device: train on one GPU "
                             f"(--gpus 0) or the CPU, not {len(model.device_ids)} GPUs")
        modules = dict(_inner(model).named_modules())
        candidates = [t[len("module."):] if t.startswith("module.") else t for t in taps or []] or [
            u.name for u in precision_units(_inner(model), lambda m: isinstance(m, (nn.Conv2d, nn.Linear)),
                                            lambda m: False)]
        unknown = [t for t in candidates if t not in modules]
        if unknown:
            raise ValueError(f"auxiliary module {name!r}: the model has no module named {', '.join(unknown)}")
        shapes, logits = _output_shapes(model, [modules[t] for t in candidates])
        flat = [t for t, s in zip(candidates, shapes) if len(s) != 3]
        if taps and flat:
            raise ValueError(f"auxiliary module {name!r}: taps must give feature maps (N, C, H, W); {', '.join(flat)} "
                             f"do(es) not")
        self.taps = [t for t, s in zip(candidates, shapes) if len(s) == 3]
        if not self.taps:
            raise ValueError(f"auxiliary module {name!r}: no module of the model gives a feature map to tap")
        self.module = AuxiliaryModule([s for s in shapes if len(s) == 3], logits[-1])
        self.module.to(next(model.parameters()).device)
        self._resumed = getattr(model, RESUMED_POLICY_STATES, {}).get(name)
        if self._resumed:
            self.module.load_state_dict(self._resumed["module"])
        self.optimizer, self._features = None, []
        model.register_forward_pre_hook(lambda module, inputs: self._features.clear() if _training_pass(module) else None)
        for tap in self.taps:
            modules[tap].register_forward_hook(self._record)
        msglogger.info("auxiliary module %s: taps %s", name, ", ".join(self.taps))

    def _record(self, module, inputs, output):
        if _training_pass(module):
            self._features.append(output.clone())  # later in-place activations must not change what it read

    def checkpoint_state(self):
        """The module and its optimizer, for a resumed run (saved with the scheduler's state)."""
        return {"module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def before_backward_pass(self, model, epoch, minibatch_id, minibatches_per_epoch, loss, zeros_mask_dict,
                             optimizer=None):
        _, target = criterion_inputs(f"auxiliary module {self.name!r}")
        if len(self._features) != len(self.taps):
            raise RuntimeError(f"auxiliary module {self.name!r} read {len(self._features)} of its {len(self.taps)} "
                               f"taps in this forward pass: each tapped module must run once per forward")
        self.module.train(model.training)
        aux = F.cross_entropy(self.module(self._features), target)
        return PolicyLoss(loss + self.aux_weight * aux, [LossComponent("auxiliary module CE", aux)])

    def before_parameter_optimization(self, model, epoch, minibatch_id, minibatches_per_epoch, zeros_mask_dict, meta,
                                      optimizer):
        group = optimizer.param_groups[0]
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD(self.module.parameters(), lr=group["lr"],
                                             momentum=group.get("momentum", 0), weight_decay=group.get("weight_decay", 0))
            if self._resumed and self._resumed["optimizer"] is not None:
                load_optimizer_state(self.optimizer, self._resumed["optimizer"], f"auxiliary module {self.name!r}")
        for own in self.optimizer.param_groups:
            own.update(lr=group["lr"], momentum=group.get("momentum", 0), weight_decay=group.get("weight_decay", 0))
        self.optimizer.step()
        self.optimizer.zero_grad()


def _output_shapes(model, modules):
    """The per-sample output shape of each of ``modules`` and of ``model`` (last) on a zero input."""
    shapes, hooks = [], [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))) for m in modules]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(torch.zeros(input_shape(model), device=next(model.parameters()).device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    if len(shapes) != len(modules):
        raise ValueError(f"the auxiliary module's taps ran {len(shapes)} times for {len(modules)} taps: each must run "
                         f"once per forward")
    return shapes, tuple(logits.shape[1:])
