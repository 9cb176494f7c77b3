"""``BatchNormRecalibrationPolicy``: re-estimating BatchNorm statistics as a schedule's last step."""
import collections
import logging

from distiller.policy import ScheduledTrainingPolicy

from ..engine.sections import PendingRecalibration

msglogger = logging.getLogger()


class BatchNormRecalibrationPolicy(ScheduledTrainingPolicy):
    """At the end of its window, re-estimate every BatchNorm layer's running statistics on the window's
    last training batches with the final weights (their images only: no labels, no gradients; every
    other module in evaluation mode), what ``python -m distiller_dcq.recalibrate`` does after a run.

    A quantized network's running statistics are moving averages taken while its weights still moved
    (binary weights flip) or, in DCQ's section stage, partly from the teacher's activations. It
    happens right before the next forward pass after the window's last step (the last validation),
    when every policy has finished that step, so validation, test and the saved checkpoint all see
    the new statistics. One contiguous window (``frequency: 1``) that ends within the run.

    Args (YAML keys):
        batches: re-estimate on the window's last this many training batches (default 0: all of its
            last epoch's, one epoch's worth of images, as the few-shot study's re-estimation).
    """

    must_finish_window = True  # a window ending after the run would never re-estimate

    def __init__(self, model, name="recalibrate_bn", batches=0):
        super().__init__()
        if not isinstance(batches, int) or batches < 0:
            raise ValueError(f"BatchNorm recalibration policy {name!r}: batches is a number of training batches "
                             f"(0: the window's whole last epoch), got {batches!r}")
        self.name, self.batches = name, batches
        self._kept, self._keeping, self._pending = None, None, None

    def on_epoch_begin(self, model, zeros_mask_dict, meta, **kwargs):
        if meta.get("frequency") != 1:
            raise ValueError(f"BatchNorm recalibration policy {self.name!r} needs one contiguous window: schedule it "
                             f"with starting_epoch, ending_epoch and frequency: 1")
        if meta["current_epoch"] != meta["ending_epoch"] - 1 or self._keeping is not None or self._pending is not None:
            return
        self._kept = collections.deque(maxlen=self.batches or None)
        self._keeping = model.register_forward_pre_hook(self._keep)

    def _keep(self, model, inputs):
        if model.training:
            self._kept.append(tuple(i.detach().to("cpu", copy=True) for i in inputs))

    def on_minibatch_end(self, model, epoch, minibatch_id, minibatches_per_epoch, zeros_mask_dict, optimizer):
        if self._keeping is None or minibatch_id != minibatches_per_epoch - 1:
            return
        self._keeping.remove()
        self._keeping = None
        batches, self._kept = list(self._kept), None
        self._pending = PendingRecalibration(model, batches, lambda count: msglogger.info(
            "%s: re-estimated the BatchNorm statistics on the last %d training batches", self.name, count))

    def on_epoch_end(self, model, zeros_mask_dict, meta, **kwargs):
        if self._pending is not None:  # when no validation ran since the last step (--vs 0): before the checkpoint
            self._pending.run()
