"""LeNet/MNIST: DoReFa vs DCQ, binary and ternary, through Distiller's unmodified compress_classifier.py.

Every run uses the same FP teacher, data, optimizer, batch size, learning-rate schedule and number
of epochs; only the schedule YAML (and, for the from-scratch baselines, not loading the teacher)
differs. The headline runs (DoReFa and DCQ: binary, ternary, and binary with logits KD) repeat
for every seed; the variants run with the first seed. Finished runs found in the work dir are
reused (same command), so an interrupted benchmark continues where it stopped. Runs go one after another in this one process, a DoReFa run next
to its DCQ run, so their epoch times compare side by side. Writes a markdown results file that
names the command that made it.

    python benchmarks/lenet_mnist.py --distiller-src /path/to/distiller [--epochs 6] [--seeds 0 1 2]
"""
import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from distiller_dcq.report.runs import run_compress_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@dataclass
class Run:
    name: str
    schedule: str
    from_fp: bool = True
    note: str = ""
    lr: float = 0.01
    headline: bool = False


RUNS = [
    Run("dorefa_binary", "simplenet_mnist_dorefa_binary.yaml", headline=True,
        note="Distiller's DorefaQuantizer, 1 bit"),
    Run("dcq_binary", "simplenet_mnist_dcq_binary.yaml", headline=True,
        note="parallel, 4 sections, MSE, 1 epoch; CE fine-tuning"),
    Run("dorefa_ternary", "simplenet_mnist_dorefa_ternary.yaml", headline=True,
        note="DCQQuantizer ternary, no DCQ policy"),
    Run("dcq_ternary", "simplenet_mnist_dcq_ternary.yaml", headline=True,
        note="parallel, 4 sections, MSE, 1 epoch; CE fine-tuning"),
    Run("dorefa_binary_scratch", "simplenet_mnist_dorefa_binary.yaml", from_fp=False, note="random init"),
    Run("dorefa_ternary_scratch", "simplenet_mnist_dorefa_ternary.yaml", from_fp=False, note="random init"),
    Run("dorefa_binary_lr0.03", "simplenet_mnist_dorefa_binary.yaml", lr=0.03,
        note="the baseline at a 3x learning rate, which suited it better on a 25% slice"),
    Run("dcq_binary_poisson", "simplenet_mnist_dcq_binary_poisson.yaml",
        note="as dcq_binary with the paper's Poisson loss"),
    Run("dcq_binary_paper", "simplenet_mnist_dcq_binary_paper.yaml",
        note="the paper's recipe: parallel, Poisson, sections for every epoch, merged at the end, no fine-tuning"),
    Run("dcq_binary_sequential", "simplenet_mnist_dcq_binary_sequential.yaml",
        note="sequential, 4 sections x 1 epoch, MSE; CE fine-tuning"),
    Run("dcq_binary_unscaled", "simplenet_mnist_dcq_binary_unscaled.yaml",
        note="as dcq_binary with bare {-1,+1} weights (no per-layer scale)"),
    Run("kd_binary_whole_net", "simplenet_mnist_kd_binary_whole_net.yaml",
        note="ablation: 1 section (Poisson on the teacher's probabilities + labels) for every epoch"),
    Run("dorefa_binary_kd", "simplenet_mnist_dorefa_binary_kd.yaml", headline=True,
        note="baseline + Hinton KD from the same teacher (KL T=4 + labels), no sections"),
    Run("dcq_binary_kd", "simplenet_mnist_dcq_binary_kd.yaml", headline=True,
        note="parallel, 4 sections, MSE, 1 epoch; then KD fine-tuning (KL T=4 + labels)"),
]

# (row label, baseline run, DCQ run, paper's (DoReFa, DCQ) or None)
PAIRS = [("binary", "dorefa_binary", "dcq_binary", (96.7, 99.3)),
         ("ternary", "dorefa_ternary", "dcq_ternary", (98.9, 99.8)),
         ("binary, both with logits KD", "dorefa_binary_kd", "dcq_binary_kd", None)]



def compress_classifier_command(args, run, seed, out_dir):
    cmd = [sys.executable, str(args.distiller_src.resolve() / "examples" / "classifier_compression" / "compress_classifier.py"),
           "--arch", "simplenet_mnist", str(args.mnist), "--cpu", "-j", "0", "-b", "128", "--lr", str(run.lr),
           "--momentum", "0.9", "--wd", "0", "--epochs", str(args.epochs), "--vs", "0.1", "--seed", str(seed),
           "--compress", str(ROOT / "schedules" / run.schedule), "--out-dir", str(out_dir), "--name", f"{run.name}_seed{seed}"]
    if run.from_fp:
        cmd += ["--exp-load-weights-from", str(args.teacher)]
    return cmd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distiller-src", type=Path, default=os.environ.get("DISTILLER_SRC"),
                        help="Distiller's source directory (default: $DISTILLER_SRC)")
    parser.add_argument("--mnist", type=Path, default=SHARED / "data" / "mnist")
    parser.add_argument("--teacher", type=Path, default=SHARED / "teachers" / "simplenet_mnist_fp.pth.tar")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", help="run only these names: " + ", ".join(r.name for r in RUNS))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/distiller_dcq_lenet_runs"),
                        help="logs and per-run results; finished runs found here are reused")
    parser.add_argument("--rerun", action="store_true", help="run again even what the work dir has finished")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "lenet_mnist.md")
    parser.add_argument("--note", default="", help="a remark for the results file (e.g. on the machine's load)")
    args = parser.parse_args()
    args.mnist, args.teacher, args.work_dir = args.mnist.resolve(), args.teacher.resolve(), args.work_dir.resolve()
    if args.distiller_src is None:
        parser.error("give --distiller-src (or set DISTILLER_SRC) to Distiller's source directory")
    runs = [r for r in RUNS if not args.only or r.name in args.only]

    results = {}  # (run name, seed) -> measurements, or {"failed": message}
    for seed in args.seeds:
        for run in runs:
            if run.headline or seed == args.seeds[0]:
                results[run.name, seed] = measure(args, run, seed)
    write_results(args, runs, results)
    print(f"wrote {args.results}")


