"""The synthesis engine (plain PyTorch): images optimized from noise until every BatchNorm layer's batch
statistics match its running statistics."""
import pytest
import torch
import torch.nn as nn

from distiller_dcq.engine.synthesis import (BatchNormStatistics, SynthesisConfig, balanced_classes,
                                            mean_cosine_similarity, predicted_classes, synthesize, synthesize_batch)

SHAPE = (3, 8, 8)
RANGE = (torch.full((3,), -1.0), torch.full((3,), 1.0))
TOLERANCE = 0.1  # what every layer's statistics error reaches on the small run below


def small_network():
    """A conv net with BatchNorm, its running statistics those of structured images (not the noise synthesis
    starts from): smooth colour gradients with an offset per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    ramp = torch.linspace(-0.8, 0.8, 8)
    model.train()
    with torch.no_grad():
        for _ in range(50):
            scale = torch.rand(64, 3, 1, 1)
            images = (scale * ramp.view(1, 1, 1, 8) + 0.2 * torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
                      + 0.05 * torch.randn(64, *SHAPE)).clamp(-1, 1)
            model(images)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def test_the_statistics_error_falls_to_the_tolerance_in_every_layer():
    model = small_network()
    config = SynthesisConfig(iterations=150, batch_size=32, lr=0.1, jitter=0)  # shifts would wrap 8 x 8 images
    seen = []
    images, final = synthesize_batch(model, SHAPE, RANGE, balanced_classes(32, 4), config, seed=0,
                                     on_iteration=lambda i, losses: seen.append(losses["statistics"]))
    assert seen[-1] < seen[0] / 4
    assert set(final) == {"1", "4"}  # the two BatchNorm layers, by name
    assert all(error < TOLERANCE for error in final.values()), final
    assert images.shape == (32, *SHAPE) and images.min() >= -1 and images.max() <= 1


def test_the_network_is_left_as_it_was_its_modes_weights_and_gradients():
    model = small_network()
    for p in model.parameters():
        p.requires_grad_(True)  # a network still being trained elsewhere
    model.train()
    model[1].eval()  # a BatchNorm its owner froze
    weights = [p.detach().clone() for p in model.parameters()]
    statistics = [b.clone() for b in model.buffers()]
    synthesize_batch(model, SHAPE, RANGE, [0] * 8, SynthesisConfig(iterations=3, batch_size=8), seed=0)
    assert [m.training for m in model.modules()] == [True, True, False] + [True] * 7
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(weights + statistics, list(model.parameters()) + list(model.buffers())))


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    model = small_network()
    config = SynthesisConfig(iterations=5, batch_size=16, class_weight=0.1, tv_weight=0.1, l2_weight=0.01,
                             diversity_weight=0.1)
    first, classes, _ = synthesize(model, 32, SHAPE, RANGE, 4, config, seed=3)
    again, _, _ = synthesize(model, 32, SHAPE, RANGE, 4, config, seed=3)
    other, _, _ = synthesize(model, 32, SHAPE, RANGE, 4, config, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first[:16], other[:16])
    assert classes == [i % 4 for i in range(32)]
    fewer, _, _ = synthesize(model, 16, SHAPE, RANGE, 4, config, seed=3)
    assert torch.equal(fewer, first[:16])  # a batch's images do not depend on how many are asked for


def test_the_class_term_makes_the_network_predict_the_class_each_image_aims_at():
    model = small_network()
    config = SynthesisConfig(iterations=60, batch_size=32, class_weight=1.0, jitter=0)
    images, classes, _ = synthesize(model, 32, SHAPE, RANGE, 4, config, seed=0)
    agree = sum(p == c for p, c in zip(predicted_classes(model, images), classes))
    assert agree >= 30, agree


def test_the_diversity_term_pulls_the_features_apart():
    model = small_network()
    features = {}
    model[-1].register_forward_hook(lambda m, i, o: features.__setitem__("x", i[0]))
    similarity = {}
    for weight in (0.0, 1.0):
        images, _, _ = synthesize(model, 32, SHAPE, RANGE, 4, SynthesisConfig(iterations=60, batch_size=32, jitter=0,
                                                                                diversity_weight=weight), seed=0)
        model(images)
        similarity[weight] = mean_cosine_similarity(features["x"]).item()
    assert similarity[1.0] < similarity[0.0] - 0.05, similarity


def test_refusals():
    with pytest.raises(ValueError, match="no BatchNorm"):
        BatchNormStatistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    model = small_network()
    for count in (8, 24):
        with pytest.raises(ValueError, match="multiple of the batch size"):
            synthesize(model, count, SHAPE, RANGE, 4, SynthesisConfig(iterations=1, batch_size=16))
    no_linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # in training mode
    with pytest.raises(ValueError, match="needs a Linear"):
        synthesize_batch(no_linear, SHAPE, RANGE, [0] * 4, SynthesisConfig(iterations=1, batch_size=4,
                                                                           diversity_weight=1.0), seed=0)
    assert all(m.training and not m._forward_hooks for m in no_linear.modules())  # left as it was


def test_keys_are_read_and_checked():
    config = SynthesisConfig.from_settings({"iterations": "50", "lr": "0.2", "flip": "false", "tv_weight": "0.1"})
    assert (config.iterations, config.lr, config.flip, config.tv_weight) == (50, 0.2, False, 0.1)
    assert SynthesisConfig.from_pairs(["lr=0.2", "flip=false"]) == SynthesisConfig(lr=0.2, flip=False)
    with pytest.raises(ValueError, match="'lr': give KEY=VALUE"):
        SynthesisConfig.from_pairs(["lr"])
    for settings, message in (({"iteration": "5"}, "no synthesis key 'iteration'"),
                              ({"iterations": "5.5"}, "iterations is a whole number"),
                              ({"lr": "fast"}, "lr is a number"), ({"flip": "maybe"}, "flip is true or false"),
                              ({"batch_size": "0"}, "batch_size is a whole number >= 1"),
                              ({"tv_weight": "-1"}, "tv_weight is a number >= 0"),
                              ({"lr": "nan"}, "lr is a number >= 0"), ({"jitter": "-1"}, "jitter is a number"),
                              ({"diversity_weight": "0.1", "batch_size": "1"}, "needs batch_size >= 2")):
        with pytest.raises(ValueError, match=message):
            SynthesisConfig.from_settings(settings)
