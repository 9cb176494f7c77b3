"""Reproduce the paper's Table 1 (DoReFa vs DCQ, binary and ternary) through compress_classifier.py.

For every network, weight kind and method it runs the schedule ``schedules/<arch>_<method>_<w>.yaml``
from the FP teacher, for every seed asked, reads Distiller's own logs, and writes into ``--out``:
``results.md`` (a table shaped like Table 1, the paper's numbers beside ours; DCQ against DoReFa over the
seeds, with their epoch-time and peak-memory ratios; every command, written so that another machine can
run it), ``results.csv`` (one row per run and epoch) and PNG plots (convergence DoReFa vs DCQ; with
``--ablations``, DCQ binary on the first network with 1/2/4 sections and with each loss). The FP teacher
is the one given (its test top-1 measured by ``--evaluate``) or, with ``--train-teachers``, trained first
by compress_classifier. Finished runs are reused unless ``--rerun``; ``--jobs N`` trains N at a time. While it
runs it prints the runs done, those in flight and their epochs, and the time left.

    python -m distiller_dcq.report.reproduce --distiller-src DISTILLER --networks simplenet_mnist \\
        --epochs 6 [--seeds 0 1 2] --out results/
"""
import argparse
import csv
import datetime
import functools
import os
import platform
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from .runs import (Progress, add_device_options, device_description, device_options, exit_if_any_failed,
                   portable_paths, resolve_device, run_compress_classifier, with_pythonpath)
from .schedules import schedules_dir, variant_schedule

SHARED = Path("../shared")  # default data and teachers, from the directory the reproduction runs in
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"
METHODS = ("dorefa", "dcq")
LOSS_NAMES = ("poisson", "kl", "mse", "l1", "cosine")

# arch -> default data directory, and the paper's Table 1 (top-1 %): FP, DoReFa (binary, ternary), DCQ (b, t)
NETWORKS = {
    "simplenet_mnist": dict(data=SHARED / "data" / "mnist", paper=(99.9, (96.7, 98.9), (99.3, 99.8))),
    "resnet20_cifar": dict(data=CIFAR_JPEG, paper=(91.4, (73.4, 83.5), (90.5, 90.8))),
    "vgg11_bn_cifar": dict(data=CIFAR_JPEG, paper=(94.1, (72.8, 82.0), (87.5, 94.0))),
    "svhn_dorefa": dict(data=None, paper=(96.5, (88.6, 91.7), (93.2, 93.9))),
}


def _pairs(values, option):
    pairs = {}
    for value in values or []:
        if "=" not in value:
            raise SystemExit(f"{option} takes NETWORK=PATH, got {value!r}")
        network, path = value.split("=", 1)
        pairs[network] = path
    return pairs


def _resolve(written, places):
    """``written`` as an absolute path; ``places`` remembers how it was written, for results.md."""
    path = Path(written).resolve()
    places.setdefault(str(path), str(written))
    return path


def run_name(label, seed):
    """A run's ``--name`` and work directory: its label, plus ``_seed<k>`` for seeds other than 0."""
    return label if seed == 0 else f"{label}_seed{seed}"


@dataclass(frozen=True)
class Run:
    """One quantization run; ``label`` names it across seeds."""
    label: str
    arch: str
    schedule: Path
    epochs: str
    train_size: str
    from_teacher: bool
    seed: int = 0

    @property
    def name(self):
        return run_name(self.label, self.seed)


def plan(args):
    """Every quantization run asked for, for every seed: Table-1 rows, from-scratch baselines, variants,
    then ablations."""
    runs = []
    for arch in args.networks:
        for w in args.weights:
            for method in METHODS:
                runs.append(Run(f"{arch}_{method}_{w}", arch, args.schedules / f"{arch}_{method}_{w}.yaml",
                                args.epochs, args.train_size, True))
        if args.scratch_baselines:
            runs += [Run(f"{arch}_dorefa_{w}_scratch", arch, args.schedules / f"{arch}_dorefa_{w}.yaml",
                         args.epochs, args.train_size, False) for w in args.weights]
        for variant in args.variants:
            schedule = args.schedules / f"{arch}_{variant}.yaml"
            if not schedule.exists():
                known = sorted(p.stem[len(arch) + 1:] for p in args.schedules.glob(f"{arch}_*.yaml"))
                raise SystemExit(f"no schedule {schedule.name} for --variants {variant}; {arch} has: {', '.join(known)}")
            runs.append(Run(f"{arch}_{variant}", arch, schedule, args.epochs, args.train_size, True))
    if args.ablations:
        arch = args.networks[0]
        source = args.schedules / f"{arch}_dcq_binary.yaml"
        budget = (args.ablation_epochs, args.ablation_train_size, True)
        variants = [(f"{arch}_dcq_binary_{k}sections", dict(num_sections=k)) for k in args.sections] + [
            (f"{arch}_dcq_binary_{loss}", dict(loss=loss)) for loss in args.losses]
        for label, changes in variants:
            schedule = variant_schedule(source, args.out / "schedules" / f"{label}.yaml", **changes)
            runs.append(Run(label, arch, schedule, *budget))
    return [replace(run, seed=seed) for seed in args.seeds for run in runs]


