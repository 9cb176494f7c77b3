"""num_sections: N cuts at any depth, on every network we name (real Distiller models)."""
import logging
import textwrap

import pytest
import torch
import torchvision

from distiller_env import compress_classifier_script, import_distiller

distiller = import_distiller()
from distiller.models import create_model  # noqa: E402

from distiller_dcq.engine.sections import _fewest_max_then_squares, section_cuts, validate_boundaries  # noqa: E402

NETWORKS = [("simplenet_mnist", "mnist"), ("resnet20_cifar", "cifar10"), ("vgg11_bn_cifar", "cifar10"),
            ("svhn_dorefa", "svhn"), ("alexnet", "imagenet"), ("mobilenet", "imagenet")]


def distiller_model(arch, dataset):
    torch.manual_seed(0)
    return create_model(False, dataset, arch, parallel=False, device_ids=-1)


def torchvision_resnet18():
    """Distiller's resnet18 does not build on torchvision >= 0.13; the architecture is torchvision's."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.input_shape = (1, 3, 64, 64)  # adaptive pooling: a small input has the same cuts
    return model


@pytest.mark.parametrize("build", [lambda: distiller_model(*n) for n in NETWORKS] + [torchvision_resnet18],
                         ids=[n for n, _ in NETWORKS] + ["resnet18"])
def test_every_number_of_sections_up_to_the_valid_cuts_plus_one(build):
    model = build()
    x = torch.zeros(model.input_shape)
    cuts, total = section_cuts(model, x)
    assert len(cuts) >= 3 and list(cuts.values()) == sorted(cuts.values()) and 0 < max(cuts.values()) < total
    names = list(cuts)
    for n in range(2, len(cuts) + 2):  # cuts valid one by one are valid together: checked for a few N
        chosen = _fewest_max_then_squares(list(cuts.values()), total, n - 1)
        assert len(chosen) == n - 1 and chosen == sorted(set(chosen))
        if n in (2, 4, len(cuts) + 1):
            assert validate_boundaries(model, [names[i] for i in chosen], x) == [names[i] for i in chosen]
    assert _fewest_max_then_squares(list(cuts.values()), total, len(cuts) + 1) is None  # the error: test_sections


def test_cuts_fall_inside_containers_after_activations_and_poolings():
    model = distiller_model("vgg11_bn_cifar", "cifar10")  # every conv in one container, `features`
    cuts, _ = section_cuts(model, torch.zeros(model.input_shape))
    layers = [type(model.features[int(name.split(".")[1])]).__name__ for name in cuts if name != "features"]
    assert set(layers) <= {"ReLU", "MaxPool2d"} and len(layers) == 7 and "features" in cuts  # 'features': before the classifier
    resnet = distiller_model("resnet20_cifar", "cifar10")
    cuts, _ = section_cuts(resnet, torch.zeros(resnet.input_shape))
    assert "layer1" in cuts and "layer1.2" not in cuts  # a block's end is named by the outermost module ending there
    assert not any(".conv" in name or ".bn" in name or "relu1" in name for name in cuts)  # never inside a block


def test_the_cost_balance_is_optimal_among_all_choices():
    import itertools
    prefix, total = [3, 4, 10, 12, 19, 20], 25
    for k in range(1, 7):
        def key(cuts):
            parts = [b - a for a, b in zip([0] + [prefix[i] for i in cuts], [prefix[i] for i in cuts] + [total])]
            return max(parts), sum(p * p for p in parts)
        best = min(itertools.combinations(range(6), k), key=key)
        assert key(_fewest_max_then_squares(prefix, total, k)) == key(best)
    assert _fewest_max_then_squares(prefix, total, 7) is None


@pytest.mark.parametrize("arch, dataset", [("vgg11_bn_cifar", "cifar10"), ("alexnet", "imagenet"),
                                           ("mobilenet", "imagenet")])
def test_num_sections_4_trains_in_distillers_loop_and_logs_its_boundaries(arch, dataset, tmp_path, monkeypatch,
                                                                          caplog):
    monkeypatch.syspath_prepend(str(compress_classifier_script().parent))  # image_classifier imports its parser.py
    import distiller.apputils.image_classifier as classifier
    from distiller.data_loggers import NullLogger
    schedule = tmp_path / "four.yaml"
    schedule.write_text(textwrap.dedent("""
        quantizers:
          q: {class: DCQQuantizer, weight_mode: binary}
        extensions:
          dcq: {class: SectionalKDPolicy, num_sections: 4, loss: mse}
        policies:
          - quantizer: {instance_name: q}
            starting_epoch: 0
            ending_epoch: 2
            frequency: 1
          - extension: {instance_name: dcq}
            starting_epoch: 0
            ending_epoch: 1
            frequency: 1
    """))
    model = distiller_model(arch, dataset)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.INFO):
        scheduler = distiller.file_config(model, optimizer, str(schedule))
    policy = next(p for p in scheduler.sched_metadata if type(p).__name__ == "SectionalKDPolicy")
    assert len(policy.wiring.section_names) == 4
    assert f"4 sections ending at {', '.join(policy.wiring.section_names)}" in caplog.text
    args = classifier.ClassifierCompressor.mock_args()
    args.arch, args.device, args.dataset = arch, "cpu", dataset
    classes = 1000 if dataset == "imagenet" else 10
    data = torch.utils.data.TensorDataset(torch.randn(4, *model.input_shape[1:]), torch.randint(0, classes, (4,)))
    scheduler.on_epoch_begin(0)
    _, _, loss = classifier.train(torch.utils.data.DataLoader(data, batch_size=2), model, torch.nn.CrossEntropyLoss(),
                                  optimizer, 0, scheduler, [NullLogger()], args)
    assert loss.n == 2 and torch.isfinite(torch.tensor(loss.mean))
