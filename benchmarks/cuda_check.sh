#!/usr/bin/env bash
# The prepared CUDA check: on a machine with one NVIDIA GPU and no network, in under eight minutes,
# install what the machine lacks from carried files, run the engine tests with CUDA required, and train
# DCQ vs DoReFa binary, and the few-shot study's best DCQ arm vs its best baseline, on the GPU through
# Distiller's unmodified compress_classifier.py.
#
#   benchmarks/cuda/stage.sh /path/to/distiller   # here, once: fills the git-ignored .device/ (< 64 MiB)
#   bash benchmarks/cuda_check.sh                   # there, from the repository root, with .device carried
#
# 1. No CUDA GPU (nvidia-smi lists none, or python3's torch sees none): one line saying so, exit 2, before
#    anything is installed.
# 2. Installs .device/wheels (Distiller's dependencies missing from the GPU image) and this package, a
#    regular install from the working tree, so that distiller_dcq.pth lands in site-packages.
# 3. Unpacks MNIST, the CIFAR-10 JPEG subset and the FP teachers into the work dir.
# 4. pytest: tests/test_engine_on_device.py (CUDA vs CPU; DCQ_REQUIRE_CUDA=1 so nothing skips for want of
#    a GPU) and the engine tests.
# 5. LeNet/MNIST (full) and ResNet-20/CIFAR-10 subset, DCQ vs DoReFa binary, each from its FP teacher, with
#    the command lines of the schedules' headers; then ResNet-20 on 512 fixed training images, DCQ with
#    AdaRound level choices vs KD, both without labels, 10 epochs each, and BatchNorm re-estimation of
#    both on the GPU (benchmarks/cuda/run_checks.py).
# 6. $OUT/cuda_check.md (test top-1, seconds per training epoch, GPU, torch/CUDA versions), cuda_check.json,
#    cuda_check_console.txt, cuda_check_logs.tar.gz. Exit 0 only if the tests and every run passed.
#
# CUDA_CHECK_STUDY=fewshot_budget: after steps 1-3, instead of the tests and the runs, the few-shot budget study
# (issue #20) on the GPU: python -m distiller_dcq.report.fewshot --device cuda on ResNet-20 with STUDY_ARMS
# (kd_labelfree dorefa_kd dcq_adaround_labelfree dcq_adaround_lowlr_labelfree), STUDY_SIZES (1024: N = 512 at
# 1280 steps is measured on the CPU, benchmarks/results/fewshot_budget_seeds), STUDY_STEPS (1280; 5120 is four
# times the GPU time), STUDY_VARIANTS (none; ternary: the same arms with ternary weights, at N = 512 only, so
# STUDY_SIZES defaults to 512 and the binary runs at N = 512 run beside them, 24 runs with three seeds; STUDY_SEEDS=0
# makes it 8), STUDY_SEEDS (0 1 2), STUDY_JOBS (8) runs at a time sharing the GPU, cut at the budget (12 runs of
# 1280 steps: give it CUDA_CHECK_BUDGET_S=520 and a device call of 9 minutes); its report, CSV, plots and every run's
# result.json, log and re-estimation to $OUT/fewshot_budget. Stage the whole CIFAR-10 copy for it (30 MiB):
# CIFAR_TRAIN_PER_CLASS=5000 CIFAR_TEST_PER_CLASS=1000 benchmarks/cuda/stage.sh DISTILLER_SRC. VGG-11-BN is not
# staged: its FP teacher (35 MiB) and the CIFAR-10 copy exceed what a device call carries (64 MiB).
# CUDA_CHECK_STUDY=datafree: the same, for data-free quantization (issue #22): the label-free arms STUDY_ARMS
# (kd_labelfree dcq_mixed_labelfree dcq_adaround_labelfree) on STUDY_IMAGES (real synthetic) at STUDY_SIZES
# (512 2048), the synthetic images made on the GPU first; to $OUT/datafree (36 runs: give it
# CUDA_CHECK_BUDGET_S=520 and a device call of 9 minutes; the CPU dry run takes 10 steps, 32 images).
# Settings (environment): OUT (default WORK/out); CUDA_CHECK_WORK (a new /tmp dir); CUDA_CHECK_STAGE
# (.device); DISTILLER_SRC (STAGE/distiller); CUDA_CHECK_PYTHON (python3); CUDA_CHECK_BUDGET_S (450:
# seconds from the start by which the tests and runs must have ended); CUDA_CHECK_LENET_EPOCHS (2);
# CUDA_CHECK_RESNET_EPOCHS (5: ResNet-20's DCQ schedule trains its 4 sections one epoch each, then
# fine-tunes; with fewer epochs a copy of it with a shorter window runs); CUDA_CHECK_WORKERS (8).
# CUDA_CHECK_DRY_RUN_ON_CPU=1: the same steps on the CPU with tiny budgets and no pip install (unless
# CUDA_CHECK_INSTALL=1), to test the plumbing on a machine without a GPU.
set -euo pipefail