def measure(args, run, seed):
    """One configuration and seed, or its finished result from the work dir (unless --rerun)."""
    name = f"{run.name}_seed{seed}"
    return run_compress_classifier(compress_classifier_command(args, run, seed, args.work_dir / name),
                                   args.work_dir / name, name, args.rerun, log=lambda m: print(m, flush=True))


def _mean_sd(values):
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def write_results(args, runs, results):
    seeds = args.seeds
    lines = [
        "# LeNet/MNIST: DoReFa vs DCQ (binary and ternary weights)", "",
        f"Made by `python benchmarks/lenet_mnist.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` on "
        f"{datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPUs, CPU only, Python "
        f"{platform.python_version()}, torch {_torch_version()}). Runs were sequential in that one process.",
        "",
        f"Every run: Distiller's unmodified `compress_classifier.py`, `simplenet_mnist`, full MNIST (54,000 train / "
        f"6,000 validation / 10,000 test), {args.epochs} epochs, SGD lr 0.01 (unless named) momentum 0.9, no "
        f"weight decay, ExponentialLR gamma 0.6 (in the YAML), batch 128; from the FP teacher "
        f"`{args.teacher.name}` (test top-1 99.42) unless marked scratch. Test top-1 is measured once, on the "
        f"network after the last epoch. Seeds: {', '.join(map(str, seeds))} (`--seed`, which also draws the "
        f"validation split).", ""] + ([f"**Note:** {args.note}", ""] if args.note else [])

    ok = {k: v for k, v in results.items() if "failed" not in v}
    pairs = [p for p in PAIRS if all((run, s) in ok for run in p[1:3] for s in seeds)]
    if pairs:
        lines += ["## DCQ vs DoReFa (same teacher, same epochs, same seeds)", "",
                  "| weights | DoReFa test top-1 | DCQ test top-1 | DCQ - DoReFa | DCQ wins | paper DoReFa / DCQ | "
                  "epoch time DCQ/DoReFa: section epoch | whole run | peak RSS MiB DoReFa / DCQ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, base_name, dcq_name, paper in pairs:
            base = [ok[base_name, s] for s in seeds]
            dcq = [ok[dcq_name, s] for s in seeds]
            stage = statistics.mean(d["train_seconds"][0] / b["train_seconds"][0] for b, d in zip(base, dcq))
            whole = statistics.mean(sum(d["train_seconds"]) / sum(b["train_seconds"]) for b, d in zip(base, dcq))
            wins = sum(d["test_top1"] > b["test_top1"] for b, d in zip(base, dcq))
            diff = [d["test_top1"] - b["test_top1"] for b, d in zip(base, dcq)]
            lines.append(
                f"| {label} (`{base_name}` vs `{dcq_name}`) | {_mean_sd([b['test_top1'] for b in base])} | "
                f"{_mean_sd([d['test_top1'] for d in dcq])} | {statistics.mean(diff):+.2f} | {wins} of {len(seeds)} | "
                f"{' / '.join(map(str, paper)) if paper else '-'} | {stage:.2f} | {whole:.2f} | "
                f"{max(b['peak_mib'] for b in base):.0f} / {max(d['peak_mib'] for d in dcq):.0f} |")
        lines += ["", "Mean ± standard deviation over seeds. Epoch-time ratios compare training epochs (validation "
                  "excluded) of the DCQ and baseline runs of the same seed, run back to back: 'section epoch' is "
                  "DCQ's epoch 0 (teacher forward + section losses) over the baseline's epoch 0; 'whole run' "
                  "includes the fine-tuning epochs. Peak RSS is the compress_classifier process's maximum resident "
                  "memory.", ""]

    lines += ["## Every run", "",
              "| run | seed | init | test top-1 | val top-1 per epoch | stitched val top-1 at merge | "
              "train s/epoch | peak RSS MiB | schedule |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for seed in seeds:
            if (run.name, seed) not in results:
                continue
            r = results[run.name, seed]
            head = f"| {run.name} | {seed} | {'FP' if run.from_fp else 'scratch'} |"
            if "failed" in r:
                lines.append(f"{head} failed: {r['failed']} | | | | | `{run.schedule}` |")
                continue
            lines.append(f"{head} **{r['test_top1']:.2f}** | {' / '.join(f'{v:.2f}' for v in r['val_top1'])} | "
                         f"{', '.join(f'{v:.2f}' for v in r['stitched_top1']) or '-'} | "
                         f"{' / '.join(f'{v:.0f}' for v in r['train_seconds'])} | {r['peak_mib']:.0f} | "
                         f"`{run.schedule}` |")
    lines += ["", "What the runs are: " + "; ".join(f"**{r.name}**: {r.note}" for r in runs) + ".", ""]
    lines += ["## Commands (seed " + str(seeds[0]) + ")", ""]
    lines += [f"- {run.name}: `{' '.join(shlex.quote(str(c)) for c in results[run.name, seeds[0]]['cmd'])}`"
              for run in runs if (run.name, seeds[0]) in results]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")


def _torch_version():
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
