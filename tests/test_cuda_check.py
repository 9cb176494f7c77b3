"""benchmarks/cuda_check.sh, the prepared GPU check: without a GPU it stops at once, before installing
anything; its schedule fitting and command lines (benchmarks/cuda/run_checks.py)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "cuda_check.sh"
NO_GPU = "no CUDA GPU found"


def load_run_checks():
    spec = importlib.util.spec_from_file_location("run_checks", ROOT / "benchmarks" / "cuda" / "run_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(tmp_path, path_prefix=None):
    """Run the check with a python3 that logs its arguments; return (exit status, output, seconds, calls)."""
    calls = tmp_path / "python-calls.txt"
    shim = tmp_path / "python3-shim"
    shim.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "CUDA_CHECK_PYTHON": str(shim), "CUDA_CHECK_STAGE": str(tmp_path / "no-stage"),
           "OUT": str(tmp_path / "out"), "CUDA_CHECK_WORK": str(tmp_path / "work")}
    env.pop("CUDA_CHECK_DRY_RUN_ON_CPU", None)
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    start = time.time()
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    calls_made = calls.read_text().splitlines() if calls.exists() else []
    return done.returncode, done.stdout + done.stderr, time.time() - start, calls_made


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: the check would run")
def test_without_nvidia_smi_the_check_stops_at_once_saying_so_in_one_line(tmp_path):
    rc, output, seconds, calls = run_check(tmp_path)
    assert rc == 2
    assert output.strip().count("\n") == 0 and output.startswith(f"cuda_check: {NO_GPU} (nvidia-smi is not on PATH)")
    assert "nothing was installed" in output and "CUDA_CHECK_DRY_RUN_ON_CPU=1" in output
    assert seconds < 10 and calls == []  # not even python was started
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here: the check would run")
def test_a_gpu_that_torch_cannot_see_also_stops_the_check_before_any_install(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA Imaginary GPU'\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    rc, output, _, calls = run_check(tmp_path, path_prefix=fake_bin)
    assert rc == 2
    assert output.strip().count("\n") == 0
    assert f"{NO_GPU} by " in output and "torch (nvidia-smi lists: NVIDIA Imaginary GPU)" in output
    assert len(calls) == 1 and "torch.cuda.is_available()" in calls[0]  # one look, no pip
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


# --- fitting a schedule into the check's epochs ---------------------------------------------------------------

def schedule(name):
    return yaml.safe_load((ROOT / "schedules" / name).read_text())


def dcq_window(doc):
    policy = next(p for p in doc["policies"] if "extension" in p)
    return policy["starting_epoch"], policy["ending_epoch"], doc["extensions"]["dcq"]


def test_a_schedule_that_fits_is_left_alone():
    run_checks = load_run_checks()
    for name, epochs in [("simplenet_mnist_dcq_binary.yaml", 2), ("resnet20_cifar_dcq_binary.yaml", 5),
                         ("resnet20_cifar_dorefa_binary.yaml", 1)]:
        doc = schedule(name)
        assert run_checks.fit_schedule(doc, epochs) == [] and doc == schedule(name)


def test_a_sequential_window_too_short_for_its_sections_runs_in_parallel_mode_with_a_fine_tuning_epoch():
    run_checks = load_run_checks()
    doc = schedule("resnet20_cifar_dcq_binary.yaml")  # sequential, 4 sections in [0, 4)
    notes = run_checks.fit_schedule(doc, 2)
    start, end, ext = dcq_window(doc)
    assert (start, end) == (0, 1) and ext["mode"] == "parallel" and "section_epochs" not in ext
    assert notes == ["DCQ window [0, 4) shortened to [0, 1) to fit 2 epochs",
                     "sequential mode needs one epoch per section (4): the 1-epoch window runs in parallel mode"]
    assert ext["boundaries"] == ["layer1", "layer2", "layer3"] and ext["loss"] == "mse"  # the rest as it was


def test_a_long_enough_sequential_window_shares_its_epochs_among_the_sections():
    run_checks = load_run_checks()
    doc = schedule("resnet20_cifar_dcq_binary.yaml")
    dcq_policy = next(p for p in doc["policies"] if "extension" in p)
    dcq_policy["ending_epoch"], doc["extensions"]["dcq"]["section_epochs"] = 8, [2, 2, 2, 2]
    run_checks.fit_schedule(doc, 7)
    start, end, ext = dcq_window(doc)
    assert (start, end) == (0, 6) and ext["mode"] == "sequential" and ext["section_epochs"] == [2, 2, 1, 1]


def test_a_window_starting_after_the_checks_epochs_is_refused():
    run_checks = load_run_checks()
    doc = schedule("simplenet_mnist_dcq_binary_kd.yaml")  # section stage from epoch 1
    with pytest.raises(ValueError, match=r"starts after the 1 epochs of this check"):
        run_checks.fit_schedule(doc, 1)


def test_fitted_copies_go_to_the_work_dir_and_name_the_change(tmp_path):
    run_checks = load_run_checks()
    original = ROOT / "schedules" / "resnet20_cifar_dcq_binary.yaml"
    path, notes = run_checks.schedule_for(original, 2, tmp_path)
    assert path == tmp_path / "schedules" / original.name and notes
    assert path.read_text().startswith(f"# {original.name} fitted to 2 epochs") and dcq_window(
        yaml.safe_load(path.read_text()))[:2] == (0, 1)
    assert run_checks.schedule_for(original, 5, tmp_path) == (original, [])


# --- command lines --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_each_runs_command_is_its_schedules_header_with_the_checks_data_teacher_epochs_and_device(cpu):
    run_checks = load_run_checks()
    for check in run_checks.RUNS:
        tokens = run_checks.header_command((ROOT / "schedules" / check.schedule).read_text())
        assert "--cpu" in tokens and "--exp-load-weights-from" in tokens
        cmd = run_checks.adapt_command(tokens, data="DATA", schedule="SCHED.yaml", teacher="FP.pth.tar", epochs=3,
                                       workers=8, cpu=cpu, extra=["--name", "x"])
        assert cmd[0] == "DATA" and ("--cpu" in cmd) == cpu
        options = [token for token in cmd[1:] if token != "--cpu"]
        pairs = dict(zip(options[::2], options[1::2]))
        assert pairs["--compress"] == "SCHED.yaml" and pairs["--exp-load-weights-from"] == "FP.pth.tar"
        assert pairs["--epochs"] == "3" and pairs["-j"] == "8" and pairs["--arch"] in ("simplenet_mnist",
                                                                                       "resnet20_cifar")
        for option in ("-b", "--lr", "--momentum", "--wd", "--vs", "--seed"):  # the header's recipe, unchanged
            assert pairs[option] == tokens[tokens.index(option) + 1]
