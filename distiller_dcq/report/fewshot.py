"""When does DCQ earn its place? Few-shot and label-free quantization, DCQ against QAT and KD.

For every network, training-set size N and seed it makes a fixed, class-balanced subset of N images
(``distiller_dcq.subsets``; "full": the whole training part, a new random part each epoch) and runs
every arm's schedule through Distiller's unmodified compress_classifier.py from the same FP teacher.
Every arm takes the same number of optimizer steps at a given N: an epoch is the network's
images-per-epoch (a subset's images each seen images-per-epoch/N times; "full": that many drawn
anew; a subset larger than it: one pass, so more steps), the schedule's own epochs. Writes into
``--out``: ``results.md`` (test top-1, mean ± std over the seeds, and every command), ``results.csv``
(one row per run) and ``fewshot_<network>.png`` (test top-1 against N, log scale, error bars: std over
the seeds). Networks with BatchNorm: every run tested again after re-estimating its statistics
(``distiller_dcq.recalibrate``). Finished runs are reused.

    python -m distiller_dcq.report.fewshot --distiller-src DISTILLER --out results/fewshot --jobs 2
"""
import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..subsets import is_subset_dir, read_subset_dir, write_subset_dir
from .reproduce import NETWORKS, _resolve, resolve_common_args
from .runs import (add_device_options, device_description, device_options, exit_if_any_failed, portable_paths,
                   run_compress_classifier, same_run, with_pythonpath)

# network -> the study's sizes (None: the full training part), epochs, images per epoch, batch size,
# training-part size, the sizes at which each variant runs, whether it has BatchNorm (then every run is
# also tested after re-estimating its statistics), the only arms it runs (when not all), and those of the
# arms that run at fewer sizes
STUDY = {
    "simplenet_mnist": dict(sizes=(60, 300, 1000, None), epochs=6, images_per_epoch=6400, batch=128, train_part=54000,
                            variants={"a2": (1000,)}, batchnorm=False,
                            # LeNet's 4 sections are its 4 layers; it has no BatchNorm to re-estimate
                            arm_sizes={"dcq_blocks_mixed_labelfree": (), "dcq_adaround_whole_labelfree": (),
                                       "dcq_adaround_lowlr_labelfree": ()}),
    "resnet20_cifar": dict(sizes=(512, 2048, 8192, None), epochs=10, images_per_epoch=2048, batch=64, train_part=45000,
                           variants={"ternary": (512,)}, batchnorm=True,
                           arm_sizes={"dcq_blocks_mixed_labelfree": (512, 2048)}),
    # the label-free arms only (data-free quantization's counterparts), as ResNet-20's
    "vgg11_bn_cifar": dict(sizes=(512,), epochs=10, images_per_epoch=2048, batch=64, train_part=45000, variants={},
                           batchnorm=True, arms=("kd_labelfree", "dcq_mixed_labelfree", "dcq_adaround_labelfree",
                                                 "dcq_adaround_lowlr_labelfree")),
}
VALIDATION_SPLIT = "0.1"  # every run's --vs: Distiller's default
# arm -> (schedule suffix, what it is, whether it reads labels)
ARMS = {
    "dorefa_ce": ("dorefa_binary", "DoReFa QAT, cross-entropy", True),
    "dorefa_kd": ("dorefa_binary_kd", "DoReFa QAT, logits KD + cross-entropy", True),
    "kd_labelfree": ("kd_binary_labelfree", "logits KD only, no labels", False),
    "dcq_ce": ("dcq_binary", "DCQ sections, then cross-entropy", True),
    "dcq_labelfree": ("dcq_binary_labelfree", "DCQ sections, then logits KD, no labels", False),
    "dcq_mixed_labelfree": ("dcq_binary_mixed_labelfree", "DCQ, QDrop-mixed section inputs, then logits KD, "
                                                          "no labels", False),
    "dcq_blocks_mixed_labelfree": ("dcq_binary_mixed_labelfree_blocks", "as dcq_mixed_labelfree, one section per "
                                                                        "residual block (BRECQ's granularity)", False),
    "dcq_adaround_labelfree": ("dcq_binary_adaround_labelfree", "as dcq_mixed_labelfree, the sections learning only "
                                                                "which weights leave their level (AdaRound)", False),
    "dcq_adaround_whole_labelfree": ("dcq_binary_adaround_whole_labelfree", "as dcq_adaround_labelfree, the section "
                                     "stage the whole run (no logits-KD phase), BatchNorm re-estimated at its end",
                                     False),
    "dcq_adaround_lowlr_labelfree": ("dcq_binary_adaround_lowlr_labelfree", "as dcq_adaround_labelfree, the logits-KD "
                                     "phase at a tenth of the rate (0.001)", False),
}
# variant of the binary-weight, FP-activation study -> (its schedule suffix made from an arm's, what it is, the
# arms it runs, those of --arms with a schedule of the variant); a variant runs at the sizes STUDY gives it
VARIANT_ARMS = ("dorefa_ce", "dorefa_kd", "kd_labelfree", "dcq_mixed_labelfree")
VARIANTS = {
    "ternary": (lambda suffix: suffix.replace("binary", "ternary"), "ternary weights, FP activations",
                VARIANT_ARMS + ("dcq_adaround_labelfree", "dcq_adaround_lowlr_labelfree")),
    "a2": (lambda suffix: suffix + "_a2", "binary weights, 2-bit DoReFa activations", VARIANT_ARMS),
}
# where the training images come from: the training set, or distiller_dcq.synthesize (the arms that read no labels)
IMAGES = ("real", "synthetic")


