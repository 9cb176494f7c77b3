"""Fixed, class-balanced training subsets: the choice (plain Python) and compress_classifier reading them."""
import json

import numpy as np
import pytest

from conftest import LENET_TEACHER, MNIST_DIR, ROOT
from distiller_dcq.subsets import balanced_indices, main as subsets_main, read_subset_dir


def test_balanced_indices_take_as_many_of_each_class_from_the_candidates_only():
    labels = np.repeat(np.arange(10), 100)
    candidates = np.arange(0, 1000, 2)  # 50 of each class
    chosen = balanced_indices(labels, candidates, 64, seed=3)
    assert len(chosen) == len(set(chosen)) == 64 and set(chosen) <= set(candidates.tolist())
    counts = np.bincount(labels[chosen], minlength=10)
    assert sorted(counts.tolist()) == [6] * 6 + [7] * 4
    assert chosen == balanced_indices(labels, candidates, 64, seed=3) != balanced_indices(labels, candidates, 64, 4)
    with pytest.raises(ValueError, match=r"needs more than the 500 of the training part"):
        balanced_indices(labels, candidates, 501, seed=0)


def test_balanced_subsets_draw_the_images_they_always_drew():
    # the committed studies' subsets: these indices come from the first release of balanced_indices
    labels = np.repeat(np.arange(10), 100)
    assert balanced_indices(labels, np.arange(0, 1000, 2), 23, seed=7) == [
        76, 82, 104, 130, 284, 290, 348, 382, 410, 478, 528, 534, 578, 624, 644, 696, 750, 754, 796, 870, 876, 932, 998]


def test_a_class_with_too_few_images_gives_its_share_to_the_others():
    labels = np.array([0] * 2 + [1] * 30 + [2] * 5 + [3] * 40)  # a synthetic directory's classes are uneven
    chosen = balanced_indices(labels, np.arange(len(labels)), 40, seed=1)
    counts = np.bincount(labels[chosen])
    assert len(set(chosen)) == 40 and counts[0] == 2 and counts[2] == 5 and sorted(counts[[1, 3]]) == [16, 17]
    assert sorted(balanced_indices(labels, np.arange(len(labels)), len(labels), seed=2)) == list(range(len(labels)))


def test_the_command_writes_a_subset_directory_relative_to_its_source(tmp_path):
    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST is missing from {MNIST_DIR} (set DCQ_SHARED_DIR)")
    subsets_main([str(MNIST_DIR), "--size", "60", "--seed", "1", "--out", str(tmp_path / "mnist_60")])
    assert read_subset_dir(str(tmp_path / "mnist_60")) == (str(MNIST_DIR), 60, 1, 1)
    assert not json.loads((tmp_path / "mnist_60" / "subset.json").read_text())["source"].startswith("/")  # relative
    with pytest.raises(SystemExit):
        subsets_main([str(tmp_path / "mnist_60"), "--size", "6", "--out", str(tmp_path / "again")])


def test_distiller_reads_a_subset_directory_with_the_full_runs_validation_and_test_sets(tmp_path):
    from distiller_env import import_distiller
    import_distiller()
    from distiller import apputils
    if not (MNIST_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST is missing from {MNIST_DIR}")
    subsets_main([str(MNIST_DIR), "--size", "60", "--out", str(tmp_path / "mnist_60")])
    subsets_main([str(MNIST_DIR), "--size", "60", "--repeat", "3", "--out", str(tmp_path / "mnist_60x3")])

    def loaders(data_dir):
        np.random.seed(0)
        return apputils.load_data("mnist", "simplenet_mnist", str(data_dir), batch_size=32, workers=0)

    full_train, full_valid, full_test, _ = loaders(MNIST_DIR)
    train, valid, test, _ = loaders(tmp_path / "mnist_60")
    assert list(valid.sampler.data_source) == list(full_valid.sampler.data_source)  # the same validation images
    assert len(test.sampler) == len(full_test.sampler) == 10000
    chosen = list(train.sampler.indices)
    assert len(chosen) == 60 and set(chosen) <= set(full_train.sampler.data_source)
    assert np.bincount(train.dataset.targets[chosen].numpy(), minlength=10).tolist() == [6] * 10
    assert sorted(i for batch in [list(train.sampler)] for i in batch) == sorted(chosen)  # every epoch: those 60
    repeated = list(loaders(tmp_path / "mnist_60x3")[0].sampler)
    assert sorted(repeated) == sorted(chosen * 3) and repeated[:60] != repeated[60:120]  # 3 times, shuffled


def test_compress_classifier_trains_on_the_subset(tmp_path):
    from distiller_env import import_distiller, run_compress_classifier
    import_distiller()
    subsets_main([str(MNIST_DIR), "--size", "60", "--out", str(tmp_path / "mnist_60")])
    args = ["--epochs", "1", "--compress", ROOT / "schedules" / "simplenet_mnist_dorefa_binary.yaml",
            "--exp-load-weights-from", LENET_TEACHER]
    rc, log = run_compress_classifier(tmp_path / "run", *args, train_size="1.0", data_dir=tmp_path / "mnist_60")
    assert rc == 0, log[-3000:]
    assert "training=60\n" in log and "validation=300\n" in log  # --effective-valid-size 0.05 of 6000
    rc, log = run_compress_classifier(tmp_path / "refused", *args, train_size="0.5", data_dir=tmp_path / "mnist_60")
    assert rc != 0 and "already fixes the training images (60 of" in log and "drop --effective-train-size" in log
