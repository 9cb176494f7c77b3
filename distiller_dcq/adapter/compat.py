"""Run-time patches that let Distiller 0.4 run (and resume) on Python 3.11 / PyTorch 2.x / pandas 3.

Each patch is idempotent, does nothing on a stack that does not need it, and touches only the
Distiller objects it fixes (Distiller's files are never edited). Numbers refer to
``distiller-on-modern-stack.md``.
"""
import copy
import difflib
import functools
import inspect
import logging
import random

import numpy as np
import torch

from .checkpoints import fit_dataparallel_names, optimizer_with_checked_state, torch_load_distiller_checkpoint

PATCHED = "patched_by_distiller_dcq"
ROUTES = "distiller_dcq_routes"  # what route() installed on a function: the code of each route
RESTORED_QUANTIZER = "distiller_dcq_restored_quantizer"  # model attribute: the quantizer rebuilt from a checkpoint
RESUMED_POLICY_STATES = "distiller_dcq_resumed_policies"  # model attribute: our policies' states from a checkpoint
POLICY_STATES_KEY = "distiller_dcq_policies"  # key of those states in Distiller's 'compression_sched' state


def _mark(fn):  # every patch marks what it installs, so that applying it twice is a no-op
    setattr(fn, PATCHED, True)
    return fn


def _is_patched(fn):
    return getattr(fn, PATCHED, False)


def route(namespaces, name, handles, ours):
    """Replace function ``name`` in every namespace that holds the same object (where it is defined
    and where it is re-exported) by one that calls ``ours`` when ``handles(*args)`` and the
    original otherwise. Idempotent; several routes of one function stack (the last checked first)."""
    original = getattr(namespaces[0], name)
    key = getattr(ours, "__code__", ours)  # the same route made again (another register call) has the same code
    if key in getattr(original, ROUTES, ()):
        return
    routed = _mark(functools.wraps(original)(
        lambda *args, **kwargs: ours(*args, **kwargs) if handles(*args, **kwargs) else original(*args, **kwargs)))
    setattr(routed, ROUTES, getattr(original, ROUTES, ()) + (key,))
    for namespace in namespaces:
        if getattr(namespace, name, None) is original:
            setattr(namespace, name, routed)


# --- 1. pandas >= 1.3 -------------------------------------------------------------------------------

def _pandas_needs_precision_alias(pd):
    try:
        pd.get_option("precision")
        return False
    except Exception:  # pandas >= 1.3: "Pattern matched multiple keys"
        return True


class _PandasWithPrecisionAlias:
    """pandas, except that ``set_option('precision', n)`` means ``display.precision``."""

    def __init__(self, pandas):
        self._pandas = pandas

    def set_option(self, *args, **kwargs):
        args = tuple("display.precision" if i % 2 == 0 and a == "precision" else a for i, a in enumerate(args))
        return self._pandas.set_option(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pandas, name)


def patch_imagenet_resnets(resnet_module):
    """Distiller's ImageNet ResNets (``distiller.models.imagenet.resnet``) call torchvision's private
    ``_resnet(arch, block, layers, pretrained, progress)``, whose signature torchvision 0.13 changed to
    ``_resnet(block, layers, weights, progress)``; give that module one that translates
    (``pretrained`` -> the ImageNet-1k V1 weights that ``pretrained=True`` always meant)."""
    from torchvision.models import get_model_weights, resnet as torchvision_resnet
    if "weights" not in inspect.signature(torchvision_resnet._resnet).parameters:
        return

    def _resnet(arch, block, layers, pretrained, progress, **kwargs):
        weights = get_model_weights(arch).IMAGENET1K_V1 if pretrained else None
        return torchvision_resnet._resnet(block, layers, weights, progress, **kwargs)
    resnet_module._resnet = _resnet


def patch_pandas_precision(model_summaries):
    """``distiller.model_summaries`` calls ``pd.set_option('precision', n)`` after every epoch,
    which pandas >= 1.3 rejects; give that module a pandas that accepts it."""
    pd = model_summaries.pd
    if isinstance(pd, _PandasWithPrecisionAlias) or not _pandas_needs_precision_alias(pd):
        return
    model_summaries.pd = _PandasWithPrecisionAlias(pd)


# --- 2. weights-only checkpoint loading, and 3. restoring quantized checkpoints ----------------------------