@dataclass(frozen=True)
class Run:
    arch: str
    size: int  # None: the full training part
    arm: str
    seed: int
    variant: str = ""  # a key of VARIANTS; "": binary weights, FP activations
    budget: int = None  # optimizer steps (images per epoch = budget x batch / epochs); None: the study's own
    images: str = "real"  # one of IMAGES: where the N training images come from

    @property
    def name(self):
        return (f"{self.arch}_n{self.size or 'full'}_{self.arm}" + (f"_{self.variant}" if self.variant else "")
                + (f"_s{self.budget}" if self.budget else "") + ("" if self.images == "real" else f"_{self.images}")
                + (f"_seed{self.seed}" if self.seed else ""))

    @property
    def schedule(self):
        suffix = ARMS[self.arm][0]
        return f"{self.arch}_{VARIANTS[self.variant][0](suffix) if self.variant else suffix}.yaml"


def runs_at(arch, arm, size):
    """Whether ``arm`` runs on ``arch`` at ``size`` (STUDY's arms, when given, are the network's only ones; its
    arm_sizes limit some arms; the others run at any)."""
    limited = STUDY[arch].get("arm_sizes", {})
    return arm in STUDY[arch].get("arms", ARMS) and (arm not in limited or size in limited[arm])


def plan(args):
    """The sizes up to ``--many-seeds-up-to`` first, seed by seed (so that a partial study has every arm
    of them), then the larger sizes, which get the first seed only; then the variants, one after the other."""
    def few(size):
        return size is not None and size <= args.many_seeds_up_to

    def seeds(size):
        return args.seeds if few(size) else args.seeds[:1]
    main = [Run(arch, size, arm, seed, budget=budget, images=images) for small in (True, False)
            for seed in args.seeds for arch in args.networks for budget in budgets(args, arch)
            for images in args.images for size in sizes(args, arch) if few(size) == small and seed in seeds(size)
            for arm in args.arms if runs_at(arch, arm, size)
            and (images == "real" or (not ARMS[arm][2] and size is not None))]  # synthetic: label-free, at an N
    return main + [Run(arch, size, arm, seed, variant, budget) for arch in args.networks
                   for budget in budgets(args, arch)
                   for variant, variant_sizes in STUDY[arch]["variants"].items() if variant in args.variants
                   for size in variant_sizes if size in sizes(args, arch) or args.sizes is None
                   for seed in seeds(size) for arm in VARIANTS[variant][2] if arm in args.arms
                   and "real" in args.images]


def sizes(args, arch):
    """The sizes N of ``arch`` to run: ``--sizes`` (0: the full training part), else the study's."""
    return STUDY[arch]["sizes"] if args.sizes is None else [n or None for n in args.sizes]


def budgets(args, arch):
    """The budgets of ``arch`` to run (``--steps``), None standing for the study's own."""
    own = run_steps(arch, None)
    return [None] if args.steps is None else [None if steps == own else steps for steps in args.steps]


def subset_of(args, run):
    """(the subset directory of ``run``, what it draws: (source, N, seed, repeat)); ``run.size`` is not None."""
    source = synthetic_pool(args, run.arch) if run.images == "synthetic" else real_data(args, run.arch)
    times = repeat(run.arch, run.size, run.budget)
    subset = args.out / "data" / (f"{run.arch}_n{run.size}_seed{run.seed}" + (f"_x{times}" if run.budget else "")
                                  + ("" if run.images == "real" else f"_{run.images}"))
    return subset, (source, run.size, run.seed, times)