START=$(date +%s)
say() { printf '[cuda_check %4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf 'cuda_check: %s\n' "$1" >&2; exit "${2:-1}"; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${CUDA_CHECK_PYTHON:-python3}
DRY=${CUDA_CHECK_DRY_RUN_ON_CPU:-0}
DRY_HINT="for a CPU dry run of the plumbing: CUDA_CHECK_DRY_RUN_ON_CPU=1 bash benchmarks/cuda_check.sh"
STUDY=${CUDA_CHECK_STUDY:-}
case "$STUDY" in ""|fewshot_budget|datafree) ;; *) die "CUDA_CHECK_STUDY=$STUDY: fewshot_budget or datafree" 2 ;; esac

# --- 1. a CUDA GPU, or stop here ----------------------------------------------------------------------------
if [ "$DRY" != 1 ]; then
  if ! command -v nvidia-smi > /dev/null 2>&1; then
    die "no CUDA GPU found (nvidia-smi is not on PATH); nothing was installed; $DRY_HINT" 2
  fi
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n 1) || GPU=
  [ -n "$GPU" ] || die "no CUDA GPU found (nvidia-smi lists none); nothing was installed; $DRY_HINT" 2
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' > /dev/null 2>&1 ||
    die "no CUDA GPU found by $PY's torch (nvidia-smi lists: $GPU); nothing was installed; $DRY_HINT" 2
  DEVICE=cuda
  say "GPU: $GPU"
else
  DEVICE=cpu
  say "CPU dry run: the steps of the GPU check with tiny budgets (CUDA_CHECK_DRY_RUN_ON_CPU=1)"
fi

STAGE=$(cd "${CUDA_CHECK_STAGE:-$REPO/.device}" 2> /dev/null && pwd) ||
  die "no staging folder ${CUDA_CHECK_STAGE:-$REPO/.device}: run benchmarks/cuda/stage.sh DISTILLER_SRC here, carry .device"
DISTILLER_SRC=$(cd "${DISTILLER_SRC:-$STAGE/distiller}" 2> /dev/null && pwd) || die "no Distiller at ${DISTILLER_SRC:-$STAGE/distiller}"
for f in "$DISTILLER_SRC/distiller/__init__.py" "$DISTILLER_SRC/examples/classifier_compression/compress_classifier.py" \
         "$STAGE/data/mnist/train-images-idx3-ubyte.gz" "$STAGE/data/cifar10-jpeg-subset.tar.gz" \
         "$STAGE/teachers/simplenet_mnist_fp.pth.tar" "$STAGE/teachers/resnet20_cifar_fp.pth.tar"; do
  [ -f "$f" ] || die "$f is missing: run benchmarks/cuda/stage.sh DISTILLER_SRC here and carry .device"
done
WORK=${CUDA_CHECK_WORK:-$(mktemp -d /tmp/cuda_check.XXXXXX)}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK/logs" "$OUT"
WORK=$(cd "$WORK" && pwd); OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/cuda_check_console.txt") 2>&1

finish() {  # every log (not the checkpoints) into one file under $OUT, also when a step failed
  local rc=$?
  (cd "$WORK" && tar --exclude='*.pth.tar' -czf "$OUT/cuda_check_logs.tar.gz" logs $(ls -d runs schedules 2> /dev/null)) ||
    true
  say "logs: $OUT/cuda_check_logs.tar.gz$([ -f "$OUT/cuda_check.md" ] && echo "; report: $OUT/cuda_check.md")"
  exit $rc
}
trap finish EXIT
say "repo $REPO; stage $STAGE; Distiller $DISTILLER_SRC; work $WORK; results $OUT"