class _TorchForDistillerCheckpoints:
    """``torch`` as ``distiller.apputils.checkpoint`` sees it. Its ``load``:

    - always loads with ``weights_only=True`` and exactly the allow-list of ``checkpoints.py``
      (older torch would unpickle anything): a checkpoint can never run code when loaded;
    - makes ``quantizer_metadata['type']`` rebuildable: Distiller calls it without the ``optimizer``
      its QAT quantizers require (Distiller issues #367, #536), so it gets a placeholder one
      (training builds its own), and the rebuilt quantizer is remembered on the model;
    - makes ``optimizer_type`` build an optimizer that the checkpoint's optimizer state is checked
      against before Distiller loads it (``checkpoints.load_optimizer_state``).
    """

    def __init__(self, torch_module):
        self._torch = torch_module

    def load(self, *args, **kwargs):
        checkpoint = torch_load_distiller_checkpoint(self._torch.load, *args, **kwargs)
        if _loading_into and _loading_into[-1] is not None and isinstance(checkpoint, dict):
            fit_dataparallel_names(checkpoint, _loading_into[-1])
        if not isinstance(checkpoint, dict):
            return checkpoint
        if checkpoint.get("optimizer_type") is not None:
            checkpoint["optimizer_type"] = optimizer_with_checked_state(
                checkpoint["optimizer_type"], checkpoint.get("optimizer_state_dict"), f"checkpoint {args[0]!r}")
        metadata = checkpoint.get("quantizer_metadata")
        if metadata:
            metadata["type"] = _rebuild_quantizer(metadata["type"])
        return checkpoint

    def __getattr__(self, name):
        return getattr(self._torch, name)


def _rebuild_quantizer(quantizer_cls):
    def build(model, **params):
        if "optimizer" in inspect.signature(quantizer_cls).parameters and "optimizer" not in params:
            params["optimizer"] = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        quantizer = quantizer_cls(model, **params)
        quantizer.checkpoint_params = copy.deepcopy(model.quantizer_metadata["params"])
        setattr(model, RESTORED_QUANTIZER, quantizer)
        return quantizer
    return build


_loading_into = []  # the model of each Distiller load_checkpoint in progress


def patch_checkpoint_loading(checkpoint_module, apputils):
    """Give ``distiller.apputils.checkpoint`` the ``torch`` above, and let it know the model each
    ``load_checkpoint`` loads into (to fit DataParallel's ``module.`` prefix)."""
    if not isinstance(checkpoint_module.torch, _TorchForDistillerCheckpoints):
        checkpoint_module.torch = _TorchForDistillerCheckpoints(checkpoint_module.torch)
    original = checkpoint_module.load_checkpoint
    if _is_patched(original):
        return

    @functools.wraps(original)
    def load_checkpoint(model, chkpt_file, *args, **kwargs):
        _loading_into.append(model)
        try:
            return original(model, chkpt_file, *args, **kwargs)
        finally:
            _loading_into.pop()

    for namespace in (checkpoint_module, apputils):
        if getattr(namespace, "load_checkpoint", None) is original:
            namespace.load_checkpoint = _mark(load_checkpoint)


def patch_quantizer_prepare(quantizer_module):
    """Wrap ``Quantizer.prepare_model`` so that

    - each module keeps its parameter order (``float_weight`` takes ``weight``'s place): an optimizer
      rebuilt from ``model.parameters()`` on resume then gets its saved state on the right tensors;
    - a schedule's quantizer applied to a model already prepared from a checkpoint adopts that
      preparation instead of quantizing twice (``KeyError: 'conv2.float_float_weight'``).
    """
    cls = quantizer_module.Quantizer
    if _is_patched(cls.prepare_model):
        return
    original = cls.prepare_model

    @functools.wraps(original)
    def prepare_model(self, dummy_input=None):
        restored = getattr(self.model, RESTORED_QUANTIZER, None)
        if restored is not None and restored is not self:
            return _adopt(self, restored, dummy_input)
        order = {module: list(module._parameters) for module in self.model.modules()}
        original(self, dummy_input)
        for module, names in order.items():
            _keep_parameter_order(module, names, quantizer_module.FP_BKP_PREFIX)

    cls.prepare_model = _mark(prepare_model)


def _keep_parameter_order(module, names, prefix):
    params = module._parameters
    ordered = [n if n in params else prefix + n for n in names if n in params or prefix + n in params]
    ordered += [n for n in params if n not in set(ordered)]  # parameters the quantizer added
    ordered = [(n, params[n]) for n in ordered]
    params.clear()
    params.update(ordered)


def _adopt(quantizer, restored, dummy_input):
    ours, theirs = quantizer.model.quantizer_metadata["params"], restored.checkpoint_params
    if type(quantizer) is not type(restored) or ours != theirs:
        raise ValueError(f"the schedule's quantizer ({type(quantizer).__name__} {dict(ours)}) differs from the one "
                         f"that quantized the resumed checkpoint ({type(restored).__name__} {dict(theirs)}): resume "
                         f"with the schedule that made the checkpoint")
    quantizer.params_to_quantize = restored.params_to_quantize
    quantizer.modules_processed = restored.modules_processed
    quantizer.modules_processed_args = restored.modules_processed_args
    quantizer.prepared = True
    quantizer.model.quantizer_metadata["dummy_input"] = dummy_input  # as prepare_model records it: a resumed run's
    delattr(quantizer.model, RESTORED_QUANTIZER)                     # checkpoint must load like the first one