def check_kept_subsets(args, runs):
    """Exit, naming the difference, when a subset directory in ``--out`` draws other images than its run asks
    (a run made from it would be reused as if made from the images asked for): before anything is made."""
    for run in runs:
        subset, asked = subset_of(args, run) if run.size is not None else (None, None)
        if subset is None or not is_subset_dir(str(subset)):
            continue
        drawn = read_subset_dir(str(subset))
        if (os.path.realpath(drawn[0]), *drawn[1:]) != (os.path.realpath(asked[0]), *asked[1:]):
            sys.exit(f"{subset} draws N = {drawn[1]}, seed {drawn[2]}, x{drawn[3]} from {drawn[0]}; this study asks "
                     f"N = {asked[1]}, seed {asked[2]}, x{asked[3]} from {asked[0]}: give another --out, or delete "
                     f"it and the runs made from it")


def data_options(args, run):
    """The dataset directory (a subset directory made here) and --effective-train-size of ``run``."""
    if run.size is None:
        source = synthetic_pool(args, run.arch) if run.images == "synthetic" else real_data(args, run.arch)
        # Distiller takes int(size x fraction) images: half an image more keeps the rounding from losing one
        return source, f"{(images_per_epoch(run.arch, run.budget) + 0.5) / STUDY[run.arch]['train_part']:.8f}"
    subset, (source, size, seed, times) = subset_of(args, run)
    write_subset_dir(str(source), size, seed, str(subset), times)
    return subset, "1.0"


def real_data(args, arch):
    return _resolve(args.data.get(arch) or NETWORKS[arch]["data"], args.places)


def teacher(args, arch):
    return _resolve(args.teacher.get(arch) or Path("../shared/teachers") / f"{arch}_fp.pth.tar", args.places)


def pool_size(args, arch):
    """How many images the synthetic pool of ``arch`` holds: the largest N."""
    return max(n for n in sizes(args, arch) if n)


def synthetic_pool(args, arch):
    """The synthetic directory the synthetic runs of ``arch`` draw their N images from: ``pool_size`` images
    synthesized with ``synthesize_command`` (seed 0)."""
    return args.out / "data" / f"{arch}_synthetic_n{pool_size(args, arch)}"


def synthesize_command(args, arch):
    return [sys.executable, "-m", "distiller_dcq.synthesize", "--arch", arch, "--teacher", teacher(args, arch),
            "--images", str(pool_size(args, arch)), "--data", real_data(args, arch),
            "--out", synthetic_pool(args, arch), "--seed", "0", "--device", args.device] + (
               ["--set", *args.synthesis] if args.synthesis else [])


def make_synthetic_pools(args, env, say):
    """Synthesize the pool of every network with synthetic runs, unless a finished one is there (its
    synthetic.json is written last)."""
    from ..synthesize import MANIFEST
    for arch in args.networks if "synthetic" in args.images else []:
        pool = synthetic_pool(args, arch)
        if (pool / MANIFEST).exists():  # what check_kept_pools has accepted
            say(f"{arch}: synthetic images kept from {pool}")
            continue
        cmd = [str(c) for c in synthesize_command(args, arch)]
        say(f"{arch}: synthesizing {cmd[cmd.index('--images') + 1]} images: {shlex.join(cmd)}")
        # one process: on the CPU it may use the cores the runs will share
        threads = {"OMP_NUM_THREADS": str(args.jobs)} if args.device == "cpu" else {}
        done = subprocess.run(cmd + ["--force"] * pool.exists(), env={**env, **threads}, stdout=subprocess.PIPE,
                              text=True)
        if done.returncode != 0:
            sys.exit(f"synthesizing {arch}'s images failed (exit status {done.returncode}); see above")
        say(done.stdout.strip())


def synthesis_config(args):
    """The SynthesisConfig that ``--synthesis KEY=VALUE ...`` asks for (ValueError, naming the problem)."""
    from ..engine.synthesis import SynthesisConfig
    return SynthesisConfig.from_pairs(args.synthesis or [])


def check_kept_pools(args):
    """Exit, naming the difference, when a finished pool in ``--out`` was synthesized otherwise than this study
    asks (its runs would be reused, or reported, as if made from the images asked for)."""
    from ..synthesize import MANIFEST, file_sha256, read_synthetic_dir
    for arch in args.networks if "synthetic" in args.images else []:
        pool = synthetic_pool(args, arch)
        if not (pool / MANIFEST).exists():
            continue
        manifest = json.loads((pool / MANIFEST).read_text())
        there, asked = dict(manifest["config"], images=manifest["images"], seed=manifest["seed"]), dict(
            synthesis_config(args).as_dict(), images=pool_size(args, arch), seed=0)
        differs = [f"{key} {there.get(key)} there, {value} asked" for key, value in asked.items()
                   if there.get(key) != value]
        if manifest.get("teacher_sha256", file_sha256(teacher(args, arch))) != file_sha256(teacher(args, arch)):
            differs.append(f"teacher: not the bytes of {teacher(args, arch)}")
        if os.path.realpath(read_synthetic_dir(str(pool))[0]) != os.path.realpath(real_data(args, arch)):
            differs.append(f"real data {read_synthetic_dir(str(pool))[0]} there, {real_data(args, arch)} asked")
        if differs:
            sys.exit(f"{pool} was synthesized otherwise ({'; '.join(differs)}): give another --out, or delete that "
                     f"directory and the synthetic runs made from it")


