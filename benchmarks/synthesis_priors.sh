#!/bin/sh
# How distiller_dcq.synthesize's priors were chosen: for each setting, 256 images synthesized from the FP
# ResNet-20 teacher (seed 0), then the few-shot study's DCQ AdaRound arm, no labels, on those 256 images
# (320 steps, seed 0) through compress_classifier.py; what counts is the test top-1 of the binary network.
# Writes benchmarks/results/synthesis_priors/README.md and a grid of each setting's images.
#
#   DISTILLER_SRC=... sh benchmarks/synthesis_priors.sh     (from the repository root; about 50 core-minutes;
#                                                            WORK=dir keeps the runs, and a rerun reuses them)
set -e
: "${DISTILLER_SRC:?set DISTILLER_SRC to Distiller's source directory}"
work=${WORK:-$(mktemp -d)}
out=benchmarks/results/synthesis_priors
mkdir -p "$out"
run() {  # name, then the --set keys of the setting (none: the statistics term alone)
  name=$1; shift
  [ -f "$work/$name/results.csv" ] && return  # done by an earlier call with the same WORK
  python -m distiller_dcq.report.fewshot --distiller-src "$DISTILLER_SRC" --networks resnet20_cifar \
    --arms dcq_adaround_labelfree --images synthetic --sizes 256 --variants --seeds 0 --device cpu --jobs 1 \
    --out "$work/$name" ${1:+--synthesis "$@"} > "$work/$name.log" 2>&1 || { tail -5 "$work/$name.log"; exit 1; }
}
run A_statistics &
run B_class class_weight=0.1 &
wait
run C_priors class_weight=0.1 tv_weight=0.1 l2_weight=0.01 &
run D_diversity class_weight=0.1 tv_weight=0.1 l2_weight=0.01 diversity_weight=0.1 &
wait
python - "$work" "$out" <<'PY'
import csv, json, shutil, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = ["# Synthesis priors (ResNet-20/CIFAR-10, 256 synthetic images, seed 0)", "",
         "Made by `sh benchmarks/synthesis_priors.sh`: for each setting, `python -m distiller_dcq.synthesize` (through",
         "`report.fewshot --images synthetic --sizes 256`) makes 256 images from `../shared/teachers/resnet20_cifar_fp.pth.tar`",
         "alone, 200 Adam steps (the keys not named keep their defaults, `distiller_dcq.engine.synthesis.SynthesisConfig`);",
         "then `dcq_adaround_labelfree` (DCQ, AdaRound level choices, no labels; 320 steps, seed 0) trains on them and is",
         "tested on the real CIFAR-10 test set. Statistics error: per BatchNorm layer,",
         "(||mean - running mean|| + ||std - running std||) / ||running std||, the worst layer's after the last step.", "",
         "| setting | keys | worst statistics error | images per class (teacher's prediction) | as aimed | test top-1 | BatchNorm re-estimated | synthesis (s) |",
         "|---|---|---|---|---|---|---|---|"]
for setting in sorted(p for p in work.iterdir() if p.is_dir()):
    pool = next((setting / "data").glob("resnet20_cifar_synthetic_n*"))
    manifest = json.loads((pool / "synthetic.json").read_text())
    defaults = {"class_weight": 0.0, "tv_weight": 0.0, "l2_weight": 0.0, "diversity_weight": 0.0}
    keys = ", ".join(f"{k}={v}" for k, v in manifest["config"].items() if k in defaults and v != defaults[k]) or "-"
    row = next(csv.DictReader(open(setting / "results.csv")))
    aimed = manifest["predicted_as_aimed"] if manifest["config"]["class_weight"] else None  # nothing aimed
    counts = manifest["images_per_class"]
    lines.append(f"| {setting.name} | {keys} | {manifest['statistics_error_max']:.3f} | {min(counts)}-{max(counts)} | "
                 f"{'-' if aimed is None else f'{100 * aimed:.0f}%'} | {row['test_top1']} | "
                 f"{row['test_top1_recalibrated_bn']} | {manifest['seconds']} |")
    shutil.copy(setting / "synthetic_resnet20_cifar.png", out / f"{setting.name}.png")
lines += ["", "One seed, one pool of 256 images per setting: differences of a point or two are within noise",
          "(the real-image study's seeds spread about 1 point). No prior beat the statistics term alone, so the defaults",
          "are A's (every prior's weight 0; jitter 2 and flips on): the simplest setting that did as well as any.",
          "Grids: `<setting>.png`, a row per class, the first ten images the teacher puts in it."]
(out / "README.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'README.md'}")
PY
