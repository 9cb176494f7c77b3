"""Images from a network alone: optimized from noise until every BatchNorm layer's batch statistics match
its running statistics (ZeroQ, Cai et al. 2020), with DeepInversion's priors (Yin et al. 2020): total
variation, an l2 penalty, random jitter and flips, and a cross-entropy term toward a chosen class per image;
plus a diversity term (the batch's features kept apart). Plain PyTorch; ``distiller_dcq.synthesize`` is
the command that writes them as a dataset.
"""
import contextlib
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SynthesisConfig:
    """How images are synthesized; each field is a key of ``synthesize``'s ``--set KEY=VALUE``. The weighted
    priors are off by default (none beat the statistics term alone: benchmarks/results/synthesis_priors);
    jitter and flips, DeepInversion's, are on."""
    iterations: int = 200  # Adam steps per batch
    lr: float = 0.1  # Adam's rate, on pixels in the network's (normalized) input space
    batch_size: int = 256  # images optimized together: their batch statistics are matched
    statistics_weight: float = 1.0  # the BatchNorm statistics term (ZeroQ)
    class_weight: float = 0.0  # cross-entropy toward each image's class (DeepInversion); classes balanced
    tv_weight: float = 0.0  # total variation: mean squared difference of neighbouring pixels
    l2_weight: float = 0.0  # mean squared pixel
    diversity_weight: float = 0.0  # mean cosine similarity of the images' features at the last Linear's input
    jitter: int = 2  # random shift of up to this many pixels each step (0: none)
    flip: bool = True  # random horizontal flip each step

    def __post_init__(self):
        for name in ("iterations", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} is a whole number >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "statistics_weight", "class_weight", "tv_weight", "l2_weight", "diversity_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} is a number >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.jitter, int) or self.jitter < 0:
            raise ValueError(f"jitter is a number of pixels >= 0, got {self.jitter!r}")
        if self.diversity_weight and self.batch_size < 2:
            raise ValueError("diversity_weight keeps a batch's images apart: it needs batch_size >= 2")

    @classmethod
    def from_settings(cls, settings):
        """A config from ``{key: text}`` (``--set`` pairs), each text read as its field's type."""
        types = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(settings) - set(types))
        if unknown:
            raise ValueError(f"no synthesis key {unknown[0]!r}; the keys are {', '.join(types)}")
        values = {}
        for key, text in settings.items():
            kind = types[key]
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{key} is true or false, got {text!r}")
                values[key] = text.lower() in ("true", "1")
            else:
                try:
                    values[key] = kind(text)
                except ValueError:
                    raise ValueError(f"{key} is {'a whole number' if kind is int else 'a number'}, got {text!r}") \
                        from None
        return cls(**values)

    @classmethod
    def from_pairs(cls, pairs):
        """A config from ``["KEY=VALUE", ...]`` (command-line pairs)."""
        malformed = [pair for pair in pairs if "=" not in pair]
        if malformed:
            raise ValueError(f"{malformed[0]!r}: give KEY=VALUE")
        return cls.from_settings(dict(pair.split("=", 1) for pair in pairs))

    def as_dict(self):
        return asdict(self)


class BatchNormStatistics:
    """Forward hooks on every BatchNorm of a network in evaluation mode: after a forward, ``errors()`` holds
    one number per layer, how far the batch's per-channel mean and standard deviation of the layer's input are
    from its running ones: (||mean - running mean|| + ||std - running std||) / ||running std||."""

    def __init__(self, model):
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.track_running_stats and m.running_mean is not None]
        if not self.layers:
            raise ValueError("the network has no BatchNorm layer with running statistics: there are no statistics "
                             "to match")
        self._errors = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers]

    def _hook(self, name):
        def record(module, inputs, output):
            x = inputs[0].transpose(0, 1).flatten(1)  # channels x (batch, positions)
            mean, std = x.mean(1), (x.var(1, unbiased=False) + module.eps).sqrt()
            running_std = (module.running_var + module.eps).sqrt()
            self._errors[name] = ((mean - module.running_mean).norm() + (std - running_std).norm()) / running_std.norm()
        return record

    def errors(self):
        """{layer name: error tensor} of the last forward."""
        return dict(self._errors)

    def remove(self):
        for handle in self._handles:
            handle.remove()


class _LastLinearInput:
    """The input of a network's last Linear layer at each forward (its features), for the diversity term."""

    def __init__(self, model):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the diversity term needs a Linear layer (its input is the features kept apart); "
                             "this network has none: set diversity_weight=0")
        self.features = None
        self._handle = linears[-1].register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.features = inputs[0].flatten(1)

    def remove(self):
        self._handle.remove()


def total_variation(images):
    """Mean squared difference between horizontally and vertically neighbouring pixels."""
    return ((images[..., 1:, :] - images[..., :-1, :]).pow(2).mean()
            + (images[..., :, 1:] - images[..., :, :-1]).pow(2).mean())


def mean_cosine_similarity(features):
    """Mean cosine similarity over the distinct pairs of a batch's feature vectors."""
    unit = F.normalize(features, dim=1)
    similarity = unit @ unit.t()
    n = len(features)
    return (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))


