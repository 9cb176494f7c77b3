"""A run interrupted twice ends with exactly the weights of an uninterrupted one (compress_classifier.py)."""
import os

import pytest
import torch

from conftest import LENET_TEACHER, ROOT
from distiller_env import import_distiller, run_compress_classifier

import_distiller()
from distiller_dcq.adapter.checkpoints import load_distiller_checkpoint  # noqa: E402

SCHEDULES = ROOT / "schedules"

def schedule(tmp_path, name):
    """DoReFa, or DCQ with a 2-epoch section stage (parallel or sequential) then fine-tuning: over 3
    epochs, the first interruption falls inside the stage and the second right after the merge."""
    if name == "dorefa":
        return SCHEDULES / "simplenet_mnist_dorefa_binary.yaml"
    text = (SCHEDULES / "simplenet_mnist_dcq_binary.yaml").read_text()
    text = text.replace("    boundaries: [pool1, pool2, relu3]\n    loss: mse\n",
                        f"    boundaries: [pool2]\n    loss: mse\n    mode: {name.split('_')[1]}\n")
    text = text.replace("instance_name: dcq\n    starting_epoch: 0\n    ending_epoch: 1",
                        "instance_name: dcq\n    starting_epoch: 0\n    ending_epoch: 2")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def last_checkpoint(out_dir):
    return max(out_dir.glob("*/checkpoint.pth.tar"), key=os.path.getmtime)


def epoch_lrs(log):
    return [line.split("LR ")[1].split()[0] for line in log.splitlines() if "Overall Loss" in line]


@pytest.mark.parametrize("name", ["dorefa", "dcq_parallel", "dcq_sequential"])
def test_a_run_resumed_twice_gives_the_uninterrupted_weights_bit_for_bit(tmp_path, name):
    common = ["--compress", schedule(tmp_path, name), "--deterministic"]
    rc, whole = run_compress_classifier(tmp_path / "whole", "--epochs", "3", *common,
                                        "--exp-load-weights-from", LENET_TEACHER, train_size="0.01")
    assert rc == 0, whole[-3000:]
    rc, log = run_compress_classifier(tmp_path / "part1", "--epochs", "1", *common,
                                      "--exp-load-weights-from", LENET_TEACHER, train_size="0.01")
    assert rc == 0, log[-3000:]
    lrs = epoch_lrs(log)
    for part, epochs in (("part2", 2), ("part3", 3)):  # the third run resumes a checkpoint of a resumed run
        previous = last_checkpoint(tmp_path / f"part{int(part[-1]) - 1}")
        rc, log = run_compress_classifier(tmp_path / part, "--epochs", epochs, *common, "--resume-from", previous,
                                          train_size="0.01")
        assert rc == 0, log[-3000:]
        lrs += epoch_lrs(log)
    assert lrs == epoch_lrs(whole)  # the LR schedule continues, never decayed twice
    expected = load_distiller_checkpoint(str(last_checkpoint(tmp_path / "whole")))["state_dict"]
    got = load_distiller_checkpoint(str(last_checkpoint(tmp_path / "part3")))["state_dict"]
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert got["fc1.weight"].abs().unique().numel() == 1  # still binary, quantized once
