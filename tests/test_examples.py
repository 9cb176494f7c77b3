"""examples/: the plain-PyTorch quick start end to end on a tiny budget, its errors and defaults, and the
Distiller route script (against a real Distiller: skipped without one, failed if DCQ_REQUIRE_DISTILLER=1)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import urllib.error

import pytest

from conftest import LENET_TEACHER, MNIST_DIR, ROOT, _require
from distiller_env import compress_classifier_script, import_distiller

QUICKSTART = ROOT / "examples" / "quickstart.py"
FEWSHOT_QUICKSTART = ROOT / "examples" / "quickstart_fewshot.py"
ROUTE = ROOT / "examples" / "distiller_route.sh"
TABLE_ROW = re.compile(r"^(QAT|DCQ)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)s$", re.M)


def quickstart(*args, cwd, env=None):
    done = subprocess.run([sys.executable, str(QUICKSTART), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)
    return done.returncode, done.stdout, done.stderr


def quickstart_module():
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains_both_methods_prints_the_table_and_writes_the_plot(tmp_path):
    _require(MNIST_DIR / "MNIST" / "raw" / "train-images-idx3-ubyte")
    _require(LENET_TEACHER)
    plot = tmp_path / "plot.png"
    rc, out, err = quickstart("--steps", 30, "--train-size", 512, "--eval-every", 30, "--data", MNIST_DIR,
                              "--teacher", LENET_TEACHER, "--out", plot, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert rc == 0, out + err
    assert "FP teacher: test top-1 99.42%" in out
    rows = {method: (float(start), float(final), float(seconds)) for method, start, final, seconds in
            TABLE_ROW.findall(out)}
    assert set(rows) == {"QAT", "DCQ"}, out
    assert rows["QAT"][0] == rows["DCQ"][0] > 50  # the same binarized teacher to start from
    for method, (start, final, seconds) in rows.items():
        assert 90 < final <= 100 and seconds > 0, (method, out)  # chance is 10%
    assert "section pool1" in out and "fine-tune" in out  # DCQ's stages in the progress lines
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_fewshot_quickstart_shows_dcq_without_labels_above_both_baselines_on_60_images(tmp_path):
    """The default run (60 images, 300 steps, about a minute): what the README promises it shows."""
    _require(MNIST_DIR / "MNIST" / "raw" / "train-images-idx3-ubyte")
    _require(LENET_TEACHER)
    done = subprocess.run([sys.executable, str(FEWSHOT_QUICKSTART), "--data", str(MNIST_DIR), "--teacher",
                           str(LENET_TEACHER)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    top1 = {m: float(v) for m, v in re.findall(r"^  (QAT, labels|KD, no labels|DCQ, no labels)\s+test top-1\s+([\d.]+)%",
                                               done.stdout, re.M)}
    assert set(top1) == {"QAT, labels", "KD, no labels", "DCQ, no labels"}, done.stdout
    assert top1["DCQ, no labels"] > max(top1["QAT, labels"], top1["KD, no labels"]) + 2, top1
    assert "60 training images (6 of each digit), 300 steps" in done.stdout
    assert "What this shows: from 60 images and no labels, DCQ's binary LeNet tests" in done.stdout


def test_quickstart_without_mnist_at_data_says_so(tmp_path):
    rc, out, err = quickstart("--data", tmp_path, "--steps", 30, cwd=tmp_path)
    assert rc != 0
    assert f"error: no MNIST at {tmp_path}" in err and "Give --data DIR" in err, err
    assert "Traceback" not in err


def test_quickstart_downloads_only_without_data_and_shared(tmp_path, monkeypatch):
    qs = quickstart_module()
    args = qs.argparse.Namespace(data=None, teacher=None)
    monkeypatch.setattr(qs, "SHARED", tmp_path / "no_shared")
    assert qs.resolve_inputs(args) is True  # download
    assert args.data == qs.Path("data") / "mnist" and args.teacher is None  # None: a teacher is trained first
    args = qs.argparse.Namespace(data=tmp_path, teacher=None)
    assert qs.resolve_inputs(args) is False and args.data == tmp_path  # --data given: never downloads


def test_quickstart_says_what_to_do_when_the_download_fails(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: " +
                           str(urllib.error.URLError("Name or service not known")))
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(SystemExit) as exit_:
        quickstart_module().load_mnist(tmp_path, train=True, download=True)
    assert "downloading it failed" in str(exit_.value) and "Give --data DIR" in str(exit_.value)


@pytest.fixture
def bash():
    path = shutil.which("bash")
    if path is None:
        pytest.skip("bash is not available")
    return path


def route(bash, *args, env=None, cwd=None):
    done = subprocess.run([bash, str(ROUTE), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=900)
    return done.returncode, done.stdout, done.stderr


def test_distiller_route_needs_distillers_source(bash, tmp_path):
    rc, out, err = route(bash)
    assert rc == 2 and "error: no DISTILLER_SRC given" in err and "usage:" in err
    rc, out, err = route(bash, tmp_path, tmp_path / "out")
    assert rc == 2 and "no compress_classifier.py at" in err


def test_distiller_route_runs_dcq_and_dorefa_through_compress_classifier(bash, tmp_path):
    import_distiller()
    distiller_src = compress_classifier_script().parents[2]
    _require(MNIST_DIR / "MNIST" / "raw")
    _require(LENET_TEACHER)
    env = {"EPOCHS": "1", "TRAIN_SIZE": "0.02", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "MNIST_DIR": str(MNIST_DIR), "TEACHER": str(LENET_TEACHER)}
    rc, out, err = route(bash, distiller_src, tmp_path / "out", env=env, cwd=tmp_path)
    assert rc == 0, out + err
    assert "stitched network validation Top1" in out
    finals = dict(re.findall(r"^(dorefa_binary|dcq_binary)\s+==> Top1: ([\d.]+)", out, re.M))
    assert set(finals) == {"dorefa_binary", "dcq_binary"}, out
    assert all(float(top1) > 90 for top1 in finals.values()), out
    assert (tmp_path / "out" / "dcq_binary.log").is_file()
