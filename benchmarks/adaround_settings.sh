#!/bin/sh
# How AdaRoundPolicy's lr and regularizer_weight were chosen: LeNet/MNIST, a fixed subset of N = 1000
# images (seed 0, each seen 6 times per epoch as in the few-shot study), the 50-step section stage of
# schedules/simplenet_mnist_dcq_binary_adaround_labelfree.yaml with one label-free KD epoch after it;
# what counts is the stitched network's validation top-1 at the merge, and how many choices were
# still soft when they were rounded. Writes benchmarks/results/fewshot/adaround_settings.md.
#
#   DISTILLER_SRC=... sh benchmarks/adaround_settings.sh      (from the repository root; about 6 minutes)
set -e
: "${DISTILLER_SRC:?set DISTILLER_SRC to Distiller's source directory}"
work=$(mktemp -d)
out=benchmarks/results/fewshot/adaround_settings.md
python -m distiller_dcq.subsets ../shared/data/mnist --size 1000 --seed 0 --repeat 6 --out "$work/mnist_1000"
{
  echo "# AdaRoundPolicy settings (LeNet/MNIST, N = 1000, seed 0)"
  echo
  echo "Made by \`sh benchmarks/adaround_settings.sh\`: the section stage of \`schedules/simplenet_mnist_dcq_binary_adaround_labelfree.yaml\`"
  echo "with its \`lr\` and \`regularizer_weight\` replaced, through compress_classifier.py (2 epochs, \`--seed 0\`,"
  echo "600 validation images). The same stage training the FP weights (\`simplenet_mnist_dcq_binary_mixed_labelfree.yaml\`) is the last row."
  echo
  echo "| lr | regularizer_weight | stitched validation top-1 | weights that left their direct level | choices still soft, then rounded |"
  echo "|---|---|---|---|---|"
} > "$out"
run() {  # schedule name lr weight
  sed "s/^    lr: .*/    lr: $3/; s/^    regularizer_weight: .*/    regularizer_weight: $4/" "schedules/$1.yaml" > "$work/$2.yaml"
  OMP_NUM_THREADS=1 python "$DISTILLER_SRC/examples/classifier_compression/compress_classifier.py" --arch simplenet_mnist \
    "$work/mnist_1000" --cpu -j 0 -b 128 --lr 0.01 --momentum 0.9 --wd 0 --epochs 2 --vs 0.1 --effective-valid-size 0.1 \
    --seed 0 --compress "$work/$2.yaml" --exp-load-weights-from ../shared/teachers/simplenet_mnist_fp.pth.tar \
    --out-dir "$work/runs" --name "$2" > "$work/$2.out" 2>&1 || { tail -5 "$work/$2.out"; exit 1; }
  log=$(ls "$work"/runs/"$2"___*/*.log)
  top1=$(grep -m1 "dcq: merged" "$log" | sed 's/.*Top1: //')
  left=$(grep "choices made" "$log" | sed 's/.*; \([0-9]* of [0-9]*\) quantized.*(\(.*\));.*/\1 (\2)/')
  soft=$(grep "choices made" "$log" | sed 's/.*; \([0-9]*\) choices were still soft.*/\1/')
  echo "| $3 | $4 | $top1 | ${left:--} | ${soft:--} |" >> "$out"
}
for setting in "0.01 1.0" "0.1 0.0" "0.1 0.1" "0.1 1.0" "0.1 10.0" "0.1 100.0" "0.5 1.0"; do
  set -- $setting
  run simplenet_mnist_dcq_binary_adaround_labelfree "lr$1_w$2" "$1" "$2"
done
run simplenet_mnist_dcq_binary_mixed_labelfree fp_weights "(SGD 0.01)" "-"
echo >> "$out"
choices=$(grep -h -m1 "may leave" "$work"/runs/lr0.1_w1.0___*/*.log | sed 's/.*: \([0-9]* of [0-9]*\) .*/\1/')
echo "Quantized weights with a choice (|w| < alpha): $choices. One seed, 600 validation images: differences of a point are noise." >> "$out"
rm -rf "$work"
echo "wrote $out"