export GIT_PYTHON_REFRESH=quiet  # Distiller imports GitPython, which otherwise refuses to load without git
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  LENET_EPOCHS=${CUDA_CHECK_LENET_EPOCHS:-2}; RESNET_EPOCHS=${CUDA_CHECK_RESNET_EPOCHS:-2}
  WORKERS=${CUDA_CHECK_WORKERS:-0}; INSTALL=${CUDA_CHECK_INSTALL:-0}
  EXTRA="--effective-train-size 0.02 --effective-valid-size 0.1 --effective-test-size 0.05"
  FEW_SHOT="--few-shot-images 40 --few-shot-repeat 1"
else
  LENET_EPOCHS=${CUDA_CHECK_LENET_EPOCHS:-2}; RESNET_EPOCHS=${CUDA_CHECK_RESNET_EPOCHS:-5}
  WORKERS=${CUDA_CHECK_WORKERS:-8}; INSTALL=1; EXTRA=""; FEW_SHOT=""
fi
PKG_PATH=; [ "$INSTALL" = 1 ] || PKG_PATH=$REPO  # without the install: the checkout's distiller_dcq
DEADLINE=$(( START + ${CUDA_CHECK_BUDGET_S:-450} ))
PROBLEMS=()

# --- 2. installs ------------------------------------------------------------------------------------------------
if [ "$INSTALL" = 1 ]; then
  say "installing $(ls "$STAGE"/wheels/*.whl | wc -l) carried wheels into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$STAGE"/wheels/*.whl 2>&1 |
    tee "$WORK/logs/install.txt" || die "installing the carried wheels failed (pip's message above)"
  say "installing distiller-dcq from the working tree (a regular install: distiller_dcq.pth goes to site-packages)"
  mkdir -p "$WORK/src"  # a clean copy, so that the build writes nothing into the checkout
  tar -C "$REPO" --exclude=./.device --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
    -cf - . | tar -C "$WORK/src" -xf -
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --force-reinstall "$WORK/src" 2>&1 |
    tee -a "$WORK/logs/install.txt" || die "installing distiller-dcq failed (pip's message above)"
else
  say "no pip install (dry run); distiller_dcq from $PKG_PATH"
fi
AUTOLOAD=$(cd / && PYTHONPATH=$PKG_PATH "$PY" -c \
  "import sys; m = sys.modules.get('distiller_dcq'); print(m.__file__ if m else 'NOT LOADED')") ||
  AUTOLOAD="NOT LOADED: $PY fails to start (message above)"
say "distiller_dcq loaded at interpreter start: $AUTOLOAD"
[[ $AUTOLOAD != "NOT LOADED"* ]] || PROBLEMS+=("distiller_dcq.pth did not load the package")
if (cd "$DISTILLER_SRC/examples/classifier_compression" && PYTHONPATH=${PKG_PATH:+$PKG_PATH:}$DISTILLER_SRC "$PY" -c "
import compress_classifier, distiller, distiller.config as config
missing = [c for c in ('DCQQuantizer', 'SectionalKDPolicy') if not hasattr(config, c)]
assert not missing, f'distiller.config lacks {missing}'
print('Distiller and compress_classifier import; distiller.config has DCQQuantizer and SectionalKDPolicy')
") > "$WORK/logs/imports.txt" 2>&1; then
  say "$(tail -n 1 "$WORK/logs/imports.txt")"
else
  say "Distiller does not import: $(tail -n 1 "$WORK/logs/imports.txt")"
  PROBLEMS+=("Distiller does not import")
fi

# --- 3. data and teachers ----------------------------------------------------------------------------------------
SHARED=$WORK/shared
say "unpacking MNIST, the CIFAR-10 JPEG subset and the teachers into $SHARED"
mkdir -p "$SHARED/data/mnist/MNIST/raw" "$SHARED/data/cifar10-jpeg" "$SHARED/teachers"
for gz in "$STAGE"/data/mnist/*.gz; do
  gunzip -c "$gz" > "$SHARED/data/mnist/MNIST/raw/$(basename "$gz" .gz)"
done
tar -xzf "$STAGE/data/cifar10-jpeg-subset.tar.gz" -C "$SHARED/data/cifar10-jpeg"
cp "$STAGE"/teachers/*.pth.tar "$SHARED/teachers/"
say "CIFAR-10 subset: $(find "$SHARED/data/cifar10-jpeg/train" -name '*.jpg' | wc -l) train," \
    "$(find "$SHARED/data/cifar10-jpeg/test" -name '*.jpg' | wc -l) test images"

# --- the few-shot budget study instead of 4-6, when asked -----------------------------------------------------------
if [ -n "$STUDY" ]; then
  STUDY_OUT=$OUT/$STUDY
  EXTRA=(); VARIANTS=${STUDY_VARIANTS:-}
  if [ "$STUDY" = datafree ]; then  # issue #22: the label-free arms on synthetic images, beside real ones
    if [ "$DRY" = 1 ]; then
      SIZES=${STUDY_SIZES:-32}; SEEDS=${STUDY_SEEDS:-0}; JOBS=${STUDY_JOBS:-2}; ARMS=${STUDY_ARMS:-kd_labelfree}
      VALID=0.02; EXTRA=(--steps 10 --synthesis iterations=3 batch_size=16)
    else
      SIZES=${STUDY_SIZES:-512 2048}; SEEDS=${STUDY_SEEDS:-0 1 2}; JOBS=${STUDY_JOBS:-8}; VALID=0.1
      ARMS=${STUDY_ARMS:-kd_labelfree dcq_mixed_labelfree dcq_adaround_labelfree}
    fi
    EXTRA+=(--images ${STUDY_IMAGES:-real synthetic})
  elif [ "$DRY" = 1 ]; then  # the plumbing only: the smallest budget the schedules allow, a few images
    SIZES=${STUDY_SIZES:-40}; SEEDS=${STUDY_SEEDS:-0}; JOBS=${STUDY_JOBS:-2}; VALID=0.02
    ARMS=${STUDY_ARMS:-kd_labelfree dcq_adaround_whole_labelfree}; EXTRA=(--steps ${STUDY_STEPS:-10})
  else
    SIZES=${STUDY_SIZES:-$([ -n "$VARIANTS" ] && echo 512 || echo 1024)}  # the ternary variant runs at N = 512 only
    SEEDS=${STUDY_SEEDS:-0 1 2}; JOBS=${STUDY_JOBS:-8}; VALID=0.1
    ARMS=${STUDY_ARMS:-kd_labelfree dorefa_kd dcq_adaround_labelfree dcq_adaround_lowlr_labelfree}
    EXTRA=(--steps ${STUDY_STEPS:-1280})
  fi
  LIMIT=$(( DEADLINE - $(date +%s) - 20 ))
  say "$STUDY study on $DEVICE for at most $LIMIT s: ${VARIANTS:+$VARIANTS, }${EXTRA[*]}, N $SIZES, seeds $SEEDS, $JOBS at a time"
  set +e
  (cd "$WORK" && PYTHONPATH=${PKG_PATH:+$PKG_PATH:}$DISTILLER_SRC timeout "$LIMIT" "$PY" -m distiller_dcq.report.fewshot \
    --distiller-src "$DISTILLER_SRC" --device "$DEVICE" --jobs "$JOBS" --networks resnet20_cifar --arms $ARMS \
    --variants $VARIANTS --sizes $SIZES "${EXTRA[@]}" --seeds $SEEDS --valid-size $VALID \
    --data "resnet20_cifar=$SHARED/data/cifar10-jpeg" --teacher "resnet20_cifar=$SHARED/teachers/resnet20_cifar_fp.pth.tar" \
    --out "$WORK/$STUDY") 2>&1 | tee "$WORK/logs/$STUDY.txt"
  STUDY_RC=${PIPESTATUS[0]}
  set -e
  mkdir -p "$STUDY_OUT"
  (cd "$WORK/$STUDY" && cp results.md results.csv ./*.png "$STUDY_OUT/" 2> /dev/null;
   find runs -name 'result.json' -o -name 'recalibrated.json' -o -name '*.log' | tar -czf "$STUDY_OUT/runs.tar.gz" -T -) ||
    true
  say "$STUDY study: exit $STUDY_RC ($([ "$STUDY_RC" = 124 ] && echo 'cut at the budget; ')finished runs in" \
      "$STUDY_OUT)"
  [ "$STUDY_RC" = 0 ] || [ "$STUDY_RC" = 124 ] || exit 1
  exit 0
fi

# --- 4. tests -------------------------------------------------------------------------------------------------------
TESTS="tests/test_engine_on_device.py tests/test_sections.py tests/test_losses.py tests/test_quantizers.py tests/test_rounding.py tests/test_autoload.py"
REQUIRE_CUDA=0; [ "$DEVICE" = cuda ] && REQUIRE_CUDA=1
TEST_LIMIT=$(( DEADLINE - $(date +%s) - 120 )); [ $TEST_LIMIT -le 180 ] || TEST_LIMIT=180
[ $TEST_LIMIT -ge 30 ] || TEST_LIMIT=30
say "pytest (DCQ_REQUIRE_CUDA=$REQUIRE_CUDA, at most ${TEST_LIMIT} s): $TESTS"
set +e
(cd "$REPO" && DCQ_SHARED_DIR=$SHARED DCQ_REQUIRE_CUDA=$REQUIRE_CUDA PYTHONPATH=$PKG_PATH \
  timeout "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rs $TESTS) 2>&1 | tee "$WORK/logs/pytest.txt"
TESTS_RC=${PIPESTATUS[0]}
set -e
TESTS_SUMMARY=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$WORK/logs/pytest.txt" | tail -n 1 | tr -d '=' |
  sed 's/^ *//; s/ *$//') || TESTS_SUMMARY="no summary"