def plot_synthetic_images(args):
    """synthetic_<network>.png: ten synthetic images of each class (a row per class, CIFAR-10's order)."""
    from ..synthesize import MANIFEST, save_grid
    for arch in args.networks if "synthetic" in args.images else []:
        if (synthetic_pool(args, arch) / MANIFEST).exists():
            save_grid(synthetic_pool(args, arch), args.out / f"synthetic_{arch}.png")


def command(args, run):
    study = STUDY[run.arch]
    data, train_size = data_options(args, run)
    return [sys.executable, args.script, "--arch", run.arch, data, *device_options(args.device, args.workers),
            "-b", str(study["batch"]),
            "--lr", args.lr, "--momentum", "0.9", "--wd", "0", "--epochs", str(study["epochs"]),
            "--vs", VALIDATION_SPLIT, "--effective-valid-size", args.valid_size, "--seed", str(run.seed),
            "--effective-train-size", train_size,
            "--compress", args.schedules / run.schedule, "--exp-load-weights-from", teacher(args, run.arch),
            "--out-dir", args.out / "runs" / run.name, "--name", run.name]


def recalibration_options(args, arch, budget=None):
    """distiller_dcq.recalibrate's options after --seed for a run of ``arch`` and ``budget``: the runs'
    validation split, BatchNorm statistics re-estimated on one epoch's worth of training images
    (images-per-epoch: the N images, repeated), no labels; the test top-1 before is in the run's log."""
    study = STUDY[arch]
    return ["--vs", VALIDATION_SPLIT, "--effective-valid-size", args.valid_size, "-b", str(study["batch"]),
            "--train-batches", str(images_per_epoch(arch, budget) // study["batch"]), "--skip-before",
            "--device", args.device, "--workers", str(args.workers)]


def recalibration_command(args, run, cmd):
    """distiller_dcq.recalibrate on the last checkpoint of ``run`` (whose command is ``cmd``)."""
    checkpoints = sorted((args.out / "runs" / run.name).glob(f"{run.name}___*/{run.name}_checkpoint.pth.tar"),
                         key=lambda p: p.stat().st_mtime)
    return [sys.executable, "-m", "distiller_dcq.recalibrate", cmd[cmd.index("--arch") + 2],
            checkpoints[-1] if checkpoints else "(no checkpoint)", "--arch", run.arch, "--seed", str(run.seed),
            *recalibration_options(args, run.arch, run.budget)]


def kept_recalibration(args, run, cmd):
    """What an earlier ``cmd`` (distiller_dcq.recalibrate of ``run`` as it is now) wrote, else None."""
    path, run_path = args.out / "runs" / run.name / "recalibrated.json", args.out / "runs" / run.name / "result.json"
    if not (path.exists() and path.stat().st_mtime >= run_path.stat().st_mtime):
        return None
    kept = json.loads(path.read_text())
    return kept if same_run(kept["cmd"], cmd) else None


def recalibrated(args, run, result, env, say, run_now=True):
    """``result`` with ``recalibrated`` (distiller_dcq.recalibrate's output, kept in the run's
    recalibrated.json) added, for networks with BatchNorm; ``run_now``: run it if not kept."""
    if not STUDY[run.arch]["batchnorm"] or "failed" in result:
        return result
    cmd = [str(c) for c in recalibration_command(args, run, result["cmd"])]
    kept = kept_recalibration(args, run, cmd)
    if kept is None and run_now:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            say(f"    {run.name}: re-estimating BatchNorm FAILED: {lines[-1]}")
            return {**result, "recalibrated": {"failed": lines[-1], "cmd": cmd}}
        kept = {**json.loads(done.stdout.strip().splitlines()[-1]), "cmd": cmd}
        (args.out / "runs" / run.name / "recalibrated.json").write_text(json.dumps(kept))
        say(f"    {run.name}: test top-1 {result['test_top1']} -> {kept['test_top1']} after re-estimating "
            f"BatchNorm on {kept['training_images']} training images")
    return {**result, "recalibrated": kept} if kept else result


def finished_result(args, run, cmd):
    """The result a finished run of exactly ``cmd`` left in ``--out``, else None."""
    path = args.out / "runs" / run.name / "result.json"
    result = json.loads(path.read_text()) if path.exists() else None
    return result if result and same_run(result["cmd"], cmd) else None


def _outcomes(runs, results, recalibrated=False):
    """What each of ``runs`` left: its result, or with ``recalibrated`` its BatchNorm re-estimation's ({}: none)."""
    found = [results.get(r.name, {}) for r in runs]
    return [result.get("recalibrated", {}) for result in found] if recalibrated else found


def _top1s(outcomes):
    return [outcome["test_top1"] for outcome in outcomes if outcome.get("test_top1") is not None]


def _cell(values, expected):
    if not values:
        return "-"
    text = f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
    return text + (f" ({len(values)} of {expected})" if len(values) < expected else "")


def _table(args, runs, results, arch, variant, recalibrated=False, images="real"):
    """Markdown rows: one per arm, one column per size (and budget, with several) that ``arch``'s ``variant``
    ("": the main study) has runs at on ``images``."""
    several = len(budgets(args, arch)) > 1
    runs = [r for r in runs if r.images == images]
    columns = [(size, budget) for budget in budgets(args, arch) for size in sizes(args, arch)
               if any((r.arch, r.size, r.variant, r.budget) == (arch, size, variant, budget) for r in runs)]
    arms = [arm for arm in args.arms if (not variant or arm in VARIANTS[variant][2])
            and any((r.arch, r.arm, r.variant) == (arch, arm, variant) for r in runs)]
    lines = ["| arm | " + " | ".join(f"N = {n or 'full'}" + (f", {run_steps(arch, n, b)} steps" if several else "")
                                     for n, b in columns) + " |", "|---|" + "---|" * len(columns)]
    for arm in arms:
        cells = []
        for size, budget in columns:
            planned = [r for r in runs if (r.arch, r.size, r.arm, r.variant, r.budget) ==
                       (arch, size, arm, variant, budget)]
            found = _outcomes(planned, results, recalibrated)
            cells.append("failed" if any("failed" in outcome for outcome in found)
                         else _cell(_top1s(found), len(planned)) if planned else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _recalibration_template(args, arch):
    """recalibration_options as the report shows them: BATCHES standing for --train-batches with several budgets."""
    options = recalibration_options(args, arch, budgets(args, arch)[0])
    if len(budgets(args, arch)) > 1:
        options[options.index("--train-batches") + 1] = "BATCHES"
    return shlex.join(options)


def _batches(args, arch):
    """Each budget's --train-batches, as the report lists them."""
    return ", ".join(f"{images_per_epoch(arch, b) // STUDY[arch]['batch']} for --steps {b or run_steps(arch, None)}"
                     for b in budgets(args, arch))


def images_per_epoch(arch, budget=None):
    """Training images per epoch of a run of ``arch`` with ``budget`` optimizer steps (None: the study's own):
    the schedule keeps its epochs, so its stages (the section stage, AdaRound's window) scale with the budget."""
    study = STUDY[arch]
    return study["images_per_epoch"] if budget is None else budget * study["batch"] // study["epochs"]


def repeat(arch, size, budget=None):
    """How many times per epoch each of a subset's ``size`` images is seen: about images-per-epoch in all."""
    return max(1, round(images_per_epoch(arch, budget) / size))


def run_steps(arch, size, budget=None):
    """The optimizer steps of a run on ``size`` images (None: a new random part of the training set each epoch,
    images-per-epoch of them): Distiller keeps the last, smaller batch of an epoch."""
    study = STUDY[arch]
    images = images_per_epoch(arch, budget) if size is None else size * repeat(arch, size, budget)
    return study["epochs"] * math.ceil(images / study["batch"])


def _budget(args, arch):
    study = STUDY[arch]
    text = []
    for budget in budgets(args, arch):
        per_size = ", ".join(f"{run_steps(arch, n, budget)} at N = {n}" if n else f"{run_steps(arch, n, budget)} on all"
                             for n in sizes(args, arch))
        images = images_per_epoch(arch, budget)
        text.append(f"{arch}: {study['epochs']} epochs in batches of {study['batch']}, each of N images seen "
                    f"round({images} / N) times per epoch (at least once; all: a new random part of {images} "
                    f"training images each epoch); steps: {per_size}")
    return "; ".join(text)


def write_results(args, runs, results):
    lines = ["# Few-shot and label-free binary-weight quantization: DCQ against QAT and KD", "",
             f"Made by `python -m distiller_dcq.report.fewshot {shlex.join(a for a in args.argv if a != '--report-only')}` "
             f"(commands below; `--report-only` rewrites this report from the finished runs). Test top-1 "
             f"(%, the whole test set, after the last epoch), mean ± std over seeds "
             f"{', '.join(map(str, args.seeds))} for N <= {args.many_seeds_up_to}, seed {args.seeds[0]} above; "
             f"the seed draws the N images too. Every run: Distiller's unmodified compress_classifier.py from "
             f"the same FP teacher, SGD lr {args.lr} momentum 0.9, binary weights x one "
             f"scale per layer and FP activations unless a table's title says otherwise.", "",
             "Budget, equal across the arms at each N (not across N: an epoch rounds N x repeats up to whole "
             "batches): " + "; ".join(_budget(args, arch) for arch in args.networks) + ".", "",
             f"Machine: {device_description(args.device)}, OMP_NUM_THREADS=1, {args.jobs} run(s) at a time, "
             f"{args.workers} data-loader process(es) each; CIFAR-10 is the "
             f"lossy JPEG copy (compare the arms with each other, not with published CIFAR-10 numbers).", "",
             "| arm | labels | what it is |", "|---|---|---|"]
    lines += [f"| {arm} | {'yes' if ARMS[arm][2] else 'no'} | {ARMS[arm][1]} (`schedules/<network>_{ARMS[arm][0]}.yaml`) |"
              for arm in args.arms]
    for arch in args.networks:
        real = any(r.arch == arch and r.images == "real" for r in runs)
        synthetic = any(r.arch == arch and r.images == "synthetic" for r in runs)
        lines += ["", f"## {arch}", ""] + (_table(args, runs, results, arch, "") if real else []) + [
            "", f"![{arch}](fewshot_{arch}.png)"]
        if reference_points(args, arch, False):
            lines += ["", f"The plot also draws, faded, the real-image runs of {args.reference} (an earlier study: the "
                          f"same arms, sizes and budget; its numbers are its own, not rerun here)."]
        if synthetic:
            lines += ["", f"### {arch}, synthetic images: data-free", "",
                      f"The N training images are drawn (class-balanced as the teacher labels them, with the run's "
                      f"seed) from {pool_size(args, arch)} images synthesized from the FP teacher "
                      f"alone: `{shlex.join(str(c) for c in synthesize_command(args, arch))}`; none of the "
                      f"training set is read (validation and test: the real ones). Ten of each class, as the "
                      f"teacher labels them: ![synthetic {arch}](synthetic_{arch}.png)", ""]
            lines += _table(args, runs, results, arch, "", images="synthetic")
        variants = [v for v in STUDY[arch]["variants"] if any(r.arch == arch and r.variant == v for r in runs)]
        for variant in variants:
            lines += ["", f"### {arch}, {VARIANTS[variant][1]}", ""] + _table(args, runs, results, arch, variant)
        if STUDY[arch]["batchnorm"]:
            lines += ["", f"### {arch}, after re-estimating BatchNorm", "",
                      "The same runs' last checkpoints, their BatchNorm statistics re-estimated on one epoch's "
                      "worth of their own training images (the N images, repeated, for N below images-per-epoch; "
                      "no labels, no gradients), then tested: for each run, "
                      f"`python -m distiller_dcq.recalibrate DATA {args.out / 'runs'}/NAME/NAME___*/NAME_checkpoint.pth.tar "
                      f"--arch {arch} --seed SEED {_recalibration_template(args, arch)}` "
                      "(DATA, NAME and SEED as in the run's command below"
                      + (f"; BATCHES, the run's images per epoch / batch: {_batches(args, arch)}"
                         if len(budgets(args, arch)) > 1 else "") + ").", ""]
            for variant in [""] * real + variants:
                lines += ([f"{VARIANTS[variant][1]}:", ""] if variant else []) + _table(
                    args, runs, results, arch, variant, recalibrated=True) + [""]
            if synthetic:
                lines += ["synthetic images (re-estimated on the run's synthetic images):", ""] + _table(
                    args, runs, results, arch, "", recalibrated=True, images="synthetic") + [""]
    lines += ["", "## Commands", "", "Run from the directory the study ran in; `$DISTILLER_SRC` is Distiller's "
              "source directory, `schedules/` distiller-dcq's; each subset directory is made by "
              "`python -m distiller_dcq.subsets SOURCE --size N --seed S --repeat K --out DIR`.", ""]
    lines += [f"- {r.name}: `{shlex.join(results[r.name]['cmd'])}`" for r in runs if r.name in results]
    (args.out / "results.md").write_text(portable_paths("\n".join(lines) + "\n", args.places))
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "network", "N", "images", "arm", "variant", "seed", "steps", "test_top1",
                         "test_top1_recalibrated_bn", "seconds"])
        for r in runs:
            result = results.get(r.name, {})
            again = result.get("recalibrated", {})
            writer.writerow([r.name, r.arch, r.size or "full", r.images, r.arm, r.variant or "binary", r.seed,
                             run_steps(r.arch, r.size, r.budget),
                             result.get("test_top1", result.get("failed", "")),
                             again.get("test_top1", again.get("failed", "")), round(result.get("seconds", 0))])


