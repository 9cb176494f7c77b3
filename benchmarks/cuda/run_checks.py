"""The training part of benchmarks/cuda_check.sh: DCQ vs DoReFa binary on LeNet/MNIST and on ResNet-20 with a
CIFAR-10 JPEG subset, each from its FP teacher, through Distiller's unmodified compress_classifier.py (on the
GPU unless --device cpu); then the few-shot study's best DCQ arm (AdaRound level choices, no labels) and its
best baseline (KD without labels) on 512 fixed ResNet-20 training images, each followed by BatchNorm
re-estimation (distiller_dcq.recalibrate) on the same device. Writes test top-1 and seconds per training
epoch, with the machine and software, to OUT/cuda_check.md and OUT/cuda_check.json, rewritten after every
run so that a cut-off check still reports.

Each run's command line is the one in its schedule's header, with the data, teacher, epochs and workers of
this check. A schedule whose DCQ window leaves no fine-tuning epoch within --epochs is copied into the work
dir with a shorter window (see fit_schedule), and the change is reported.
"""
import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import yaml

from distiller_dcq.report.runs import parse_distiller_log, portable_paths
from distiller_dcq.subsets import read_subset_dir, write_subset_dir

REPO = Path(__file__).resolve().parents[2]
SCHEDULES = REPO / "schedules"


class Check(NamedTuple):
    """One run: ``data`` and ``teacher`` under --shared; ``epochs``: which --*-epochs, or "schedule" for the
    schedule's own, unchanged; ``few_shot``: on --few-shot-images fixed training images (a
    distiller_dcq.subsets directory, seed 0); ``recalibrate``: re-estimate its BatchNorm statistics
    afterwards (distiller_dcq.recalibrate)."""
    network: str
    method: str
    schedule: str
    data: str
    teacher: str
    epochs: str
    few_shot: bool = False
    recalibrate: bool = False


LENET = ("data/mnist", "teachers/simplenet_mnist_fp.pth.tar")
RESNET = ("data/cifar10-jpeg", "teachers/resnet20_cifar_fp.pth.tar")
FEW_SHOT = "ResNet-20/CIFAR-10, N = {images}"
RUNS = [
    Check("LeNet/MNIST", "DCQ binary", "simplenet_mnist_dcq_binary.yaml", *LENET, "lenet"),
    Check("LeNet/MNIST", "DoReFa binary", "simplenet_mnist_dorefa_binary.yaml", *LENET, "lenet"),
    Check("ResNet-20/CIFAR-10 subset", "DCQ binary", "resnet20_cifar_dcq_binary.yaml", *RESNET, "resnet"),
    Check("ResNet-20/CIFAR-10 subset", "DoReFa binary", "resnet20_cifar_dorefa_binary.yaml", *RESNET, "resnet"),
    # the few-shot study's best DCQ arm and its best baseline (benchmarks/results/fewshot), no labels read
    Check(FEW_SHOT, "KD without labels", "resnet20_cifar_kd_binary_labelfree.yaml", *RESNET, "schedule", True, True),
    Check(FEW_SHOT, "DCQ AdaRound, no labels", "resnet20_cifar_dcq_binary_adaround_labelfree.yaml", *RESNET, "schedule",
          True, True),
]
SHOWN = re.compile(r"Training epoch|==> Top1|DCQ \w+: (split|epoch \d+ trains|merged)|AdaRound \w+: |Traceback|Error|"
                   r"error:")
FLAGS = {"--cpu", "--deterministic", "--det", "--pretrained", "--evaluate", "-e", "--verbose", "-v"}


