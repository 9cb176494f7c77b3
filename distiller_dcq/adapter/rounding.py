"""``AdaRoundPolicy``: DCQ's sections restricted to AdaRound-style level choices (engine: ``engine/rounding.py``)."""
import logging

import torch
from distiller.policy import LossComponent, PolicyLoss, ScheduledTrainingPolicy

from ..engine.quantizers import BinaryWeights, TernaryWeights
from ..engine.rounding import LevelChoice, annealed_beta
from .checkpoints import load_optimizer_state
from .compat import RESUMED_POLICY_STATES
from .quantizer import quantizer_of

msglogger = logging.getLogger()


class AdaRoundPolicy(ScheduledTrainingPolicy):
    """Learn only which weights leave their directly quantized level (AdaRound, Nagel et al., ICML 2020;
    block by block as in BRECQ, Li et al., ICLR 2021), with the losses of the policies beside it (a
    ``SectionalKDPolicy`` in the same window: each section's reconstruction loss).

    Over its window no parameter of the model moves (their gradients are dropped before the model's
    optimizer steps); each binary or ternary weight has a soft choice between its direct level and the
    adjacent level towards its FP value, trained with Adam and pushed to 0 or 1 by AdaRound's regularizer
    (exponent annealed linearly from ``beta[0]`` to ``beta[1]`` after ``warmup``). Every forward in
    evaluation mode (validation) sees the choices made (rounded). At the window's end the choices are
    final: the FP weights become the chosen quantized weights, so that the quantizer gives exactly them
    from then on. All choices learn together, whatever the section policy's mode. Needs DCQQuantizer with
    binary or ternary weights; one contiguous window (``frequency: 1``) that ends within the run.

    Args (YAML keys):
        lr: Adam's learning rate for the choices (default 0.1; BRECQ's 0.001 is for 20,000 steps).
        regularizer_weight: the regularizer's weight (default 1); the regularizer is a mean over the weights
            of each layer (AdaRound's sum, weighted 0.01, faces a reconstruction error summed over outputs).
        warmup: fraction of the window without the regularizer (default 0.2, BRECQ's).
        beta: the regularizer's exponent at the warm-up's end and at the window's end (default [20, 2]).
    """

    must_finish_window = True  # a checkpoint saved before the choices are final would load without them

    def __init__(self, model, name="adaround", lr=0.1, regularizer_weight=1.0, warmup=0.2, beta=(20, 2)):
        super().__init__()
        if not lr > 0 or not regularizer_weight >= 0 or not 0 <= warmup < 1:
            raise ValueError(f"AdaRound policy {name!r}: lr must be > 0, regularizer_weight >= 0 and warmup in [0, 1), "
                             f"got lr {lr}, regularizer_weight {regularizer_weight}, warmup {warmup}")
        if len(beta) != 2 or not beta[0] >= beta[1] > 0:
            raise ValueError(f"AdaRound policy {name!r}: beta is [start, end] with start >= end > 0, got {beta}")
        self.name, self.lr, self.regularizer_weight, self.warmup = name, float(lr), float(regularizer_weight), warmup
        self.beta = tuple(float(b) for b in beta)
        self.choices, self.optimizer, self._window, self._eval_hook = None, None, None, None
        self._hard_in_place = False  # whether the layers hold the hard choices since the last training step
        self._progress = 0.0  # how far through the window the last training step was, in [0, 1)
        self._resumed = getattr(model, RESUMED_POLICY_STATES, {}).get(name)

    def checkpoint_state(self):
        """The choices so far and Adam's state, for a run resumed inside the window."""
        if self.choices is None:
            return {}
        return {"logits": [choice.logits.detach() for _, choice in self.choices],
                "optimizer": self.optimizer.state_dict()}

    def on_epoch_begin(self, model, zeros_mask_dict, meta, **kwargs):
        if meta.get("frequency") != 1:
            raise ValueError(f"AdaRound policy {self.name!r} needs one contiguous window: schedule it with "
                             f"starting_epoch, ending_epoch and frequency: 1")
        self._window = meta["starting_epoch"], meta["ending_epoch"]
        if self.choices is None:
            self._start(model)
            self._eval_hook = model.register_forward_pre_hook(
                lambda module, inputs: None if module.training else self._use_hard_choices())

    def _start(self, model):
        quantizer = quantizer_of(model)
        if quantizer is None:
            raise ValueError(f"AdaRound policy {self.name!r} works with DCQQuantizer: declare the quantizer as "
                             f"class: DCQQuantizer, with weight_mode binary or ternary")
        self.quantizer, self.choices = quantizer, []
        for param in [p for p in quantizer.params_to_quantize if p.q_attr_name == "weight"]:  # biases stay
            weights = quantizer.weight_quantizer_for(param.num_bits)
            if not isinstance(weights, (BinaryWeights, TernaryWeights)):
                raise ValueError(f"AdaRound policy {self.name!r}: {param.module_name} has {param.num_bits}-bit DoReFa "
                                 f"weights; level choices are for binary and ternary weights only")
            fp = getattr(param.module, param.fp_attr_name)
            quantized = weights(fp).detach()
            alpha = quantized.abs().max().clamp_min(torch.finfo(quantized.dtype).tiny)
            self.choices.append((param, LevelChoice(fp, quantized, alpha, isinstance(weights, TernaryWeights))))
        if not self.choices:
            raise ValueError(f"AdaRound policy {self.name!r} found no quantized weights: schedule the quantizer "
                             f"from the policy's first epoch")
        self.optimizer = torch.optim.Adam([choice.logits for _, choice in self.choices], lr=self.lr)
        if self._resumed:
            saved = self._resumed["logits"]
            if [tuple(s.shape) for s in saved] != [tuple(c.logits.shape) for _, c in self.choices]:
                raise ValueError(f"AdaRound policy {self.name!r}: the checkpoint holds choices for {len(saved)} "
                                 f"weight tensors of other shapes than the {len(self.choices)} quantized now: resume "
                                 f"with the schedule (quantizer and overrides) the run was started with")
            for (_, choice), logits in zip(self.choices, saved):
                choice.logits.data.copy_(logits)
            load_optimizer_state(self.optimizer, self._resumed["optimizer"], f"AdaRound policy {self.name!r}")
            self._resumed = None
        with_choice = sum(int(choice.has_choice.sum()) for _, choice in self.choices)
        total = sum(choice.logits.numel() for _, choice in self.choices)
        msglogger.info("AdaRound %s: %d of %d quantized weights may leave their direct level", self.name,
                       with_choice, total)

    def on_minibatch_begin(self, model, epoch, minibatch_id, minibatches_per_epoch, zeros_mask_dict, meta,
                           optimizer=None):
        for param, choice in self.choices:
            setattr(param.module, param.q_attr_name, choice.soft())
        self._hard_in_place = False
        self._progress = (epoch - self._window[0] + minibatch_id / minibatches_per_epoch) / (
            self._window[1] - self._window[0])

    def before_backward_pass(self, model, epoch, minibatch_id, minibatches_per_epoch, loss, zeros_mask_dict,
                             optimizer=None):
        beta = annealed_beta(self._progress, self.warmup, *self.beta)
        if beta is None:
            return None
        regularizer = self.regularizer_weight * sum(choice.regularizer(beta) for _, choice in self.choices)
        # one name for every step: Distiller keeps a meter per name, and a name with beta in it made one per step
        return PolicyLoss(loss + regularizer, [LossComponent("AdaRound regularizer", regularizer)])

    def before_parameter_optimization(self, model, epoch, minibatch_id, minibatches_per_epoch, zeros_mask_dict,
                                      meta, optimizer):
        for p in model.parameters():  # the model's optimizer moves nothing: no gradient, no momentum, no decay
            p.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _use_hard_choices(self):
        if self._hard_in_place:  # once per validation, not once per batch
            return
        with torch.no_grad():
            for param, choice in self.choices:
                setattr(param.module, param.q_attr_name, choice.hard())
        self._hard_in_place = True

    def on_epoch_end(self, model, zeros_mask_dict, meta, **kwargs):
        if meta["current_epoch"] != meta["ending_epoch"] - 1:
            beta = annealed_beta(self._progress, self.warmup, *self.beta)
            msglogger.info("AdaRound %s: %s", self.name, "regularizer off (warm-up)" if beta is None
                           else f"regularizer's exponent (beta) {beta:.1f}")
            return
        left = undecided = 0
        with torch.no_grad():
            for param, choice in self.choices:
                fp, hard = getattr(param.module, param.fp_attr_name), choice.hard()
                left += int((hard != self.quantizer.weight_quantizer_for(param.num_bits)(fp)).sum())
                undecided += int(((choice.soft() != hard) & choice.has_choice).sum())
                fp.copy_(hard)
        self.quantizer.quantize_params()
        self._eval_hook.remove()
        total = sum(choice.logits.numel() for _, choice in self.choices)
        msglogger.info("AdaRound %s: choices made; %d of %d quantized weights left their direct level (%.2f%%); "
                       "%d choices were still soft and were rounded", self.name, left, total, 100 * left / total,
                       undecided)
        self.choices, self.optimizer, self._eval_hook = None, None, None