def _data(args, arch):
    data = args.data.get(arch) or NETWORKS[arch]["data"]
    if data is None or not Path(data).exists():
        raise SystemExit(f"no data for {arch}: give --data {arch}=PATH")
    return _resolve(data, args.places)


def command(args, arch, name, *options):
    """compress_classifier.py on ``arch`` with this reproduction's common settings plus ``options``."""
    return [sys.executable, args.script, "--arch", arch, _data(args, arch), *device_options(args.device, args.workers),
            "-b", args.batch_size, *options, "--out-dir", args.out / "runs" / name, "--name", name]


def training_options(lr, epochs, train_size, seed, wd="0"):
    return ["--lr", lr, "--momentum", "0.9", "--wd", wd, "--epochs", epochs, "--vs", "0.1", "--seed", seed,
            "--effective-train-size", train_size]


def teacher_run(args, arch):
    """(run name, command, checkpoint path or None) giving the FP teacher of ``arch`` and its test top-1:
    the given checkpoint evaluated, or a teacher trained first when ``--train-teachers`` asks for it."""
    if arch in args.teacher or not args.train_teachers:
        given = _resolve(args.teacher.get(arch) or SHARED / "teachers" / f"{arch}_fp.pth.tar", args.places)
        if not given.exists():
            raise SystemExit(f"no FP teacher for {arch} at {given}: give --teacher {arch}=PATH (a Distiller "
                             f"checkpoint) or --train-teachers to train one first")
        return f"{arch}_fp", command(args, arch, f"{arch}_fp", "--evaluate", "--exp-load-weights-from", given), given
    name = f"{arch}_fp_trained"
    options = training_options(args.teacher_lr, args.teacher_epochs, args.teacher_train_size, args.seeds[0], wd="5e-4")
    return name, command(args, arch, name, *options, "--compress", args.schedules / "fp_teacher.yaml"), None