def log(message):
    print(f"[run_checks {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- command lines and schedules ------------------------------------------------------------------------

def header_command(schedule_text):
    """The compress_classifier.py arguments written in a schedule's header comment."""
    lines = [line[1:].strip() for line in schedule_text.splitlines() if line.startswith("#")]
    start = next((i for i, line in enumerate(lines) if "compress_classifier.py" in line), None)
    if start is None:
        raise ValueError("the schedule's header has no compress_classifier.py command line")
    command = lines[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + " " + lines[start]
    tokens = shlex.split(command)
    return tokens[tokens.index(next(t for t in tokens if t.endswith("compress_classifier.py"))) + 1:]


def adapt_command(tokens, *, data, schedule, teacher, epochs, workers, cpu, extra=()):
    """``tokens`` (a header's arguments) with this check's data, schedule, teacher, epochs and workers;
    ``--cpu`` only when ``cpu``."""
    options, positional, i = [], [], 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-") and token not in FLAGS and i + 1 < len(tokens):
            options.append([token, tokens[i + 1]])
            i += 2
        else:
            (options.append([token]) if token.startswith("-") else positional.append(token))
            i += 1
    if len(positional) != 1:
        raise ValueError(f"expected one data directory in the header's command line, found {positional}")
    replace = {"--compress": schedule, "--exp-load-weights-from": teacher, "--epochs": epochs, "-j": workers,
               "--workers": workers}
    options = [[o[0], str(replace[o[0]])] if o[0] in replace and len(o) == 2 else o
               for o in options if o[0] != "--cpu"]
    for flag in ("--compress", "--exp-load-weights-from", "--epochs"):
        if not any(o[0] == flag for o in options):
            raise ValueError(f"the header's command line has no {flag}")
    if not any(o[0] in ("-j", "--workers") for o in options):
        options.append(["-j", str(workers)])
    return [str(data)] + [part for o in options for part in o] + (["--cpu"] if cpu else []) + list(extra)


def fit_schedule(schedule, epochs):
    """Fit every SectionalKDPolicy window of ``schedule`` (a loaded YAML dict, edited in place) into
    ``epochs`` epochs, keeping at least one fine-tuning epoch after it when ``epochs`` >= 2: the window
    then ends at ``epochs - 1``. A sequential window too short for one epoch per section runs in
    parallel mode (the paper's); a longer one shares its epochs out among the sections. Returns the
    changes, in words (none: the schedule fits as it is)."""
    notes = []
    extensions = schedule.get("extensions") or {}
    for policy in schedule.get("policies") or []:
        name = (policy.get("extension") or {}).get("instance_name")
        if name is None or extensions.get(name, {}).get("class") != "SectionalKDPolicy":
            continue
        start, end = policy["starting_epoch"], policy["ending_epoch"]
        last = max(start + 1, epochs - 1 if epochs >= 2 else epochs)
        if end <= last:
            continue
        if start >= epochs:
            raise ValueError(f"the DCQ window [{start}, {end}) starts after the {epochs} epochs of this check")
        policy["ending_epoch"] = last
        notes.append(f"DCQ window [{start}, {end}) shortened to [{start}, {last}) to fit {epochs} epochs")
        ext = extensions[name]
        if ext.get("mode") == "sequential":
            sections, length = len(ext["section_epochs"]), last - start
            if length < sections:
                ext["mode"] = "parallel"
                del ext["section_epochs"]
                notes.append(f"sequential mode needs one epoch per section ({sections}): the {length}-epoch "
                             f"window runs in parallel mode")
            else:
                ext["section_epochs"] = [length // sections + (i < length % sections) for i in range(sections)]
                notes.append(f"section_epochs {ext['section_epochs']}")
    return notes


def schedule_for(schedule_file, epochs, work):
    """The schedule to run for ``epochs`` epochs: the original, or a fitted copy in ``work``."""
    text = schedule_file.read_text()
    schedule = yaml.safe_load(text)
    notes = fit_schedule(schedule, epochs)
    if not notes:
        return schedule_file, []
    copy = Path(work) / "schedules" / schedule_file.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(f"# {schedule_file.name} fitted to {epochs} epochs by benchmarks/cuda/run_checks.py: "
                    f"{'; '.join(notes)}\n" + yaml.safe_dump(schedule, sort_keys=False))
    return copy, notes


# --- running ------------------------------------------------------------------------------------------------

def run(cmd, cwd, console, timeout):
    """Run ``cmd``, all its output into ``console``, the lines that show progress on our stdout too.
    Returns the exit status, or None if it ran past ``timeout`` seconds and was killed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = []
    with open(console, "w") as sink:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1)

        def kill():
            killed.append(True)
            process.kill()  # its data-loader workers exit when they see it gone

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in process.stdout:
                sink.write(line)
                if SHOWN.search(line):
                    print("    " + line.rstrip(), flush=True)
            process.wait()
        finally:
            timer.cancel()
    return None if killed else process.returncode


def one_run(spec, args, deadline):
    name = re.sub(r"\W+", "_", spec.schedule[:-5] + (f"_n{args.few_shot_images}" if spec.few_shot else ""))
    out_dir = Path(args.work) / "runs" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    data, extra = Path(args.shared) / spec.data, args.extra.split()
    if spec.few_shot:  # the subset fixes the training images: no --effective-train-size
        data = Path(args.work) / "subsets" / f"{Path(spec.data).name}_n{args.few_shot_images}"
        write_subset_dir(str(Path(args.shared) / spec.data), args.few_shot_images, 0, str(data), args.few_shot_repeat)
        if "--effective-train-size" in extra:
            at = extra.index("--effective-train-size")
            del extra[at:at + 2]
    header = header_command((SCHEDULES / spec.schedule).read_text())
    if spec.epochs == "schedule":
        epochs, schedule, notes = int(header[header.index("--epochs") + 1]), SCHEDULES / spec.schedule, []
    else:
        epochs = args.lenet_epochs if spec.epochs == "lenet" else args.resnet_epochs
        schedule, notes = schedule_for(SCHEDULES / spec.schedule, epochs, args.work)
    script = Path(args.distiller_src) / "examples" / "classifier_compression" / "compress_classifier.py"
    cmd = [sys.executable, str(script), *adapt_command(
        header, data=data, schedule=schedule, teacher=Path(args.shared) / spec.teacher,
        epochs=epochs, workers=args.workers, cpu=args.device == "cpu",
        extra=["--out-dir", str(out_dir), "--name", name, *extra])]
    result = {"network": spec.network.format(images=args.few_shot_images), "method": spec.method,
              "schedule": spec.schedule, "epochs": epochs, "schedule_changes": notes, "cmd": cmd}
    label = f"{result['network']} {spec.method}"
    left = deadline - time.time() - args.reserve
    if left < 20:
        log(f"{label}: skipped, {left + args.reserve:.0f} s left of the check's budget")
        return {**result, "status": "skipped: out of time"}
    for note in notes:
        log(f"{spec.schedule}: {note}")
    log(f"{label}: {epochs} epochs, time limit {left:.0f} s")
    start = time.time()
    rc = run(cmd, out_dir, out_dir / "console.txt", left)
    result["wall_s"] = round(time.time() - start, 1)
    logs = sorted(out_dir.glob(f"{name}___*/*.log"), key=os.path.getmtime)
    if logs:
        text = logs[-1].read_text()
        result.update(parse_distiller_log(text))
        gpus = re.search(r"Number of GPUs: (\d+)", text)
        result["gpus_seen_by_distiller"] = int(gpus.group(1)) if gpus else None
    if rc is None:
        result["status"] = f"timed out after {left:.0f} s"
    elif rc != 0:
        tail = (out_dir / "console.txt").read_text().strip().splitlines() or ["no output"]
        result["status"] = f"failed (exit {rc}): {tail[-1]}"
    elif args.device == "cuda" and not result.get("gpus_seen_by_distiller"):
        result["status"] = "failed: Distiller's log does not show a GPU (Number of GPUs)"
    elif result.get("test_top1") is None:
        result["status"] = "failed: no test top-1 in Distiller's log"
    elif spec.method.startswith("DCQ") and not result.get("stitched_top1"):
        result["status"] = "failed: the DCQ stage never merged (no stitched-network accuracy in the log)"
    else:
        result["status"] = "ok"
    seconds = result.get("train_seconds") or []
    log(f"{label}: {result['status']}; test top-1 {result.get('test_top1')}; s/training epoch "
        f"{[round(s, 1) for s in seconds]}; wall {result['wall_s']} s")
    if spec.recalibrate and result["status"] == "ok":
        result.update(recalibrate(cmd, data, out_dir, name, args, deadline))
        if result["recalibration_status"] != "ok":
            result["status"] = f"BatchNorm re-estimation {result['recalibration_status']}"
    return result


def recalibrate(cmd, data, out_dir, name, args, deadline):
    """distiller_dcq.recalibrate on the run's checkpoint, on ``args.device``: its BatchNorm statistics
    re-estimated on one epoch's worth of its training images. Returns its command, result and status."""
    option = dict(zip(cmd, cmd[1:]))
    checkpoints = sorted(out_dir.glob(f"{name}___*/{name}_checkpoint.pth.tar"), key=os.path.getmtime)
    _, size, _, repeat = read_subset_dir(str(data))
    batch = int(option.get("-b", option.get("--batch-size", 256)))
    recal = [sys.executable, "-m", "distiller_dcq.recalibrate", str(data),
             str(checkpoints[-1]) if checkpoints else "(no checkpoint)", "--arch", option["--arch"],
             "--seed", option["--seed"], "--vs", option.get("--vs", "0.1"), "-b", str(batch),
             "--train-batches", str(max(1, size * repeat // batch)), "--device", args.device, "--skip-before"]
    for flag in ("--effective-valid-size", "--effective-test-size"):
        if flag in option:
            recal += [flag, option[flag]]
    left = deadline - time.time() - args.reserve
    if not checkpoints or left < 10:
        return {"recalibration_cmd": recal, "recalibration_status": "not run: " + (
            "no checkpoint" if not checkpoints else "out of time")}
    start = time.time()
    rc = run(recal, out_dir, out_dir / "recalibrate.txt", left)
    lines = (out_dir / "recalibrate.txt").read_text().strip().splitlines() or ["no output"]
    found = {"recalibration_cmd": recal, "recalibration_wall_s": round(time.time() - start, 1)}
    if rc != 0:
        return {**found, "recalibration_status": "timed out" if rc is None else f"failed (exit {rc}): {lines[-1]}"}
    found.update(recalibrated=json.loads(lines[-1]), recalibration_status="ok")
    log(f"{name}: BatchNorm re-estimated on {args.device} in {found['recalibration_wall_s']} s: test top-1 "
        f"{found['recalibrated']['test_top1']:.2f}")
    return found


# --- the machine and the report -------------------------------------------------------------------------------

def environment(args):
    import torch
    env = {"mode": "GPU" if args.device == "cuda" else "CPU dry run (plumbing only: the numbers mean nothing)",
           "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(), "host": platform.node()}
    if torch.cuda.is_available():
        env["torch_device"] = torch.cuda.get_device_name(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        env["nvidia_smi"] = f"not available ({err.__class__.__name__})"
    commit = Path(args.distiller_src) / "COMMIT"
    env["distiller_commit"] = commit.read_text().strip() if commit.exists() else "unknown"
    import distiller_dcq
    installed = "site-packages" in Path(distiller_dcq.__file__).parts
    env["distiller_dcq"] = "the installed copy (site-packages)" if installed else "the checkout"
    return env


def mean(values):
    return sum(values) / len(values) if values else None


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def write_report(out, env, tests, results, places):
    """cuda_check.json and cuda_check.md in ``out``, this machine's paths written with ``places``
    (``report.runs.portable_paths``) so that the commands read on any machine."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(portable_paths(json.dumps({"environment": env, "tests": tests,
                                                                    "runs": results}, indent=1, default=str), places))
    lines = ["# CUDA check (benchmarks/cuda_check.sh)", "",
             f"- mode: {env['mode']}",
             f"- GPU (nvidia-smi): {env.get('nvidia_smi')}; torch sees: {env.get('torch_device', 'no CUDA device')}",
             f"- Python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}), "
             f"{env['cpus']} CPUs; Distiller {env['distiller_commit']}; distiller_dcq from {env['distiller_dcq']}",
             f"- tests: `{tests.get('command', '-')}`: {tests.get('summary', 'not run')} (exit {tests.get('rc', '-')})",
             "", "Each run from its FP teacher (`--exp-load-weights-from`), Distiller's unmodified "
             "compress_classifier.py, the command line of the schedule's header with this check's epochs and "
             "data. Seconds per training epoch: Distiller's log timestamps, validation excluded. The few-shot runs "
             "(N images) train on a fixed subset directory (distiller_dcq.subsets, seed 0) of the carried "
             "CIFAR-10 subset, so their numbers are not the few-shot study's; afterwards "
             "distiller_dcq.recalibrate re-estimates their BatchNorm statistics on the same device.", "",
             "| network | method | epochs | test top-1 | stitched top-1 at merge | test top-1, BatchNorm re-estimated "
             "| s / training epoch (mean; each) | run wall s | GPUs seen | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        seconds = r.get("train_seconds") or []
        stitched = r.get("stitched_top1") or []
        lines.append(f"| {r['network']} | {r['method']} | {r['epochs']} | {fmt(r.get('test_top1'))} | "
                     f"{fmt(stitched[-1]) if stitched else '-'} | "
                     f"{fmt((r.get('recalibrated') or {}).get('test_top1'))} | {fmt(mean(seconds))}; "
                     f"{', '.join(fmt(s, 1) for s in seconds) or '-'} | {fmt(r.get('wall_s'), 1)} | "
                     f"{r.get('gpus_seen_by_distiller', '-')} | {r['status']} |")
    changes = [f"- {r['schedule']}: {'; '.join(r['schedule_changes'])}" for r in results if r["schedule_changes"]]
    if changes:
        lines += ["", "Schedules fitted to the epochs of this check (copies in the work dir):", *changes]
    lines += ["", "Commands:", ""] + [f"    {shlex.join(c)}" for r in results
                                        for c in (r["cmd"], r.get("recalibration_cmd")) if c]
    lines += ["", "`python3` is the GPU machine's interpreter, `$DISTILLER_SRC` Distiller's source, `$CUDA_CHECK_WORK` the "
              "work dir where the check unpacks the carried data; other paths are relative to the repository."]
    (out / "cuda_check.md").write_text(portable_paths("\n".join(lines) + "\n", places))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distiller-src", required=True, help="holds distiller/ and examples/classifier_compression/")
    parser.add_argument("--shared", required=True, help="holds data/mnist, data/cifar10-jpeg and teachers/")
    parser.add_argument("--work", required=True, help="runs and fitted schedules go here")
    parser.add_argument("--out", required=True, help="cuda_check.md and cuda_check.json go here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--lenet-epochs", type=int, default=2)
    parser.add_argument("--resnet-epochs", type=int, default=5)
    parser.add_argument("--few-shot-images", type=int, default=512, help="the few-shot runs' training images")
    parser.add_argument("--few-shot-repeat", type=int, default=4, help="times each is seen per epoch")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--extra", default="", help="more compress_classifier arguments for every run")
    parser.add_argument("--deadline", type=float, default=None, help="unix time by which every run must end")
    parser.add_argument("--reserve", type=float, default=15, help="seconds kept after the runs for the report")
    parser.add_argument("--tests-json", default=None, help="the test step's command, summary and exit status")
    args = parser.parse_args(argv)
    deadline = args.deadline or time.time() + 3600
    tests = json.loads(Path(args.tests_json).read_text()) if args.tests_json else {}
    out = Path(args.out)
    env = environment(args)
    log(f"{env['mode']}; GPU: {env.get('nvidia_smi')}; torch {env['torch']} CUDA {env['torch_cuda']}")
    if args.device == "cuda" and not env["cuda_available"]:
        raise SystemExit("run_checks: --device cuda, but torch sees no CUDA device")
    places = {sys.executable: "python3", args.distiller_src: "$DISTILLER_SRC", args.work: "$CUDA_CHECK_WORK",
              REPO: ""}
    results = []
    for spec in RUNS:
        results.append(one_run(spec, args, deadline))
        write_report(out, env, tests, results, places)
    failed = [f"{r['network']} {r['method']}" for r in results if r["status"] != "ok"]
    log(f"report: {out / 'cuda_check.md'}; " + (f"NOT OK: {', '.join(failed)}" if failed else "all runs ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