# --- 4. LR schedulers on resume -----------------------------------------------------------------------

def patch_resumed_lr(config_module, lr_policy_cls):
    """torch >= 1.4 schedulers built with ``last_epoch = start_epoch - 1`` decay the restored LR once
    more; after ``dict_config`` on a resumed run, put back the LRs the checkpoint's optimizer had."""
    if _is_patched(config_module.dict_config):
        return
    original = config_module.dict_config

    @functools.wraps(original)
    def dict_config(model, optimizer, sched_dict, scheduler=None, resumed_epoch=None):
        saved = [g["lr"] for g in optimizer.param_groups] if resumed_epoch is not None and optimizer else None
        scheduler = original(model, optimizer, sched_dict, scheduler, resumed_epoch)
        if saved is not None:
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr
            for policy in scheduler.sched_metadata:
                if isinstance(policy, lr_policy_cls):
                    policy.lr_scheduler._last_lr = list(saved)
        return scheduler

    config_module.dict_config = _mark(dict_config)


# --- 5. resuming exactly: RNG states and our policies' state in Distiller checkpoints -----------------

RNG_KEY = "distiller_dcq_rng"  # key of the RNG states in Distiller's 'compression_sched' state


def patch_scheduler_state(scheduler_cls):
    """``CompressionScheduler.state_dict`` (saved in every checkpoint) also holds the RNG states and
    the state of our policies (``checkpoint_state()``). ``load_state_dict`` leaves the policies'
    states on the model for them to find, and the first ``on_epoch_begin`` after it restores the RNG
    states, so that a resumed run draws the same data order (and everything else random) as an
    uninterrupted one, with or without our policies."""
    if _is_patched(scheduler_cls.state_dict):
        return
    original_save, original_load, original_epoch_begin = (scheduler_cls.state_dict, scheduler_cls.load_state_dict,
                                                          scheduler_cls.on_epoch_begin)

    @functools.wraps(original_save)
    def state_dict(self):
        state = original_save(self)
        state[RNG_KEY] = rng_state()
        ours = {p.name: p.checkpoint_state() for p in self.sched_metadata if hasattr(p, "checkpoint_state")}
        if ours:
            state[POLICY_STATES_KEY] = ours
        return state

    @functools.wraps(original_load)
    def load_state_dict(self, state, normalize_dataparallel_keys=False):
        original_load(self, state, normalize_dataparallel_keys)
        self.distiller_dcq_rng_to_restore = state.get(RNG_KEY)
        if POLICY_STATES_KEY in state:
            setattr(self.model, RESUMED_POLICY_STATES, state[POLICY_STATES_KEY])

    @functools.wraps(original_epoch_begin)
    def on_epoch_begin(self, *args, **kwargs):
        if getattr(self, "distiller_dcq_rng_to_restore", None) is not None:
            set_rng_state(self.distiller_dcq_rng_to_restore)
            self.distiller_dcq_rng_to_restore = None
        return original_epoch_begin(self, *args, **kwargs)

    scheduler_cls.state_dict = _mark(state_dict)
    scheduler_cls.load_state_dict = _mark(load_state_dict)
    scheduler_cls.on_epoch_begin = _mark(on_epoch_begin)


_criterion_losses = []  # the loss handed to each CompressionScheduler.before_backward_pass in progress


def patch_criterion_loss(scheduler_cls):
    """Distiller hands each policy's ``before_backward_pass`` the loss built by the policies before
    it; keep the training criterion's own loss (cross-entropy) visible to ours (``criterion_loss``)."""
    if _is_patched(scheduler_cls.before_backward_pass):
        return
    original = scheduler_cls.before_backward_pass

    @functools.wraps(original)
    def before_backward_pass(self, epoch, minibatch_id, minibatches_per_epoch, loss, *args, **kwargs):
        _criterion_losses.append(loss)
        try:
            return original(self, epoch, minibatch_id, minibatches_per_epoch, loss, *args, **kwargs)
        finally:
            _criterion_losses.pop()

    scheduler_cls.before_backward_pass = _mark(before_backward_pass)


def criterion_loss():
    """The training criterion's loss of the minibatch whose ``before_backward_pass`` is running, or None."""
    return _criterion_losses[-1] if _criterion_losses else None


