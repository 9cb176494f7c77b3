"""distiller_dcq.synthesize against a real Distiller: a synthetic directory made from the FP ResNet-20 teacher
alone, read by Distiller's loaders (synthetic training images, real validation and test sets), the refusals,
and the few-shot study's data-free arms."""
import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distiller_env import distiller_src, import_distiller, unavailable  # noqa: F401 (a fixture)
from conftest import LENET_TEACHER, MNIST_DIR, ROOT, SHARED

distiller = import_distiller()
CIFAR = SHARED / "data" / "cifar10-jpeg"
RESNET_TEACHER = SHARED / "teachers" / "resnet20_cifar_fp.pth.tar"
QUICK = ["iterations=3", "batch_size=16", "class_weight=0.1"]


def synthesize(*args):
    return subprocess.run([sys.executable, "-m", "distiller_dcq.synthesize", *map(str, args)], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def cifar():
    if not (CIFAR / "test" / "truck").is_dir() or not RESNET_TEACHER.exists():
        unavailable(f"{CIFAR} or {RESNET_TEACHER} is missing")
    return CIFAR


@pytest.fixture(scope="module")
def synthetic(cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "resnet20"
    done = synthesize("--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 32, "--data", cifar,
                      "--out", out, "--seed", 5, "--device", "cpu", "--set", *QUICK)
    assert done.returncode == 0, done.stderr
    assert "Validation and test sets: the real ones of" in done.stdout and "step 3/3" in done.stderr
    return out


def test_a_synthetic_directory_is_the_training_set_and_the_real_dataset_validation_and_test(synthetic, cifar):
    from distiller.apputils import load_data
    from distiller_dcq.adapter.checkpoints import network_of_checkpoint
    manifest = json.loads((synthetic / "synthetic.json").read_text())
    assert manifest["images"] == 32 and sum(manifest["images_per_class"]) == 32 and manifest["config"]["iterations"] == 3
    assert sorted(p.name for p in (synthetic / "train").iterdir()) == [str(c) for c in range(10)]
    distiller.set_seed(0)
    train, valid, test, _ = load_data("cifar10", "resnet20_cifar", str(synthetic), 64, 0, validation_split=0.1)
    distiller.set_seed(0)
    _, real_valid, real_test, _ = load_data("cifar10", "resnet20_cifar", str(cifar), 64, 0, validation_split=0.1)
    assert len(train.sampler) == 32 and str(train.dataset.root).startswith(str(synthetic))
    assert list(valid.sampler.data_source) == list(real_valid.sampler.data_source)  # the same real split
    assert len(test.sampler) == 10000 and test.dataset.root == real_test.dataset.root
    # the teacher predicts for each image, as training reads it (PNG, then the real training transform without
    # its random crop and flip), the class of its folder
    from distiller_dcq.adapter.datasets import CIFAR10_TEST_TRANSFORM
    from distiller_dcq.synthesize import synthetic_images
    images = synthetic_images(str(synthetic), CIFAR10_TEST_TRANSFORM)
    teacher = network_of_checkpoint(str(RESNET_TEACHER), "resnet20_cifar").eval()
    with torch.no_grad():
        predicted = teacher(torch.stack([image for image, _ in images])).argmax(1).tolist()
    assert predicted == images.targets
    assert [images.targets.count(c) for c in range(10)] == manifest["images_per_class"]


def test_the_same_seed_gives_the_same_files_and_force_replaces_them(synthetic, cifar, tmp_path):
    again = tmp_path / "again"
    assert synthesize("--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 32, "--data", cifar,
                      "--out", again, "--seed", 5, "--device", "cpu", "--set", *QUICK).returncode == 0

    def files(directory):
        return {p.relative_to(directory): p.read_bytes() for p in (directory / "train").rglob("*.png")}
    assert files(again) == files(synthetic)
    kept = synthesize("--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 16, "--data", cifar,
                      "--out", again, "--seed", 6, "--device", "cpu", "--set", *QUICK)
    assert kept.returncode == 2 and "already holds synthetic images: --force replaces them" in kept.stderr
    replaced = synthesize("--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 16, "--data", cifar,
                          "--out", again, "--seed", 6, "--device", "cpu", "--force", "--set", *QUICK)
    assert replaced.returncode == 0 and len(list((again / "train").rglob("*.png"))) == 16
    assert json.loads((again / "synthetic.json").read_text())["images"] == 16
    assert sorted(p.name for p in again.iterdir()) == ["synthetic.json", "train"]  # no staging directory left
    before = files(again)
    from distiller_dcq.engine.synthesis import SynthesisConfig
    from distiller_dcq.synthesize import make_synthetic_dir

    def interrupt(message):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # stopped while synthesizing: the old set stays whole
        make_synthetic_dir("resnet20_cifar", str(RESNET_TEACHER), 16, str(cifar), str(again),
                           SynthesisConfig(iterations=3, batch_size=16), seed=7, force=True, log=interrupt)
    assert files(again) == before and sorted(p.name for p in again.iterdir()) == ["synthetic.json", "train"]


def _quantized_teachers(tmp_path):
    """A DoReFa-binarized ResNet-20 checkpoint as Distiller saves it (quantizer metadata), and its weights alone."""
    from distiller.apputils import load_lean_checkpoint, save_checkpoint
    from distiller.models import create_model
    model = create_model(False, "cifar10", "resnet20_cifar", parallel=False, device_ids=-1)
    load_lean_checkpoint(model, str(RESNET_TEACHER))
    distiller.file_config(model, torch.optim.SGD(model.parameters(), lr=0.01),
                          str(ROOT / "schedules" / "resnet20_cifar_dorefa_binary.yaml"))
    save_checkpoint(0, "resnet20_cifar", model, dir=str(tmp_path), name="dorefa")
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("float_weight")}
    torch.save({"state_dict": weights, "arch": "resnet20_cifar"}, tmp_path / "weights_only.pth.tar")
    return tmp_path / "dorefa_checkpoint.pth.tar", tmp_path / "weights_only.pth.tar"


def test_refusals_name_the_problem(cifar, tmp_path):
    with_metadata, weights_only = _quantized_teachers(tmp_path)
    from distiller_dcq.subsets import write_subset_dir
    write_subset_dir(str(cifar), 20, 0, str(tmp_path / "subset"))
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    common = ["--data", cifar, "--device", "cpu"]
    cases = [
        (["--arch", "simplenet_mnist", "--teacher", LENET_TEACHER, "--images", 32, "--data", MNIST_DIR,
          "--device", "cpu", "--set", *QUICK], "simplenet_mnist has no BatchNorm layer"),
        (["--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 8, *common, "--set", *QUICK],
         "--images 8: images are made in batches of 16"),
        (["--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 24, *common, "--set", *QUICK],
         "ask for a multiple of it"),
        (["--arch", "resnet21_cifar", "--teacher", RESNET_TEACHER, "--images", 32, *common, "--set", *QUICK],
         "is not a network Distiller"),
        (["--arch", "resnet32_cifar", "--teacher", RESNET_TEACHER, "--images", 32, *common, "--set", *QUICK],
         "is a resnet20_cifar checkpoint, not --arch resnet32_cifar"),
        (["--arch", "resnet20_cifar", "--teacher", with_metadata, "--images", 32, *common, "--set", *QUICK],
         "is a quantized network"),
        (["--arch", "resnet20_cifar", "--teacher", weights_only, "--images", 32, *common, "--set", *QUICK],
         "those of a quantized network"),
        (["--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 32, *common, "--set", "iteration=3"],
         "no synthesis key 'iteration'"),
        (["--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 32, "--data", tmp_path / "nowhere",
          "--device", "cpu", "--set", *QUICK], "does not exist"),
        (["--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 32, "--data", tmp_path / "subset",
          "--device", "cpu", "--set", *QUICK], "is a subset directory: give the real dataset directory"),
    ]
    for args, message in cases:
        done = synthesize(*args, "--out", tmp_path / "out")
        assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "out" / "synthetic.json").exists()
    occupied = synthesize("--arch", "resnet20_cifar", "--teacher", RESNET_TEACHER, "--images", 16, *common,
                          "--out", tmp_path / "occupied", "--force", "--set", *QUICK)
    assert occupied.returncode == 2 and "is not a synthetic directory" in occupied.stderr
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"


def test_the_fewshot_study_runs_its_label_free_arms_on_synthetic_images(tmp_path, cifar, distiller_src, monkeypatch,
                                                                         capsys):
    from distiller_dcq.report import fewshot
    # ResNet-20 from 32 synthetic images (the whole pool) and 16 drawn from it: one epoch of 32, batches of 16
    monkeypatch.setitem(fewshot.STUDY, "resnet20_cifar", dict(sizes=(16, 32), epochs=1, images_per_epoch=32, batch=16,
                                                              train_part=45000, variants={}, batchnorm=True))
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    reference = tmp_path / "earlier" / "results.csv"  # an earlier real-image study, drawn in the plots
    reference.parent.mkdir()
    reference.write_text("run,network,N,images,arm,variant,seed,steps,test_top1,test_top1_recalibrated_bn,seconds\n"
                         + "".join(f"r{n}{seed},resnet20_cifar,{n},real,kd_labelfree,binary,{seed},2,{40 + seed},"
                                   f"{50 + seed},9\n" for n in (16, 32) for seed in (0, 1))
                         + "x,resnet20_cifar,16,real,kd_labelfree,binary,0,20,99,99,9\n")  # another budget: left out
    assert fewshot.reference_points(SimpleNamespace(reference=reference, arms=["kd_labelfree"], sizes=[16, 32]),
                                    "resnet20_cifar", recalibrated=True) == {
        "kd_labelfree": [(16, 50.5, pytest.approx(0.7071, abs=1e-4)), (32, 50.5, pytest.approx(0.7071, abs=1e-4))]}
    older = tmp_path / "older.csv"  # a study from before the steps and images columns: its own budget, real images
    older.write_text("run,network,N,arm,variant,seed,test_top1,test_top1_recalibrated_bn,seconds\n"
                     "a,resnet20_cifar,16,kd_labelfree,binary,0,41,51,9\n")
    assert fewshot.reference_points(SimpleNamespace(reference=older, arms=["kd_labelfree"], sizes=[16]),
                                    "resnet20_cifar", recalibrated=False) == {"kd_labelfree": [(16, 41.0, 0.0)]}
    fewshot.main(["--reference", str(reference), "--distiller-src", str(distiller_src), "--networks", "resnet20_cifar", "--arms", "kd_labelfree",
                  "dorefa_ce", "--images", "synthetic", "--seeds", "0", "--valid-size", "0.02", "--sizes", "16", "32",
                  "--synthesis", "iterations=3", "batch_size=16", "class_weight=1", "--data", f"resnet20_cifar={cifar}",
                  "--teacher", f"resnet20_cifar={RESNET_TEACHER}", "--device", "cpu", "--out", str(out)])
    rows = {row["run"]: row for row in csv.DictReader(open(out / "results.csv"))}
    # labelled arms do not run on synthetic images
    assert set(rows) == {"resnet20_cifar_n16_kd_labelfree_synthetic", "resnet20_cifar_n32_kd_labelfree_synthetic"}
    # two steps of binary training leave chance accuracy; the statistics re-estimated on synthetic images lift it
    assert all(row["images"] == "synthetic" and 0 <= float(row["test_top1"]) <= 100 for row in rows.values())
    assert all(float(row["test_top1_recalibrated_bn"]) > 15 for row in rows.values())
    pool = out / "data" / "resnet20_cifar_synthetic_n32"
    assert json.loads((pool / "synthetic.json").read_text())["images"] == 32
    subset = json.loads((out / "data" / "resnet20_cifar_n16_seed0_synthetic" / "subset.json").read_text())
    assert (out / "data" / "resnet20_cifar_n16_seed0_synthetic" / subset["source"]).resolve() == pool.resolve()
    log = next((out / "runs").glob("resnet20_cifar_n32_*/*/*.log")).read_text()
    assert "Training epoch: 32 samples (16 per mini-batch)" in log
    assert "Training set: the 32 synthetic images of" in log and "validation and test sets: the real ones of" in log
    table = (out / "results.md").read_text()
    assert "The plot also draws, faded, the real-image runs of" in table
    assert "### resnet20_cifar, synthetic images: data-free" in table and "python -m distiller_dcq.synthesize" in table
    assert (out / "synthetic_resnet20_cifar.png").stat().st_size > 2000
    assert (out / "fewshot_resnet20_cifar.png").stat().st_size > 5000
    # what another study would leave in the same --out is refused, not reused: other synthesis settings, and
    # N = 16 drawn from a pool of 16 where the finished run drew it from 32
    common = ["--distiller-src", str(distiller_src), "--networks", "resnet20_cifar", "--arms", "kd_labelfree",
              "--images", "synthetic", "--seeds", "0", "--valid-size", "0.02", "--data", f"resnet20_cifar={cifar}",
              "--teacher", f"resnet20_cifar={RESNET_TEACHER}", "--device", "cpu", "--out", str(out)]
    same = ["--sizes", "16", "32", "--synthesis", "iterations=3", "batch_size=16", "class_weight=1"]
    capsys.readouterr()
    fewshot.main([*common, *same, "--report-only"])  # the same study is not refused: its runs are found
    assert "2 of 2 runs finished" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"_synthetic_n32 was synthesized otherwise \(iterations 3 there, 4 asked; "
                                         r"class_weight 1.0 there, 0.0 asked\)"):
        fewshot.main([*common, "--sizes", "16", "32", "--synthesis", "iterations=4", "batch_size=16"])
    with pytest.raises(SystemExit, match=r"n16_seed0_synthetic draws N = 16, seed 0, x2 from .*_synthetic_n32; this "
                                         r"study asks N = 16, seed 0, x2 from .*_synthetic_n16"):
        fewshot.main([*common, "--sizes", "16", "--synthesis", "iterations=3", "batch_size=16", "class_weight=1"])
    assert not (out / "data" / "resnet20_cifar_synthetic_n16").exists()  # refused before synthesizing anything
    with pytest.raises(SystemExit) as twice:
        fewshot.main([*common, "--sizes", "16", "--images", "synthetic", "synthetic"])
    assert twice.value.code == 2
