"""Cutting a network into sections and training each one against the teacher (DCQ).

A section ends at the output of a named module (a *boundary*); the last one ends at the model's
output. While the wiring is split, every training-mode forward of the student

1. runs the frozen teacher once on the batch, keeping its activation at every boundary;
2. runs the student, and at each boundary keeps the student's activation (the end of section i)
   and hands on to section i+1 either the teacher's activation (``section_inputs="teacher"``, the
   paper's parallel mode) or the student's own, detached (``"student"``: the quantized prefix).

Gradients therefore never cross a section border. All sections learn in the same step, unless
``train_sections`` names some: the others are then frozen (no gradient, so no optimizer update at
all, and BatchNorm running statistics kept) - section by section, with student inputs, that is the
sequential mode.
Eval-mode forwards are left alone: validating the student always measures the stitched network.
``merge()`` removes the hooks, unfreezes, and leaves one ordinary network.
"""
import warnings
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .losses import get_loss

OUTPUT = "output"  # name of the last section's end: the model output
SECTION_INPUTS = ("teacher", "student", "mixed")
MIXED_TEACHER_SHARE = 0.5  # QDrop's drop probability: the share of a mixed input's elements taken from the teacher
_SPLIT_STUDENTS = weakref.WeakKeyDictionary()  # student -> the wiring currently split on it


def _drop_grad(param):
    param.grad = None


def _keep_running_statistics(module):
    """Hooks that put ``module``'s buffers (BatchNorm running statistics) back after each forward."""
    saved = {}

    def save(m, inputs):
        saved.update((n, b.clone()) for n, b in m.named_buffers(recurse=False))

    def restore(m, inputs, output):
        with torch.no_grad():
            for n, b in m.named_buffers(recurse=False):
                b.copy_(saved[n])

    return [module.register_forward_pre_hook(save), module.register_forward_hook(restore)]


def _strip_parallel_prefix(name):
    return name[len("module."):] if name.startswith("module.") else name


def _unwrap(model):
    return model.module if isinstance(model, nn.DataParallel) else model


def _without_dataparallel(model, named_items):
    """``named_items`` (from ``model.named_modules()`` or ``named_parameters()``) renamed as if no
    DataParallel wrapped any part of ``model`` (compress_classifier wraps the whole model on GPUs, and
    VGG's and AlexNet's ``features`` only), the wrappers themselves left out."""
    for name, item in named_items:
        if isinstance(item, nn.DataParallel):
            continue
        kept, owner = [], model
        for part in name.split(".") if name else []:
            if not (isinstance(owner, nn.DataParallel) and part == "module"):
                kept.append(part)
            owner = getattr(owner, part)
        yield ".".join(kept), item


def _module_index(model):
    """Module names of ``model`` (without DataParallel's ``module.``) -> module."""
    return OrderedDict((n, m) for n, m in _without_dataparallel(model, model.named_modules())
                       if n and ".parametrizations" not in n and not n.startswith("parametrizations"))


@dataclass
class ForwardTrace:
    """What one forward pass showed: modules in the order they first finish (a container after its
    children), call counts, conv/linear MACs, which modules returned the model's output, and for each
    module that returned a tensor, the outermost module that returned the same tensor (a block and
    its last layer end at the same place)."""
    order: list = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)
    macs: Counter = field(default_factory=Counter)
    returns_output: set = field(default_factory=set)
    outermost: dict = field(default_factory=dict)