def reweighted_criterion(loss, criterion_weight, extra):
    """A policy's overall loss: ``extra``, plus what policies before it added to the criterion's loss
    (``loss`` minus the criterion's), plus ``criterion_weight`` x the criterion's loss."""
    criterion = criterion_loss()
    if criterion is None:  # called outside CompressionScheduler.before_backward_pass: loss is the criterion's
        criterion = loss
    overall = extra
    if loss is not criterion:
        overall = overall + (loss - criterion)
    if criterion_weight:
        overall = overall + criterion_weight * criterion
    return overall


_criterion_inputs = {}  # what the training loop last handed its criterion: "output", "target"


def patch_criterion_inputs(image_classifier):
    """Record what compress_classifier's training loop (``image_classifier.train``) hands its criterion,
    the model's output and the labels, for the policies that need them (``criterion_inputs``)."""
    if _is_patched(image_classifier.train):
        return
    original = image_classifier.train

    def record(criterion, inputs, loss):
        _criterion_inputs.update(output=inputs[0], target=inputs[1])

    @functools.wraps(original)
    def train(train_loader, model, criterion, *args, **kwargs):
        handle = criterion.register_forward_hook(record) if isinstance(criterion, torch.nn.Module) else None
        try:
            return original(train_loader, model, criterion, *args, **kwargs)
        finally:
            _criterion_inputs.clear()
            if handle is not None:
                handle.remove()

    image_classifier.train = _mark(train)


def criterion_inputs(policy_name):
    """(model output, labels) of the training minibatch in progress; an error naming ``policy_name``
    outside compress_classifier's training loop."""
    if not _criterion_inputs:
        raise RuntimeError(f"{policy_name} reads the labels and the model's output where compress_classifier's "
                           f"training loop (distiller.apputils.image_classifier.train) hands them to its criterion, "
                           f"a torch.nn.Module; train with that loop")
    return _criterion_inputs["output"], _criterion_inputs["target"]


def rng_state():
    """Python, NumPy, torch (and CUDA's, where initialised) RNG states, as tensors and ints
    (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


# --- 6. clearer errors for YAML class names ---------------------------------------------------------

def patch_class_name_errors(config_module):
    """Distiller says only "Class named 'X' does not exist" for a YAML ``class:`` typo; also name the
    closest classes it knows."""
    if _is_patched(config_module.build_component):
        return
    original = config_module.build_component

    @functools.wraps(original)
    def build_component(model, name, user_args, **extra_args):
        class_name = user_args.get("class")
        known = [k for k, v in vars(config_module).items() if isinstance(v, type)]
        if class_name is not None and class_name not in known:
            close = difflib.get_close_matches(str(class_name), known, n=3, cutoff=0.6)
            raise ValueError(f"YAML component {name!r}: no class named {class_name!r}"
                             + (f"; did you mean {' or '.join(close)}?" if close else "")
                             + " (DCQ's classes are DCQQuantizer and SectionalKDPolicy)")
        return original(model, name, user_args, **extra_args)

    config_module.build_component = _mark(build_component)


# --- 7. policy windows that training never reaches ----------------------------------------------------

def patch_policy_windows(image_classifier, policy_cls):
    """After compress_classifier builds its scheduler, refuse a DCQ policy whose epoch window starts
    after the last training epoch (it would silently never run); one that ends after it is allowed
    (the run stops mid-stage, to be resumed) and logged. A policy marked ``must_finish_window``
    (progressive quantization, AdaRound) must end within the run."""
    if _is_patched(image_classifier._init_learner):
        return
    original = image_classifier._init_learner

    @functools.wraps(original)
    def _init_learner(args):
        model, scheduler, optimizer, start_epoch, ending_epoch = original(args)
        for policy, meta in (scheduler.sched_metadata.items() if scheduler else []):
            window = f"epochs {meta['starting_epoch']}-{meta['ending_epoch'] - 1}"
            if getattr(policy, "must_finish_window", False) and meta["ending_epoch"] > ending_epoch:
                raise ValueError(f"policy {policy.name!r} runs over {window}, but training stops after epoch "
                                 f"{ending_epoch - 1} (--epochs {ending_epoch}): the network would be tested before "
                                 f"its window ends; train for {meta['ending_epoch']} epochs, or shorten the window")
            if not isinstance(policy, policy_cls):
                continue
            if meta["starting_epoch"] >= ending_epoch:
                raise ValueError(f"DCQ policy {policy.name!r} is scheduled for {window}, but training stops after "
                                 f"epoch {ending_epoch - 1} (--epochs {ending_epoch}): it would never run; start its "
                                 f"window earlier, or train for more epochs")
            if meta["ending_epoch"] > ending_epoch:
                logging.getLogger().info("DCQ %s: its stage (%s) continues after this run's last epoch %d; resume "
                                         "with --resume-from to finish it", policy.name, window, ending_epoch - 1)
        return model, scheduler, optimizer, start_epoch, ending_epoch

    image_classifier._init_learner = _mark(_init_learner)
