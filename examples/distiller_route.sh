#!/usr/bin/env bash
# The Distiller route: DCQ and its DoReFa baseline, binary LeNet on MNIST from the same FP teacher,
# each through Distiller's own, unmodified compress_classifier.py with a schedule from schedules/.
#
#   examples/distiller_route.sh DISTILLER_SRC [OUT_DIR]
#
# DISTILLER_SRC: Distiller's source directory (holding examples/classifier_compression/); it is put
# on PYTHONPATH. distiller-dcq must be installed (pip install . from this repository) in the Python
# that runs this. OUT_DIR (default ./distiller_route_out) gets one log and one run folder per method.
# Short by default; the schedules' own recipe is EPOCHS=6 TRAIN_SIZE=1. Settings from the environment:
#   EPOCHS      training epochs (default 2: DCQ's section epoch, then one fine-tuning epoch)
#   TRAIN_SIZE  fraction of the training set used per epoch (default 0.2)
#   PYTHON      the interpreter (default python)
#   MNIST_DIR, TEACHER   default ../shared/data/mnist and ../shared/teachers/simplenet_mnist_fp.pth.tar
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

[ $# -ge 1 ] && [ -n "$1" ] || die "no DISTILLER_SRC given
usage: $0 DISTILLER_SRC [OUT_DIR]   (DISTILLER_SRC: Distiller's source directory)"
[ -d "$1" ] || die "DISTILLER_SRC $1 is not a directory"
DISTILLER_SRC=$(cd "$1" && pwd)
SCRIPT=$DISTILLER_SRC/examples/classifier_compression/compress_classifier.py
[ -f "$SCRIPT" ] || die "no compress_classifier.py at $SCRIPT: DISTILLER_SRC must be Distiller's source directory"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${DCQ_SHARED_DIR:-$REPO/../shared}
MNIST_DIR=${MNIST_DIR:-$SHARED/data/mnist}
TEACHER=${TEACHER:-$SHARED/teachers/simplenet_mnist_fp.pth.tar}
EPOCHS=${EPOCHS:-2}
TRAIN_SIZE=${TRAIN_SIZE:-0.2}
PYTHON=${PYTHON:-python}
[ -d "$MNIST_DIR/MNIST/raw" ] || die "no MNIST at $MNIST_DIR (torchvision's layout MNIST/raw/*-ubyte): set MNIST_DIR"
[ -f "$TEACHER" ] || die "no FP teacher checkpoint at $TEACHER: set TEACHER"
mkdir -p "${2:-distiller_route_out}"
OUT_DIR=$(cd "${2:-distiller_route_out}" && pwd)
export PYTHONPATH=$DISTILLER_SRC${PYTHONPATH:+:$PYTHONPATH}

# checked from OUT_DIR, not from here: a checkout in the current directory would import but is not installed
cd "$OUT_DIR"
"$PYTHON" -c "import distiller_dcq" 2>/dev/null \
  || die "distiller_dcq is not installed in $(command -v "$PYTHON"): run 'pip install .' in $REPO"
"$PYTHON" -c "
import sys
try:
    import distiller.config
except Exception as err:
    sys.exit(f'error: Distiller does not import from $DISTILLER_SRC: {err!r}')
if 'DCQQuantizer' not in vars(distiller.config):
    sys.exit('error: Distiller does not see DCQ: install distiller-dcq with pip install . (an editable install '
             'ships no distiller_dcq.pth) and leave DISTILLER_DCQ_NO_AUTOLOAD unset; README, How Distiller finds DCQ')
" || exit 2

run() {  # NAME: runs schedules/simplenet_mnist_NAME.yaml, prints the test Top1 line
  local name=$1 log=$OUT_DIR/$1.log
  echo "running $name ($EPOCHS epochs x $TRAIN_SIZE of the training set); log: $log"
  mkdir -p "$OUT_DIR/$name"
  # cwd: the run folder (Distiller writes latest_log_* links into its working directory)
  (cd "$OUT_DIR/$name" && "$PYTHON" "$SCRIPT" --arch simplenet_mnist "$MNIST_DIR" --cpu -j 0 -b 128 \
      --lr 0.01 --momentum 0.9 --wd 0 --epochs "$EPOCHS" --vs 0.1 --seed 0 --effective-train-size "$TRAIN_SIZE" \
      --compress "$REPO/schedules/simplenet_mnist_$name.yaml" --exp-load-weights-from "$TEACHER" \
      --out-dir "$OUT_DIR/$name" --name "$name") > "$log" 2>&1 \
    || { tail -n 20 "$log" >&2; die "compress_classifier.py failed on $name (log: $log)"; }
  grep -h "stitched network validation Top1" "$log" || true
}

run dorefa_binary
run dcq_binary
echo
echo "final test Top1 (the whole test set, after the last epoch):"
for name in dorefa_binary dcq_binary; do
  line=$(awk '/--- test ---/ {test = 1} test && /==> Top1/ {print; exit}' "$OUT_DIR/$name.log")
  [ -n "$line" ] || die "no test result in $OUT_DIR/$name.log"
  printf '%-14s %s\n' "$name" "$line"
done