def trained_checkpoint(args, name):
    """The last-epoch checkpoint of the compress_classifier run ``name``."""
    found = sorted((args.out / "runs" / name).glob(f"{name}___*/{name}_checkpoint.pth.tar"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"the teacher run {name} left no checkpoint under {args.out / 'runs' / name}")
    return found[-1]


def _mean_sd(values):
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def comparison(by_label):
    """Markdown rows comparing each DCQ run with the DoReFa run of the same name (``_dcq_`` -> ``_dorefa_``),
    seed by seed: test top-1, training-epoch time and peak memory."""
    rows = []
    for dcq_label, dcq in by_label.items():
        base_label = dcq_label.replace("_dcq_", "_dorefa_", 1)
        base = by_label.get(base_label) if base_label != dcq_label else None
        if not base or any("failed" in r for r in base + dcq):
            continue
        pairs = list(zip(base, dcq))
        first_epoch = statistics.mean(d["train_seconds"][0] / b["train_seconds"][0] for b, d in pairs)
        whole_run = statistics.mean(sum(d["train_seconds"]) / sum(b["train_seconds"]) for b, d in pairs)
        base_mib, dcq_mib = max(b["peak_mib"] for b in base), max(d["peak_mib"] for d in dcq)
        rows.append(f"| {dcq_label} vs {base_label} | {_mean_sd([b['test_top1'] for b in base])} | "
                    f"{_mean_sd([d['test_top1'] for d in dcq])} | "
                    f"{statistics.mean(d['test_top1'] - b['test_top1'] for b, d in pairs):+.2f} | "
                    f"{sum(d['test_top1'] > b['test_top1'] for b, d in pairs)} of {len(pairs)} | {first_epoch:.2f} | "
                    f"{whole_run:.2f} | {dcq_mib / base_mib:.2f} ({dcq_mib:.0f} / {base_mib:.0f} MiB) |")
    return rows


def write_results(args, runs, results):
    seeds = ", ".join(map(str, args.seeds))
    lines = ["# DoReFa vs DCQ (top-1 %, test set, after the last epoch)", "",
             f"Made by `python -m distiller_dcq.report.reproduce {shlex.join(args.argv)}`; every run: Distiller's "
             f"unmodified compress_classifier.py, {args.epochs} epochs from the FP teacher (DoReFa 'scratch': from "
             f"random weights), SGD lr {args.lr} momentum 0.9, batch {args.batch_size}, "
             f"seed{'s' * (len(args.seeds) > 1)} {seeds}, {float(args.train_size):.0%} of the training set per epoch"
             + (f" ({args.ablation_epochs} epochs on {float(args.ablation_train_size):.0%} of it for the ablations)"
                if args.ablations and (args.ablation_epochs, float(args.ablation_train_size)) != (
                    args.epochs, float(args.train_size)) else "") + "."
             + (" Over several seeds: mean ± standard deviation." if len(args.seeds) > 1 else ""), "",
             f"Machine: {device_description(args.device)}, Python {platform.python_version()}, "
             + (f"{args.jobs} runs at a time, OMP_NUM_THREADS=1" if args.jobs > 1 else
                f"one run at a time, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}") + "; finished "
             f"{datetime.date.today()}.", ""]
    if any(NETWORKS[a]["data"] == CIFAR_JPEG and a not in args.data for a in args.networks):
        lines += ["CIFAR-10 figures come from the lossy JPEG copy (`../shared/data/cifar10-jpeg`): compare methods "
                  "with each other, never with official CIFAR-10 results.", ""]

    by_label = {name: [results[name]] for name in args.teacher_runs.values()}
    for run in runs:
        by_label.setdefault(run.label, []).append(results[run.name])

    def top1(label):
        found = by_label.get(label, [])
        if any("failed" in r for r in found):
            return "failed"
        values = [r["test_top1"] for r in found if r.get("test_top1") is not None]
        return _mean_sd(values) if values and len(values) == len(found) else "-"

    head = ["network"] + [f"{m} {w} (ours / paper)" for w in args.weights for m in ("DoReFa", "DCQ")] + [
        "FP teacher (ours / paper)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in args.networks:
        fp, dorefa, dcq = NETWORKS[arch]["paper"]
        cells = [arch]
        for w in args.weights:
            i = ("binary", "ternary").index(w)
            cells += [f"{top1(f'{arch}_dorefa_{w}')} / {dorefa[i]}", f"{top1(f'{arch}_dcq_{w}')} / {dcq[i]}"]
        lines.append("| " + " | ".join(cells + [f"{top1(args.teacher_runs[arch])} / {fp}"]) + " |")
    table1 = {f"{a}_{m}_{w}" for a in args.networks for m in METHODS for w in args.weights}
    extra = [label for label in dict.fromkeys(run.label for run in runs) if label not in table1]
    if extra:
        lines += ["", "| other run | test top-1 |", "|---|---|"] + [f"| {label} | {top1(label)} |" for label in extra]
    compared = comparison(by_label)
    if compared:
        lines += ["", "## DCQ vs DoReFa: accuracy, training time, memory", "",
                  "| DCQ run vs DoReFa run | DoReFa | DCQ | DCQ - DoReFa | DCQ higher | epoch time DCQ/DoReFa: first "
                  "epoch | whole run | peak memory DCQ/DoReFa |", "|---|---|---|---|---|---|---|---|"] + compared + [
                  "", "Test top-1 over the seeds; the time ratios are means over the seeds of DCQ's training time "
                  "(validation excluded) over DoReFa's with the same seed, run one after the other: 'first epoch' "
                  "is a DCQ section epoch (teacher forward + section losses), 'whole run' includes the fine-tuning "
                  "epochs. Peak memory: the compress_classifier process's maximum resident memory."]
    stitched = [(run.name, results[run.name].get("stitched_top1")) for run in runs]
    stitched = [(name, values) for name, values in stitched if values]
    if stitched:
        lines += ["", "| run with a section policy | validation top-1 of the stitched network at each merge |", "|---|---|"] + [
            f"| {name} | {' / '.join(f'{v:.2f}' for v in values)} |" for name, values in stitched]
    named = list(args.teacher_runs.values()) + [run.name for run in runs]
    lines += ["", "## Commands", "", "Run from the directory the reproduction ran in; `$DISTILLER_SRC` is Distiller's "
              "source directory, `schedules/` distiller-dcq's.", ""]
    lines += [f"- {name}: `{shlex.join(results[name]['cmd'])}`" for name in named]
    (args.out / "results.md").write_text(portable_paths("\n".join(lines) + "\n", args.places))

    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "epoch", "val_top1", "train_seconds", "test_top1"])
        for name in [run.name for run in runs]:
            r = results[name]
            for epoch, val in enumerate(r.get("val_top1", [])):
                writer.writerow([name, epoch, val, round(r["train_seconds"][epoch], 1) if epoch < len(
                    r["train_seconds"]) else "", r["test_top1"] if epoch == len(r["val_top1"]) - 1 else ""])