def trace_forward(model, example_input):
    """Run ``model`` once on ``example_input`` (eval mode, no grad) and record a ``ForwardTrace``."""
    trace, handles, outputs = ForwardTrace(), [], {}
    modules = _module_index(model)

    def hook(name):
        def record(module, inputs, output):
            if not trace.calls[name]:
                trace.order.append(name)
            trace.calls[name] += 1
            outputs[name] = output
            if isinstance(module, (nn.Conv2d, nn.Linear)) and torch.is_tensor(output):
                per_output = module.weight[0].numel() if isinstance(module, nn.Conv2d) else module.in_features
                trace.macs[name] += output[0].numel() * per_output
        return record

    for name, module in modules.items():
        handles.append(module.register_forward_hook(hook(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model_output = model(example_input)
    finally:
        for m, training in modes.items():
            m.training = training
        for h in handles:
            h.remove()
    trace.returns_output = {n for n, out in outputs.items() if out is model_output}
    same_tensor = {}
    for name in trace.order:  # the outermost module finishes last
        if torch.is_tensor(outputs[name]):
            same_tensor.setdefault(id(outputs[name]), []).append(name)
    trace.outermost = {name: names[-1] for names in same_tensor.values() for name in names}
    return trace


def section_cuts(model, example_input):
    """Where ``model`` can be cut, at any depth: ``OrderedDict`` module name -> conv/linear MACs of the
    network up to and including it, in forward order, and the network's total MACs. A module can end
    a section if the next layer to run holds weights (so cuts fall after activations and poolings),
    it runs once and returns a tensor, no skip connection crosses it (``validate_boundaries``), and
    no module around it returns the same tensor (of a block and its last layer, the block is named)."""
    trace = trace_forward(model, example_input)
    modules = _module_index(model)
    leaves = [n for n in trace.order if not any(True for _ in modules[n].children())]
    position = {name: i for i, name in enumerate(trace.order)}

    def next_leaf_has_weights(name):
        later = next((leaf for leaf in leaves if position[leaf] > position[name]), None)
        return later is not None and isinstance(modules[later], (nn.Conv2d, nn.Linear))

    def valid_cut(name):
        try:
            validate_boundaries(model, [name], example_input)
            return True
        except Exception:  # not only the checks' ValueError: a cut the model cannot take (a tuple output...)
            return False

    total = sum(trace.macs.values())
    cuts = OrderedDict()
    for name in trace.order:
        if trace.outermost.get(name) == name and next_leaf_has_weights(name) and valid_cut(name):
            cuts[name] = sum(macs for n, macs in trace.macs.items() if position[n] <= position[name])
    return cuts, total


def _fewest_max_then_squares(prefix, total, k):
    """Indices of ``k`` of the increasing cut costs ``prefix`` splitting [0, total] so that the largest
    part is as small as possible, then the sum of squared parts; None if there are fewer than k."""
    if k > len(prefix):
        return None
    points = [0] + list(prefix)

    def best(combine, allowed=lambda part: True):
        # table[j][i]: best score of j cuts, the last at points[i] (i >= 1); built left to right
        table = [{0: (0, ())}] + [{} for _ in range(k)]
        for j in range(1, k + 1):
            for i in range(1, len(points)):
                options = [(combine(sc, points[i] - points[h]), cuts + (i - 1,)) for h, (sc, cuts) in table[j - 1].items()
                           if h < i and allowed(points[i] - points[h])]
                if options:
                    table[j][i] = min(options)
        finals = [(combine(sc, total - points[i]), cuts) for i, (sc, cuts) in table[k].items()
                  if allowed(total - points[i])]
        return min(finals) if finals else None

    largest, _ = best(max)
    return list(best(lambda sc, part: sc + part * part, allowed=lambda part: part <= largest)[1])


def balanced_boundaries(model, num_sections, example_input):
    """Choose ``num_sections - 1`` of ``section_cuts`` (at any depth) so that the most expensive section
    (conv/linear MACs) is as cheap as possible, then the costs as even as possible."""
    if not isinstance(num_sections, int) or num_sections < 1:
        raise ValueError(f"num_sections must be an integer >= 1, got {num_sections!r}")
    if num_sections == 1:
        return []
    cuts, total = section_cuts(model, example_input)
    chosen = _fewest_max_then_squares(list(cuts.values()), total, num_sections - 1)
    if chosen is None:
        raise ValueError(f"cannot cut {type(model).__name__} into {num_sections} sections: it has {len(cuts)} valid "
                         f"cuts ({', '.join(cuts)}), so at most {len(cuts) + 1} sections; lower num_sections or "
                         f"list boundaries by name")
    names = list(cuts)
    return validate_boundaries(model, [names[i] for i in chosen], example_input)


def validate_boundaries(model, boundaries, example_input):
    """Check ``boundaries`` against ``model``; return them without any DataParallel prefix."""
    if not boundaries:
        raise ValueError("the section list is empty: name at least one module whose output ends a section "
                         "(boundaries: [...]), or ask for num_sections: N")
    if isinstance(boundaries, str):
        raise ValueError(f"boundaries must be a list of module names, got the string {boundaries!r}: "
                         f"write [{boundaries}]")
    names = [_strip_parallel_prefix(b) for b in boundaries]
    valid = _module_index(model)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown boundary module(s) {unknown} in {type(model).__name__}; valid names: "
                         f"{', '.join(valid)}")
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    if duplicates:
        raise ValueError(f"boundary module(s) {duplicates} listed more than once: list each boundary once")
    trace = trace_forward(model, example_input)
    never = [n for n in names if not trace.calls[n]]
    if never:
        raise ValueError(f"boundary module(s) {never} never run in {type(model).__name__}'s forward pass: "
                         f"choose modules the forward pass calls")
    repeated = [n for n in names if trace.calls[n] > 1]
    if repeated:
        raise ValueError(f"boundary module(s) {repeated} run more than once per forward pass, so their output "
                         f"does not mark one place in the network: choose modules that run once")
    forward_order = sorted(names, key=trace.order.index)
    if forward_order != names:
        raise ValueError(f"boundaries must be listed in forward order: got {names}, the forward pass reaches "
                         f"them as {forward_order}")
    at_output = [n for n in names if n in trace.returns_output]
    if at_output:
        raise ValueError(f"boundary module(s) {at_output} produce the model output, where the last section ends "
                         f"anyway: remove them from the boundaries")
    _check_nothing_bypasses(model, names, example_input)
    return names


def _check_nothing_bypasses(model, boundaries, example_input):
    """Cut ``model`` at every boundary and ask autograd whether the end of each section still depends on
    anything before the section's own input: a skip/residual connection across a cut would do that."""
    modules = _module_index(model)
    cuts, ends, handles = [], [], []

    def cut(module, inputs, output):
        ends.append(output)
        cuts.append(output.detach().requires_grad_(True))
        return cuts[-1].clone()  # not the leaf itself: the next layer may work in place

    for name in boundaries:
        handles.append(modules[name].register_forward_hook(cut))
    modes = {m: m.training for m in model.modules()}
    x = example_input.detach().clone().requires_grad_(True)
    try:
        model.eval()
        with torch.enable_grad():
            ends.append(model(x))
    finally:
        for m, training in modes.items():
            m.training = training
        for h in handles:
            h.remove()
    section_names = list(boundaries) + [OUTPUT]
    for i, end in enumerate(ends):
        earlier = [x] + cuts[:max(i - 1, 0)]
        if i == 0 or not end.requires_grad:
            continue
        grads = torch.autograd.grad(end.sum(), earlier, allow_unused=True, retain_graph=True)
        if any(g is not None for g in grads):
            raise ValueError(f"cannot cut at '{boundaries[i - 1]}': the section ending at '{section_names[i]}' also "
                             f"uses activations from before that cut (a skip or residual connection crosses it); "
                             f"cut at the end of the block instead")


_RECALIBRATING = weakref.WeakSet()  # the models whose statistics recalibrate_batchnorm is re-estimating


def is_recalibrating(model):
    """Whether ``recalibrate_batchnorm`` is running on ``model`` (its forwards are the re-estimation's own)."""
    return model in _RECALIBRATING


def recalibrate_batchnorm(model, batches):
    """Re-estimate the running statistics of every BatchNorm in ``model`` as the average over
    ``batches`` (tuples of forward inputs, moved to the model's device) of what its training-mode
    forward computes, every other module in evaluation mode (Dropout off, activation ranges of
    quantization-aware training kept); no gradients, nothing else changes (modes and momenta are put
    back)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    modes, momenta = {m: m.training for m in model.modules()}, {m: m.momentum for m in norms}
    _RECALIBRATING.add(model)
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        device = next(model.parameters()).device
        with torch.no_grad():
            for inputs in batches:
                model(*(i.to(device) for i in inputs))
    finally:
        _RECALIBRATING.discard(model)
        for m, training in modes.items():
            m.training = training
        for m, momentum in momenta.items():
            m.momentum = momentum


class PendingRecalibration:
    """``recalibrate_batchnorm(model, batches)`` right before ``model``'s next forward pass (a training loop's
    policies have then all finished the current step: the last validation sees the new statistics), or at
    ``run()`` if that comes first; never twice. A forward that is another re-estimation's own waits, so two
    of them do not mix their batches (the one started last wins). ``done(batch_count)`` is called after."""

    def __init__(self, model, batches, done=None):
        self.model, self.batches, self.done = model, batches, done
        self._handle = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module, inputs):
        if not is_recalibrating(self.model):
            self.run()

    def run(self):
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        recalibrate_batchnorm(self.model, self.batches)
        if self.done is not None:
            self.done(len(self.batches))


class SectionWiring:
    """DCQ's sectional training of ``student`` against a frozen ``teacher`` of the same architecture.

    Args:
        student: the network being quantized (trained in place).
        teacher: the full-precision network; frozen and kept in eval mode.
        boundaries: module names whose outputs end sections, in forward order.
        num_sections: instead of ``boundaries``, cut into this many sections, balanced by cost.
        example_input: one batch-shaped tensor, used to check the boundaries (and to cost them).
        loss: a name from ``distiller_dcq.engine.losses.LOSSES``.
        temperature: softens probabilities/distributions in the losses that use them.
        section_inputs: what section i+1 receives: the ``"teacher"``'s activation at boundary i
            (parallel mode, the paper's), the ``"student"``'s own, detached, or ``"mixed"``: each
            element drawn at random from the teacher's (probability ``MIXED_TEACHER_SHARE``) or the
            student's, anew at every forward (QDrop's mix of full-precision and quantized inputs,
            Wei et al., ICLR 2022).
        keep_inputs: keep the last this many training batches (in CPU memory), for
            ``merge(recalibrate=True)``.
        target_clip: clamp the teacher's activation at every boundary (not its output) to
            [0, target_clip], as target and as the next section's input: for students whose
            activations are clipped (DoReFa's quantized ReLU: [0, 1]), so that a section is asked for
            what it can represent. Exact for boundaries after activations and max-poolings.

    Use: ``split()``; then every training forward ``student(x)`` followed by ``section_losses()``
    gives one loss per trained section; ``merge()`` at the end.
    """

    def __init__(self, student, teacher, boundaries=None, *, num_sections=None, example_input,
                 loss="poisson", temperature=1.0, section_inputs="teacher", keep_inputs=0, target_clip=None):
        if boundaries is not None and num_sections is not None:
            raise ValueError("give either boundaries (module names) or num_sections, not both")
        if boundaries is None and num_sections is None:
            raise ValueError("the section list is empty: give boundaries (module names) or num_sections")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if section_inputs not in SECTION_INPUTS:
            raise ValueError(f"unknown section_inputs {section_inputs!r}; choose one of: {', '.join(SECTION_INPUTS)}")
        self.section_inputs = section_inputs
        if target_clip is not None and not target_clip > 0:
            raise ValueError(f"target_clip must be > 0 (the top of the student's activation range), got {target_clip}")
        self.target_clip = target_clip
        self.loss_fn = get_loss(loss)
        self.loss_name, self.temperature = loss, temperature
        if num_sections is not None:
            self.boundaries = balanced_boundaries(student, num_sections, example_input)
        else:
            self.boundaries = validate_boundaries(student, boundaries, example_input)
        teacher_modules = _module_index(teacher)
        missing = [b for b in self.boundaries if b not in teacher_modules]
        if missing:
            raise ValueError(f"the teacher has no module(s) {missing}: teacher and student must share the "
                             f"architecture")
        self.student, self.teacher, self.example_input = student, teacher, example_input
        self.section_names = self.boundaries + [OUTPUT]
        self.trained_sections = list(self.section_names)
        self._handles, self._frozen = [], []  # hook handles: the wiring's, the frozen parameters'
        self._teacher_out, self._student_out = {}, {}  # section end -> activation; student: per replica
        self._wired, self._replicas = False, 1
        self.recent_inputs = deque(maxlen=keep_inputs)  # the last training batches, for recalibrate_batchnorm

    @property
    def is_split(self):
        return bool(self._handles)

    def split(self):
        """Attach the wiring (idempotent). The teacher is frozen, put in eval mode and moved to the
        student's device."""
        if self.is_split:
            return self
        if _SPLIT_STUDENTS.get(self.student) is not None:
            raise RuntimeError("another DCQ section wiring is already split on this model: two DCQ stages cannot "
                               "overlap; give their policies consecutive epoch windows")
        _SPLIT_STUDENTS[self.student] = self
        device = next(self.student.parameters()).device
        self.teacher.to(device).eval().requires_grad_(False)
        student_modules, teacher_modules = _module_index(self.student), _module_index(self.teacher)
        for name in self.boundaries:
            self._handles.append(teacher_modules[name].register_forward_hook(self._keep_teacher(name)))
            self._handles.append(student_modules[name].register_forward_hook(self._end_section(name)))
        self._handles.append(self.student.register_forward_pre_hook(self._run_teacher))
        self._handles.append(self.student.register_forward_hook(self._keep_student_output))
        return self

    def merge(self, recalibrate=False):
        """Remove the wiring and unfreeze: the student is one ordinary network again. With
        ``recalibrate``, re-estimate its BatchNorm statistics on the kept training batches
        (``keep_inputs``): while split, each section's statistics came from its own inputs (the
        teacher's, in parallel mode), not from the stitched network's."""
        for h in self._handles:
            h.remove()
        if _SPLIT_STUDENTS.get(self.student) is self:
            del _SPLIT_STUDENTS[self.student]
        self._handles = []
        self._teacher_out, self._student_out, self._wired = {}, {}, False
        self.train_sections(None)
        if recalibrate and self.recent_inputs:
            recalibrate_batchnorm(self.student, self.recent_inputs)
        self.recent_inputs.clear()
        return self.student

    def _sections_by_owner(self, named_items):
        """Section name -> the items of ``named_items`` (dotted names, as ``named_parameters()`` gives)
        whose owner, the innermost module of the forward pass along their name, lies in that section;
        items of no section (on the model itself, on modules the forward never calls) under ``None``."""
        trace = trace_forward(self.student, self.example_input)
        position = {name: i for i, name in enumerate(trace.order)}
        ends = [position[b] for b in self.boundaries]
        found = OrderedDict((name, []) for name in self.section_names + [None])
        for name, item in named_items:
            parts = name.split(".")
            owner = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in position),
                         None)
            found[None if owner is None else self.section_names[sum(end < position[owner] for end in ends)]].append(
                (name, item))
        return found

    def section_parameters(self):
        """Section name -> the student's parameters in that section, each with the module that owns it:
        a quantizer's FP copy (``conv1.parametrizations.weight.original``, Distiller's
        ``conv1.float_weight``) goes with its layer. Parameters of no section are under ``None``."""
        named = self._sections_by_owner(_without_dataparallel(self.student, self.student.named_parameters()))
        return OrderedDict((section, [p for _, p in items]) for section, items in named.items())

    def train_sections(self, names):
        """Train only the sections named (``None``: all) and freeze the others: any gradient reaching a
        frozen parameter is dropped (``grad`` stays ``None``), so optimizers skip it entirely (no
        momentum, no weight decay), and their BatchNorm running statistics are put back after every
        forward. Parameters of no section are frozen too, with a warning. ``requires_grad`` is left
        alone: weights derived from a frozen parameter (fake-quantized copies) keep their autograd
        graph and learn at once when the section is trained again."""
        names = list(self.section_names) if names is None else list(names)
        unknown = [n for n in names if n not in self.section_names]
        if unknown:
            raise ValueError(f"unknown section(s) {unknown}; the sections are {self.section_names}")
        for handle in self._frozen:
            handle.remove()
        self._frozen = []
        if names != self.section_names:
            if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
                raise NotImplementedError("training some sections only (sequential mode) needs torch >= 2.1")
            params = self._sections_by_owner(_without_dataparallel(self.student, self.student.named_parameters()))
            if params[None]:
                warnings.warn(f"parameters {[n for n, _ in params[None]]} belong to no section (registered on the "
                              f"model itself, or on modules its forward never calls): they stay frozen while only "
                              f"some sections train; register them on the module that uses them", stacklevel=2)
            modules = self._sections_by_owner(_without_dataparallel(self.student, self.student.named_modules()))
            for section in [s for s in self.section_names if s not in names] + [None]:
                for _, param in params[section]:
                    param.grad = None  # a stale gradient (zero_grad(set_to_none=False)) would still move it
                    self._frozen.append(param.register_post_accumulate_grad_hook(_drop_grad))
                for _, module in modules[section]:
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        self._frozen += _keep_running_statistics(module)
        self.trained_sections = names
        return self

    def _run_teacher(self, module, inputs):
        self._wired = module.training
        self._student_out = {}
        if self._wired:
            if self.recent_inputs.maxlen:
                self.recent_inputs.append(tuple(i.detach().cpu() for i in inputs))  # not device memory
            teacher = _unwrap(self.teacher).eval()  # never replicated: its activations are split below
            with torch.no_grad():
                self._teacher_out[OUTPUT] = teacher(*inputs)
            self._replicas = len(inputs[0].chunk(len(self._device_ids))) if self._device_ids else 1

    @property
    def _device_ids(self):
        """DataParallel's devices when it scatters batches over several, else an empty list."""
        ids = self.student.device_ids if isinstance(self.student, nn.DataParallel) else []
        return ids if len(ids) > 1 else []

    def _replica_index(self, tensor):
        return self._device_ids.index(tensor.device.index) if self._device_ids else 0

    def _keep_teacher(self, name):
        def hook(module, inputs, output):
            self._teacher_out[name] = output if self.target_clip is None else output.clamp(0, self.target_clip)
            return output.clone()  # the teacher's next layer may work in place
        return hook

    def _end_section(self, name):
        def hook(module, inputs, output):  # under DataParallel: once per replica, in its own thread
            if not self._wired:
                return None
            replica = self._replica_index(output)
            self._student_out.setdefault(name, {})[replica] = output
            if self.section_inputs == "student":
                handed_on = output.detach()
            else:
                handed_on = self._teacher_out[name]
                if self._device_ids:  # this replica's share of the batch, as DataParallel scattered it
                    handed_on = handed_on.chunk(self._replicas)[replica].to(output.device)
                if self.section_inputs == "mixed":
                    from_teacher = torch.rand_like(output) < MIXED_TEACHER_SHARE
                    handed_on = torch.where(from_teacher, handed_on, output.detach())
            # a copy: the next layer may work in place on its input, which must not alter a loss operand
            return handed_on.clone()
        return hook

    def _keep_student_output(self, module, inputs, output):
        if self._wired:
            self._student_out[OUTPUT] = {0: output}  # the model output, gathered by DataParallel

    def _gathered_student_out(self, name):
        chunks = self._student_out[name]
        if len(chunks) == 1:
            return chunks[0]
        device = self._teacher_out[name].device
        return torch.cat([chunks[i].to(device) for i in range(len(chunks))])

    def section_losses(self):
        """One loss per trained section (``OrderedDict`` section name -> scalar) for the last training forward."""
        if set(self._student_out) != set(self.section_names):
            raise RuntimeError("no wired forward to take section losses from: call split(), put the student in "
                               "training mode and run it on a batch first")
        losses = OrderedDict(
            (name, self.loss_fn(self._gathered_student_out(name), self._teacher_out[name], logits=(name == OUTPUT),
                                temperature=self.temperature))
            for name in self.trained_sections)
        if not bool(torch.isfinite(torch.stack(list(losses.values()))).all()):  # one host sync per step
            name, loss = next((n, v) for n, v in losses.items() if not torch.isfinite(v))
            raise FloatingPointError(f"section '{name}' {self.loss_name} loss is {loss.item()}: check the "
                                     f"learning rate and the inputs for NaN/inf")
        return losses