def reference_points(args, arch, recalibrated):
    """{arm: [(N, mean, std)]} of ``--reference``'s real-image runs of ``arch`` at this study's own budget,
    binary, for this study's arms and sizes (an earlier study, drawn beside this one's runs)."""
    if not args.reference:
        return {}
    column = "test_top1_recalibrated_bn" if recalibrated else "test_top1"
    top1s = {}
    with open(args.reference, newline="") as f:
        for row in csv.DictReader(f):
            size = None if row["N"] == "full" else int(row["N"])
            # a study from before the budget axis and synthetic images has neither column: its own budget, real
            steps = int(row["steps"]) if row.get("steps") else run_steps(arch, size)
            if (row["network"], row.get("images", "real"), row["variant"], steps) == (
                    arch, "real", "binary", run_steps(arch, size)) and row["arm"] in args.arms \
                    and size in sizes(args, arch) and _is_number(row[column]):
                top1s.setdefault(row["arm"], {}).setdefault(size, []).append(float(row[column]))
    return {arm: [(n, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                  for n, v in sorted(by_size.items(), key=lambda item: item[0] or math.inf)]
            for arm, by_size in top1s.items()}


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def plot(args, runs, results):
    """fewshot_<network>.png: test top-1 against N per arm; beside it, for networks with BatchNorm, the
    same after re-estimating the statistics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for arch in args.networks:
        study = STUDY[arch]
        full_at = study["train_part"]  # where "full" sits on the N axis
        panels = [False, True] if study["batchnorm"] else [False]
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), sharey=True, squeeze=False)
        lines = [(b, a) for b in budgets(args, arch) for a in args.arms]  # one colour each, whatever the images

        def colour(budget, arm):
            return f"C{lines.index((budget, arm)) % 10}"
        for ax, recalibrated in zip(axes[0], panels):
            for budget, images, arm in [(b, i, a) for b in budgets(args, arch) for i in args.images for a in args.arms]:
                points = []
                for size in sizes(args, arch):
                    values = _top1s(_outcomes([r for r in runs if (r.arch, r.size, r.arm, r.variant, r.budget,
                                                                   r.images) == (arch, size, arm, "", budget, images)],
                                              results, recalibrated))
                    if values:
                        points.append((size or full_at, statistics.mean(values),
                                       statistics.stdev(values) if len(values) > 1 else 0.0))
                if points:
                    xs, means, stds = zip(*points)
                    label = arm + (f", {budget or run_steps(arch, None)} steps" if args.steps else "") + (
                        "" if images == "real" else f", {images} images")
                    style = ":" if images != "real" else "-" if arm.startswith("dcq") else "--"
                    ax.errorbar(xs, means, yerr=stds, marker="o" if images == "real" else "s", capsize=3,
                                color=colour(budget, arm), label=label, linestyle=style)
            for arm, points in reference_points(args, arch, recalibrated).items():
                xs, means, stds = zip(*[(n or full_at, m, sd) for n, m, sd in points])
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, alpha=0.45, color=colour(None, arm),
                            linestyle="-" if arm.startswith("dcq") else "--",
                            label=f"{arm}, real images ({args.reference.parent.name})")
            ax.set_xscale("log")
            ax.minorticks_off()  # the sizes are the ticks
            ax.set_xticks([n or full_at for n in sizes(args, arch)],
                          [str(n) if n else f"full\n({full_at})" for n in sizes(args, arch)])
            ax.set(title=f"{arch}: binary weights" + (", BatchNorm re-estimated" if recalibrated else ""),
                   xlabel="training images N (log scale)", ylabel="test top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / f"fewshot_{arch}.png", dpi=120)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distiller-src", type=Path, required=True, help="Distiller's source directory")
    parser.add_argument("--networks", nargs="+", default=list(STUDY), choices=list(STUDY))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the variants of the binary study to run too, at the sizes STUDY gives them (default: all)")
    parser.add_argument("--sizes", nargs="+", type=int, help="the training-set sizes N to run (0: the full training "
                                                              "part; default: the study's for each network)")
    parser.add_argument("--steps", nargs="+", type=int,
                        help="budgets: optimizer steps per run (default: the study's, 300 on LeNet, 320 on ResNet-20); "
                             "a schedule keeps its epochs, each epoch budget x batch / epochs images, so its stages "
                             "(section stage, AdaRound window) scale with the budget. Every arm at an N takes the same "
                             "steps; exactly the budget when N x round(images / N) fills whole batches, more when N "
                             "is above an epoch's images (one pass an epoch): the tables say the steps taken")
    parser.add_argument("--images", nargs="+", default=["real"], choices=IMAGES,
                        help="training images: real (default), synthetic (data-free: the arms without labels, on "
                             "images synthesized from the teacher, as many as the largest N, seed 0, made first), "
                             "or both")
    parser.add_argument("--synthesis", nargs="+", metavar="KEY=VALUE",
                        help="synthesis keys for the synthetic images (python -m distiller_dcq.synthesize --set)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--many-seeds-up-to", type=int, default=2048,
                        help="sizes above this get the first seed only (default 2048)")
    parser.add_argument("--lr", default="0.01")
    parser.add_argument("--valid-size", default="0.1", help="--effective-valid-size of every run (validation is "
                                                            "only logged; the test set decides)")
    parser.add_argument("--data", nargs="*", help="NETWORK=PATH: data directory (default: ../shared/data/...)")
    parser.add_argument("--teacher", nargs="*", help="NETWORK=PATH: FP checkpoint (default: ../shared/teachers)")
    parser.add_argument("--reference", type=Path, help="an earlier study's results.csv: its real-image runs of "
                                                        "the same arms, sizes and budget are drawn in the plots too")
    parser.add_argument("--schedules", type=Path, help="a schedules directory (default: distiller-dcq's own)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each takes one core, OMP_NUM_THREADS=1; "
                                                            "on CUDA they share the GPU)")
    add_device_options(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from the runs --out already has (a study under way)")
    args = parser.parse_args(argv)
    resolve_common_args(args, parser, argv)
    for arch in args.networks:
        epochs, batch = STUDY[arch]["epochs"], STUDY[arch]["batch"]
        odd = [b for b in args.steps or [] if b < epochs or b * batch % epochs]
        if odd:
            parser.error(f"--steps {odd[0]}: {arch} trains {epochs} epochs in batches of {batch}, so a budget is a "
                         f"number of steps >= {epochs} whose images (steps x {batch}) split into {epochs} equal epochs")
    if any(n < 0 for n in args.sizes or []):
        parser.error("--sizes are numbers of training images (0: the full training part)")
    for option, values in (("--sizes", args.sizes), ("--steps", args.steps), ("--seeds", args.seeds),
                           ("--images", args.images)):
        if values and len(set(values)) < len(values):
            parser.error(f"{option} names a value twice ({' '.join(map(str, values))}): each run would be planned twice")
    try:  # the synthesis keys, checked before anything runs
        synthesis_config(args)
    except ValueError as err:
        parser.error(f"--synthesis: {err}")
    if args.reference and args.steps:
        parser.error("--reference draws an earlier study at the study's own budget: leave out --steps")
    if args.reference and not args.reference.is_file():
        parser.error(f"--reference {args.reference}: no such file (an earlier study's results.csv)")
    if "synthetic" in args.images and not any(n for arch in args.networks for n in sizes(args, arch)):
        parser.error("--images synthetic needs a size N (--sizes): the full training part is real images")
    runs = plan(args)
    env = {**with_pythonpath(args.distiller_src), "OMP_NUM_THREADS": "1"}
    results, lock, started = {}, threading.Lock(), time.time()

    def say(message):
        with lock:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    check_kept_subsets(args, runs)
    check_kept_pools(args)
    if args.report_only:  # a synthetic run whose pool is not there has not run
        runs = [r for r in runs if r.images == "real" or synthetic_pool(args, r.arch).exists()]
    else:
        make_synthetic_pools(args, env, say)
    commands = {run: command(args, run) for run in runs}  # makes the subset directories, before any run
    if args.report_only:
        results.update((run.name, recalibrated(args, run, result, env, print, run_now=False)) for run in runs
                       if (result := finished_result(args, run, commands[run])))
        print(f"{len(results)} of {len(runs)} runs finished")

    def execute(run):
        result = run_compress_classifier(commands[run], args.out / "runs" / run.name, run.name, env=env, log=say)
        result = recalibrated(args, run, result, env, say)
        with lock:
            results[run.name] = result
            done = len(results)
        say(f"{done} of {len(runs)} runs done ({run.name}: {result.get('test_top1', result.get('failed'))}); "
            f"{(time.time() - started) / 60:.0f} min so far")
        if done % args.jobs == 0:
            with lock:
                write_results(args, runs, results)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(execute, [] if args.report_only else runs))
    write_results(args, runs, results)
    plot(args, runs, results)
    plot_synthetic_images(args)
    print(f"wrote {args.out / 'results.md'}, results.csv and the plots")
    exit_if_any_failed(results, args.out / "runs")


if __name__ == "__main__":
    main()