def plot(args, results):
    """One PNG per comparison; each panel's curves are validation top-1 per epoch (of the first seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def panel(ax, title, named, first_epoch=0):
        curves = [(label, results.get(run_name(name, args.seeds[0]), {}).get("val_top1", [])[first_epoch:], style)
                  for label, name, style in named]
        curves = [curve for curve in curves if curve[1]]
        if first_epoch and curves:  # zoom on the runs ending within 5 points of the best; the others go off scale
            best = max(top1[-1] for _, top1, _ in curves)
            shown = [v for _, top1, _ in curves if top1[-1] >= best - 5 for v in top1]
            low, high = min(shown) - 0.1, max(shown) + 0.1
            ax.set_ylim(low, high)
            curves = [(label + (" (off scale)" if max(top1) < low else ""), top1, style) for label, top1, style in curves]
        for label, top1, style in curves:
            ax.plot(range(first_epoch, first_epoch + len(top1)), top1, style, marker="o", markersize=4, label=label)
        ax.set(title=title, xlabel="epoch", ylabel="validation top-1 (%)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    def figure(path, title, panels):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, spec in zip(axes[0], panels):
            panel(ax, *spec)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    for arch in args.networks:
        figure(args.out / f"convergence_{arch}.png", f"{arch}: DoReFa vs DCQ, same FP teacher and epochs",
               [(f"{w} weights", [("DCQ", f"{arch}_dcq_{w}", "-"), ("DoReFa from FP", f"{arch}_dorefa_{w}", "--"),
                                  ("DoReFa from scratch", f"{arch}_dorefa_{w}_scratch", ":")])
                for w in args.weights])
        if args.variants:  # a second panel zooms on the later epochs, which one bad run would flatten
            variants = [("dcq_binary", f"{arch}_dcq_binary", "-"), ("dorefa_binary", f"{arch}_dorefa_binary", "--")] + [
                (variant, f"{arch}_{variant}", "-") for variant in args.variants]
            later = int(args.epochs) // 2
            figure(args.out / f"variants_{arch}.png", f"{arch}: DCQ variants",
                   [("every epoch", variants), (f"from epoch {later}", variants, later)])
    if args.ablations:
        arch, later = args.networks[0], int(args.ablation_epochs) // 2
        sections = [(f"{k} section{'s' * (k > 1)}", f"{arch}_dcq_binary_{k}sections", "-") for k in args.sections]
        figure(args.out / "sections.png", f"{arch}: DCQ binary, number of sections",
               [("every epoch", sections), (f"from epoch {later}", sections, later)])
        losses = [(loss, f"{arch}_dcq_binary_{loss}", "-") for loss in args.losses]
        figure(args.out / "losses.png", f"{arch}: DCQ binary, section loss",
               [("every epoch", losses), (f"from epoch {later}", losses, later)])


def resolve_common_args(args, parser, argv):
    """What every report command does with its parsed options: paths made absolute (and remembered as
    written, for results.md), the schedules and compress_classifier.py found or a parser error."""
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.places = {str(Path.cwd()): ""}  # how results.md writes this machine's paths
    args.data, args.teacher = _pairs(args.data, "--data"), _pairs(args.teacher, "--teacher")
    args.out = _resolve(args.out, args.places)
    if args.schedules is None:
        args.schedules = schedules_dir()
        args.places[str(args.schedules)] = "schedules"
    args.schedules = _resolve(args.schedules, args.places)
    if not args.schedules.is_dir():
        parser.error(f"no schedules directory at {args.schedules}")
    args.distiller_src = args.distiller_src.resolve()
    args.script = args.distiller_src / "examples" / "classifier_compression" / "compress_classifier.py"
    if not args.script.is_file():
        parser.error(f"no {args.script.relative_to(args.distiller_src)} under --distiller-src {args.distiller_src}")
    args.places.update({str(args.distiller_src): "$DISTILLER_SRC", sys.executable: "python"})
    if args.jobs < 1:
        parser.error(f"--jobs is a number of runs at a time (>= 1), got {args.jobs}")
    try:
        args.device, args.workers = resolve_device(args.device, args.workers, args.jobs)
    except ValueError as err:
        parser.error(str(err))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distiller-src", type=Path, required=True,
                        help="Distiller's source directory; the runs import Distiller from it")
    parser.add_argument("--networks", nargs="+", default=["simplenet_mnist"], choices=list(NETWORKS))
    parser.add_argument("--weights", nargs="+", default=["binary", "ternary"], choices=["binary", "ternary"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", default="1.0", help="fraction of the training set per epoch")
    parser.add_argument("--lr", default="0.01")
    parser.add_argument("--batch-size", default="128")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="run everything once per seed (runs of seed k > 0 are named <run>_seed<k>)")
    parser.add_argument("--data", nargs="*", help="NETWORK=PATH: data directory (default: ../shared/data/...)")
    parser.add_argument("--teacher", nargs="*", help="NETWORK=PATH: FP checkpoint (default: ../shared/teachers)")
    parser.add_argument("--train-teachers", action="store_true",
                        help="train the FP teacher first (schedules/fp_teacher.yaml) for every network not given --teacher")
    parser.add_argument("--teacher-epochs", default="30")
    parser.add_argument("--teacher-lr", default="0.1")
    parser.add_argument("--teacher-train-size", default="1.0", help="training-set fraction for a teacher trained first")
    parser.add_argument("--scratch-baselines", action="store_true",
                        help="also run the DoReFa baselines from random weights")
    parser.add_argument("--variants", nargs="+", default=[], metavar="NAME",
                        help="also run schedules/<network>_NAME.yaml, e.g. dcq_binary_parallel")
    parser.add_argument("--ablations", action="store_true", help="DCQ binary with 1/2/4 sections and each loss")
    parser.add_argument("--ablation-epochs", type=int, help="epochs of each ablation run (default: --epochs)")
    parser.add_argument("--ablation-train-size", help="training-set fraction of each ablation run (default: --train-size)")
    parser.add_argument("--sections", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--losses", nargs="+", default=list(LOSS_NAMES), choices=LOSS_NAMES)
    parser.add_argument("--schedules", type=Path, help="a schedules directory (default: distiller-dcq's own)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rerun", action="store_true", help="run again what --out already has")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time after the teachers' (then each takes one core, OMP_NUM_THREADS=1; on "
                             "CUDA they share the GPU)")
    add_device_options(parser)
    args = parser.parse_args(argv)
    resolve_common_args(args, parser, argv)
    args.ablation_epochs = str(args.ablation_epochs or args.epochs)
    args.ablation_train_size = args.ablation_train_size or args.train_size
    args.epochs, args.lr, args.batch_size = str(args.epochs), str(args.lr), str(args.batch_size)
    runs = plan(args)
    twice = sorted({r.name for r in runs if sum(o.name == r.name for o in runs) > 1})
    if twice:
        parser.error(f"these runs are planned twice (a variant that is also an ablation?): {', '.join(twice)}")
    teachers = {arch: teacher_run(args, arch) for arch in args.networks}
    args.teacher_runs = {arch: name for arch, (name, _, _) in teachers.items()}
    progress = Progress([(name, 0 if given else args.teacher_epochs, args.teacher_train_size)
                         for name, _, given in teachers.values()] + [(r.name, r.epochs, r.train_size) for r in runs],
                        jobs=args.jobs)
    env = with_pythonpath(args.distiller_src)  # the runs import Distiller from --distiller-src
    # the teachers train one at a time, with every thread; with --jobs the other runs take one core each
    pool_env = {**env, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else env
    results = {}

    def run(name, cmd, env=env):
        progress.start(name)
        results[name] = run_compress_classifier(cmd, args.out / "runs" / name, name, args.rerun, env=env,
                                                log=lambda m: print(m, flush=True),
                                                on_epoch=functools.partial(progress.on_epoch, name))
        progress.finish(name)
        if "failed" in results[name] and name in args.teacher_runs.values():
            raise SystemExit(f"the FP teacher run {name} failed: {results[name]['failed']}")

    checkpoints = {}
    for arch, (name, cmd, given) in teachers.items():
        run(name, cmd)
        checkpoints[arch] = given or trained_checkpoint(args, name)
    def run_from_teacher(r):
        init = ["--exp-load-weights-from", checkpoints[r.arch]] if r.from_teacher else []
        run(r.name, command(args, r.arch, r.name, *training_options(args.lr, r.epochs, r.train_size, r.seed),
                            "--compress", r.schedule.resolve(), *init), env=pool_env)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run_from_teacher, runs))
    write_results(args, runs, results)
    plot(args, results)
    print(f"wrote {args.out / 'results.md'}, results.csv and the plots")
    exit_if_any_failed(results, args.out / "runs")


if __name__ == "__main__":
    main()