def _jitter_and_flip(images, config, generator):
    if config.jitter:
        dx, dy = (int(torch.randint(-config.jitter, config.jitter + 1, (1,), generator=generator)) for _ in range(2))
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if config.flip and torch.rand(1, generator=generator).item() < 0.5:
        images = images.flip(3)
    return images


@contextlib.contextmanager
def _evaluation_mode(model):
    """``model`` in evaluation mode inside, every module's own mode back after (a BatchNorm its owner froze stays
    frozen)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def synthesize_batch(model, input_shape, pixel_range, classes, config, seed, on_iteration=None):
    """A batch of ``config.batch_size`` images for ``model`` (in evaluation mode, its weights unchanged),
    optimized from noise; image i aims at class ``classes[i]`` when ``config.class_weight`` > 0.

    ``input_shape``: (channels, height, width); ``pixel_range``: (low, high) tensors of one value per channel,
    the network's inputs for pixels 0 and 1, which the images are kept within. ``seed`` alone decides the
    noise, the jitter and the flips. ``on_iteration(i, losses)`` is called after each step.
    Returns (images on the CPU, the final {layer: statistics error} of the un-jittered batch); the model's
    modes, hooks and gradients are left as they were, whatever happens."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    low, high = (bound.view(1, -1, 1, 1).to(device) for bound in pixel_range)
    noise = torch.rand((config.batch_size, *input_shape), generator=generator)
    images = (low + (high - low) * noise.to(device)).requires_grad_(True)
    targets = torch.as_tensor(classes, device=device)
    optimizer = torch.optim.Adam([images], lr=config.lr)
    weights = {"statistics": config.statistics_weight, "class": config.class_weight, "tv": config.tv_weight,
               "l2": config.l2_weight, "diversity": config.diversity_weight}
    statistics = features = None
    with _evaluation_mode(model):
        try:
            statistics = BatchNormStatistics(model)
            features = _LastLinearInput(model) if config.diversity_weight else None
            for iteration in range(config.iterations):
                logits = model(_jitter_and_flip(images, config, generator))
                layer_errors = statistics.errors()
                losses = {"statistics": sum(layer_errors.values()) / len(layer_errors)}
                if config.class_weight:
                    losses["class"] = F.cross_entropy(logits, targets)
                if config.tv_weight:
                    losses["tv"] = total_variation(images)
                if config.l2_weight:
                    losses["l2"] = images.pow(2).mean()
                if config.diversity_weight:
                    losses["diversity"] = mean_cosine_similarity(features.features)
                total = sum(weights[name] * value for name, value in losses.items())
                images.grad, = torch.autograd.grad(total, [images])  # the pixels' only: the weights' stay untouched
                optimizer.step()
                with torch.no_grad():
                    images.copy_(torch.max(torch.min(images, high), low))
                if on_iteration:
                    on_iteration(iteration, {name: value.item() for name, value in losses.items()})
            with torch.no_grad():
                model(images)
                final = {name: error.item() for name, error in statistics.errors().items()}
        finally:
            for hooks in (statistics, features):
                if hooks:
                    hooks.remove()
    return images.detach().cpu(), final


def balanced_classes(count, num_classes, start=0):
    """The classes images ``start`` .. ``start + count - 1`` aim at: 0, 1, ..., num_classes - 1, 0, 1, ..."""
    return [(start + i) % num_classes for i in range(count)]


def synthesize(model, count, input_shape, pixel_range, num_classes, config, seed=0, log=None):
    """``count`` images, in batches of ``config.batch_size`` (``count`` a multiple of it). Batch b is made with
    seed ``seed`` x 100003 + b, so the first batches are the same whatever ``count`` is. ``log(message)``
    hears progress and time left about every 10 s. Returns (images, classes aimed at, [per batch
    {layer: statistics error}])."""
    if count < config.batch_size or count % config.batch_size:
        raise ValueError(f"{count} images cannot be made in batches of {config.batch_size}: ask for a multiple of "
                         f"the batch size (batch_size, whose images' statistics are matched together)")
    batches, started, said = count // config.batch_size, time.time(), [time.time()]
    images, errors = [], []
    for b in range(batches):
        def progress(iteration, losses, b=b):
            if log and (time.time() - said[0] >= 10 or (b, iteration) == (batches - 1, config.iterations - 1)):
                said[0] = time.time()
                done = b * config.iterations + iteration + 1
                left = (time.time() - started) / done * (batches * config.iterations - done)
                log(f"batch {b + 1}/{batches}, step {iteration + 1}/{config.iterations}: "
                    + ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
                    + f"; {_duration(left)} left")
        classes = balanced_classes(config.batch_size, num_classes, b * config.batch_size)
        batch, final = synthesize_batch(model, input_shape, pixel_range, classes, config, seed * 100003 + b, progress)
        images.append(batch)
        errors.append(final)
    return torch.cat(images), balanced_classes(count, num_classes), errors


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def predicted_classes(model, images, batch_size=256):
    """The class ``model`` (evaluation mode) predicts for each image."""
    device = next(model.parameters()).device
    with _evaluation_mode(model), torch.no_grad():
        return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(images), batch_size)]).tolist()


__all__ = ["SynthesisConfig", "BatchNormStatistics", "synthesize", "synthesize_batch", "balanced_classes",
           "predicted_classes", "total_variation", "mean_cosine_similarity"]
