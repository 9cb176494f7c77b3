"""``SectionalKDPolicy``: DCQ's train-section stage as a Distiller policy."""
import copy
import itertools
import logging

import distiller.models
import torch
from distiller.policy import LossComponent, PolicyLoss, ScheduledTrainingPolicy
from distiller.quantization.clipped_linear import ClippedLinearQuantization
from distiller.quantization.quantizer import FP_BKP_PREFIX

from ..engine.sections import PendingRecalibration, SectionWiring
from .checkpoints import fit_dataparallel_names, load_distiller_checkpoint
from .compat import RESUMED_POLICY_STATES, reweighted_criterion

msglogger = logging.getLogger()
MODES = {"parallel": "teacher", "sequential": "student", "mixed": "mixed"}  # mode -> where a section's input comes from


class SectionalKDPolicy(ScheduledTrainingPolicy):
    """Train each section of the quantized model to reproduce the teacher's activations at its end.

    Declared under ``extensions:`` and scheduled under ``policies:`` (``frequency: 1``). Its epoch
    window is the train-section stage: the model is split when the window starts and merged when
    it ends; epochs after it fine-tune the merged network as usual.

    Args (YAML keys):
        boundaries: module names whose outputs end sections, in forward order.
        num_sections: instead of boundaries, cut into N sections balanced by cost.
        mode: ``parallel`` (the paper's: every section learns at once from the teacher's inputs) or
            ``sequential`` (one section at a time, from the already-trained quantized sections before
            it, which stay frozen; ``section_epochs`` gives each section's share of the window) or
            ``mixed`` (every section at once, each input element drawn at random from the teacher's
            activation or the quantized sections' before it: QDrop's mix, Wei et al., ICLR 2022).
        section_epochs: sequential mode only: epochs per section, in order (default: 1 each); they
            must add up to the policy's window.
        loss: poisson (default), kl, mse, l1, cosine.
        temperature: softens the probabilities of the last section (and kl's distributions).
        label_weight: weight of the training criterion's loss (cross-entropy on the labels) next to the
            section losses (default 0: no labels). Terms added by policies scheduled before this one
            (e.g. regularizers) are kept as they are.
        teacher: path to an FP checkpoint of the same architecture; default: the model as it stood
            when the schedule was built (load it with --exp-load-weights-from).
        recalibrate_bn: at the merge, re-estimate the stitched network's BatchNorm statistics on the
            stage's last this many training batches, at most its last epoch's (default 0: keep the
            statistics gathered while split, which in parallel mode come from the teacher's
            activations). It happens right before the next forward pass (the stage's last
            validation), when every policy has finished the last step.

    Resuming (``--resume-from``) in the middle of the stage continues as if uninterrupted: the
    teacher's weights and the RNG states are saved in every Distiller checkpoint with the
    scheduler's state; the wiring and the trained section follow from the epoch.
    """

    def __init__(self, model, name="dcq", boundaries=None, num_sections=None, mode="parallel", section_epochs=None,
                 loss="poisson", temperature=1.0, label_weight=0.0, teacher=None, recalibrate_bn=0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown DCQ mode {mode!r}; choose one of: {', '.join(MODES)}")
        if section_epochs is not None and mode != "sequential":
            raise ValueError("section_epochs applies to mode: sequential only: remove it, or set mode: sequential")
        self.name, self.mode = name, mode
        self.label_weight = float(label_weight)
        if not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
            raise ValueError(f"recalibrate_bn is a number of training batches (an integer >= 0), got {recalibrate_bn!r}")
        self.recalibrate_bn, self._last_epoch, self._pending_recalibration = recalibrate_bn, None, None
        resumed = getattr(model, RESUMED_POLICY_STATES, {}).get(name)
        teacher_model = fp_teacher(model, name, teacher, resumed)
        example_input = torch.zeros(input_shape(model), device=next(model.parameters()).device)
        self.wiring = SectionWiring(model, teacher_model, boundaries, num_sections=num_sections,
                                    example_input=example_input, loss=loss, temperature=temperature,
                                    section_inputs=MODES[mode], keep_inputs=recalibrate_bn)
        sections = self.wiring.section_names
        self.section_epochs = list(section_epochs or [1] * len(sections)) if mode == "sequential" else None
        if self.section_epochs is not None and (len(self.section_epochs) != len(sections) or
                                                 not all(isinstance(e, int) and e > 0 for e in self.section_epochs)):
            raise ValueError(f"section_epochs must list one positive number of epochs per section ({len(sections)}: "
                             f"{', '.join(sections)}), got {section_epochs}")
        msglogger.info("DCQ %s: %s mode, %d sections ending at %s; loss %s; teacher %s", name, mode, len(sections),
                       ", ".join(sections), loss, teacher or "the model as loaded")

    def checkpoint_state(self):
        """What a resumed run needs that Distiller's checkpoint lacks (saved with the scheduler's state)."""
        teacher = getattr(self.wiring.teacher, "module", self.wiring.teacher)
        return {"teacher": teacher.state_dict()}

    def on_epoch_begin(self, model, zeros_mask_dict, meta, **kwargs):
        if meta.get("frequency") != 1:
            raise ValueError(f"DCQ policy {self.name!r} needs one contiguous window (its window is one stage): "
                             f"schedule it with starting_epoch, ending_epoch and frequency: 1, not "
                             + ("an epochs: list" if meta.get("frequency") is None else f"frequency: {meta['frequency']}"))
        self._last_epoch = meta["ending_epoch"] - 1
        self.wiring.recent_inputs.clear()  # this epoch's batches only: a resumed run keeps the same ones
        if not self.wiring.is_split:
            if not _is_quantized(model):
                raise ValueError(f"DCQ policy {self.name!r} found no quantized weights on the model: declare a "
                                 f"quantizer under quantizers: (class: DCQQuantizer) and schedule it under policies: "
                                 f"from the first epoch of the DCQ window")
            self.wiring.target_clip = _activation_clip(model)
            self.wiring.split()
            msglogger.info("DCQ %s: split into %d sections for epochs %d-%d", self.name,
                           len(self.wiring.section_names), meta["starting_epoch"], meta["ending_epoch"] - 1)
            if self.wiring.target_clip is not None:
                msglogger.info("DCQ %s: the quantized activations lie in [0, %g], and so do the teacher's activations "
                               "the sections learn and start from", self.name, self.wiring.target_clip)
        if self.section_epochs is not None:
            section = self._sequential_section(meta)
            self.wiring.train_sections([section])
            msglogger.info("DCQ %s: epoch %d trains section '%s' only; the others are frozen", self.name,
                           meta["current_epoch"], section)

    def _sequential_section(self, meta):
        window = meta["ending_epoch"] - meta["starting_epoch"]
        if sum(self.section_epochs) != window:
            raise ValueError(f"DCQ policy {self.name!r}: section_epochs {self.section_epochs} add up to "
                             f"{sum(self.section_epochs)} epochs, but its window has {window} (epochs "
                             f"{meta['starting_epoch']}-{meta['ending_epoch'] - 1}): make them equal")
        ends = itertools.accumulate(self.section_epochs)
        offset = meta["current_epoch"] - meta["starting_epoch"]
        return next(name for name, end in zip(self.wiring.section_names, ends) if offset < end)

    def before_backward_pass(self, model, epoch, minibatch_id, minibatches_per_epoch, loss, zeros_mask_dict,
                             optimizer=None):
        if not self.wiring.is_split:
            return None
        section_losses = self.wiring.section_losses()
        overall = reweighted_criterion(loss, self.label_weight, sum(section_losses.values()))
        components = [LossComponent(f"DCQ {name} {self.wiring.loss_name}", value)
                      for name, value in section_losses.items()]
        return PolicyLoss(overall, components)

    def on_minibatch_end(self, model, epoch, minibatch_id, minibatches_per_epoch, zeros_mask_dict, optimizer):
        if self.recalibrate_bn and epoch == self._last_epoch and minibatch_id == minibatches_per_epoch - 1:
            batches = list(self.wiring.recent_inputs)
            self.wiring.merge()
            # policies after this one (the quantizer's re-quantization) still have to finish this step
            self._pending_recalibration = PendingRecalibration(model, batches, lambda count: msglogger.info(
                "DCQ %s: re-estimated the stitched network's BatchNorm statistics on the last %d training batches",
                self.name, count))

    def on_epoch_end(self, model, zeros_mask_dict, meta, **kwargs):
        if meta["current_epoch"] != meta["ending_epoch"] - 1:
            return
        if self._pending_recalibration is not None:  # when no validation ran since the last step
            self._pending_recalibration.run()
        self.wiring.merge()
        top1 = kwargs.get("metrics", {}).get("max")
        msglogger.info("DCQ %s: merged the %d sections into one network; stitched network validation Top1: %s",
                       self.name, len(self.wiring.section_names), "n/a" if top1 is None else f"{top1:.3f}")


def _activation_clip(model):
    """Where Distiller's DoReFa quantizes activations (each ReLU replaced by a
    ``ClippedLinearQuantization`` to [0, clip_val]), the top of that range; else None."""
    clips = {float(m.clip_val) for m in model.modules() if isinstance(m, ClippedLinearQuantization)}
    if len(clips) > 1:
        raise ValueError(f"the model's quantized activations are clipped at different values {sorted(clips)}: DCQ "
                         f"clips the teacher's section activations to one range; use one clip value")
    return clips.pop() if clips else None


def _is_quantized(model):
    return any(n.rsplit(".", 1)[-1].startswith(FP_BKP_PREFIX) for n, _ in model.named_parameters())


def fp_teacher(model, name, path, resumed, key="teacher"):
    """The FP teacher: the model itself as it stands (a fresh run), else a new FP instance of its
    architecture with the weights of ``path`` or of the resumed checkpoint."""
    if not _is_quantized(model):
        teacher = copy.deepcopy(model)
    elif path is None and resumed is None:
        raise ValueError(f"policy {name!r}: the model is already quantized (resumed from a checkpoint made "
                         f"without this policy?) and nothing says what the FP teacher was: name the FP checkpoint "
                         f"in the YAML ({key}: path/to/fp.pth.tar)")
    else:
        # looked up at call time: datasets.py routes create_model for the networks it adds (SVHN)
        teacher = distiller.models.create_model(False, model.dataset, model.arch, parallel=False, device_ids=-1)
        if path is None:
            teacher.load_state_dict(resumed["teacher"])
    if path is not None:
        _load_teacher_weights(teacher, path, model)
    return teacher


def input_shape(model):
    inner = getattr(model, "module", model)
    shape = getattr(model, "input_shape", None) or getattr(inner, "input_shape", None)
    if shape is None:
        raise ValueError("the model has no input_shape attribute (Distiller's create_model sets it): cannot "
                         "check the DCQ boundaries")
    return tuple(shape)


def _load_teacher_weights(teacher_model, path, model):
    checkpoint = load_distiller_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"teacher checkpoint {path!r} has no 'state_dict': give a Distiller checkpoint")
    fp_copies = [k for k in checkpoint["state_dict"] if k.rsplit(".", 1)[-1].startswith(FP_BKP_PREFIX)]
    if checkpoint.get("quantizer_metadata") or fp_copies:
        found = "quantizer_metadata" if checkpoint.get("quantizer_metadata") else f"keys {fp_copies[:2]}"
        raise ValueError(f"teacher checkpoint {path!r} holds a quantized model (it has {found}): the teacher must be "
                         f"full precision; give the FP checkpoint the quantized run started from (its "
                         f"--exp-load-weights-from)")
    arch = getattr(model, "arch", None)
    if arch and checkpoint.get("arch") not in (None, arch):
        raise ValueError(f"teacher checkpoint {path!r} is for arch {checkpoint['arch']!r}, but the model is "
                         f"{arch!r}: give a teacher of the same architecture")
    fit_dataparallel_names(checkpoint, teacher_model)
    state, expected = checkpoint["state_dict"], teacher_model.state_dict()
    mismatched = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    missing = [k for k in expected if k not in state]
    if mismatched or missing:
        raise ValueError(f"teacher checkpoint {path!r} does not fit the model (missing {missing[:5]}, shape "
                         f"mismatch {mismatched[:5]}): give a teacher of the same architecture and classes")
    teacher_model.load_state_dict(state, strict=False)