[ "$TESTS_RC" = 124 ] && TESTS_SUMMARY="timed out after $TEST_LIMIT s; $TESTS_SUMMARY"
[ "$TESTS_RC" = 0 ] || PROBLEMS+=("tests: exit $TESTS_RC")
say "tests: $TESTS_SUMMARY (exit $TESTS_RC)"
TESTS_CMD="pytest $TESTS" TESTS_SUMMARY=$TESTS_SUMMARY TESTS_RC=$TESTS_RC "$PY" -c '
import json, os, sys
json.dump({"command": os.environ["TESTS_CMD"], "summary": os.environ["TESTS_SUMMARY"], "rc": int(os.environ["TESTS_RC"])},
          open(sys.argv[1], "w"))' "$WORK/tests.json"

# --- 5. training through compress_classifier.py ----------------------------------------------------------------------
say "DCQ vs DoReFa binary through compress_classifier.py on $DEVICE: LeNet $LENET_EPOCHS epochs," \
    "ResNet-20 $RESNET_EPOCHS epochs; all done by $(( DEADLINE - START )) s"
set +e
PYTHONPATH=${PKG_PATH:+$PKG_PATH:}$DISTILLER_SRC "$PY" "$REPO/benchmarks/cuda/run_checks.py" --device "$DEVICE" \
  --distiller-src "$DISTILLER_SRC" --shared "$SHARED" --work "$WORK" --out "$OUT" --lenet-epochs "$LENET_EPOCHS" \
  --resnet-epochs "$RESNET_EPOCHS" --workers "$WORKERS" --extra "$EXTRA" --deadline "$DEADLINE" \
  --tests-json "$WORK/tests.json" $FEW_SHOT
RUNS_RC=$?
set -e
[ "$RUNS_RC" = 0 ] || PROBLEMS+=("training runs: see $OUT/cuda_check.md")

# --- 6. verdict ----------------------------------------------------------------------------------------------------------
[ -f "$OUT/cuda_check.md" ] && cat "$OUT/cuda_check.md"
if [ ${#PROBLEMS[@]} = 0 ]; then
  say "OK on $DEVICE in $(( $(date +%s) - START )) s"
else
  say "NOT OK on $DEVICE in $(( $(date +%s) - START )) s: $(IFS=';'; echo "${PROBLEMS[*]}")"
  exit 1
fi
