#!/usr/bin/env bash
# Fill the git-ignored .device/ with what benchmarks/cuda_check.sh needs on a GPU machine that has no
# network: Python 3.12 wheels of Distiller's dependencies missing there, a copy of Distiller's source,
# MNIST (gzipped), a CIFAR-10 JPEG subset, the two FP teachers. Run it here, then carry .device.
#
#   benchmarks/cuda/stage.sh DISTILLER_SRC [SHARED_DIR]
#
# DISTILLER_SRC: a Distiller checkout; only its distiller/ package and examples/classifier_compression/
# are copied (nothing is built). SHARED_DIR: data and teachers (default ../shared).
# CIFAR_TRAIN_PER_CLASS (500) and CIFAR_TEST_PER_CLASS (100): the subset's size. PYTHON: the
# interpreter whose pip downloads and builds the wheels (default python3). Re-running refreshes
# everything but wheels already saved.
set -euo pipefail

say() { printf '[stage] %s\n' "$*"; }
die() { printf 'stage.sh: %s\n' "$*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: benchmarks/cuda/stage.sh DISTILLER_SRC [SHARED_DIR]"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SRC=$(cd "$1" && pwd) || die "no Distiller source at $1"
SHARED=$(cd "${2:-$REPO/../shared}" && pwd) || die "no shared data folder at ${2:-$REPO/../shared}"
STAGE=$REPO/.device
PYTHON=${PYTHON:-python3}
TRAIN_PER_CLASS=${CIFAR_TRAIN_PER_CLASS:-500}
TEST_PER_CLASS=${CIFAR_TEST_PER_CLASS:-100}
LIMIT_MIB=64  # the device tool's limit on everything that travels

[ -f "$SRC/distiller/__init__.py" ] && [ -f "$SRC/examples/classifier_compression/compress_classifier.py" ] ||
  die "$SRC is not a Distiller checkout (needs distiller/ and examples/classifier_compression/)"
for f in data/mnist/MNIST/raw/train-images-idx3-ubyte data/cifar10-jpeg/train teachers/simplenet_mnist_fp.pth.tar \
         teachers/resnet20_cifar_fp.pth.tar; do
  [ -e "$SHARED/$f" ] || die "$SHARED/$f is missing"
done

# .device/ must never be committed: ignore it in this checkout only (not in .gitignore).
EXCLUDE=$(git -C "$REPO" rev-parse --git-path info/exclude)
case $EXCLUDE in /*) ;; *) EXCLUDE=$REPO/$EXCLUDE ;; esac
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.device/' "$EXCLUDE" 2>/dev/null || echo '/.device/' >> "$EXCLUDE"
mkdir -p "$STAGE/wheels" "$STAGE/data/mnist" "$STAGE/teachers"

# --- wheels: one per line of device-requirements.txt, for CPython 3.12 on x86-64 ---------------------
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
norm() { echo "$1" | tr 'A-Z.-' 'a-z__'; }  # a wheel file name's spelling of a project name
wanted=()
while read -r line; do
  pin=${line%%#*}; pin=${pin//[[:space:]]/}
  [ -n "$pin" ] || continue
  name=${pin%%==*}; version=${pin##*==}
  wanted+=("$(norm "$name")-$version-")
  if [ "$(ls "$STAGE/wheels" | tr 'A-Z' 'a-z' | grep -c "^$(norm "$name")-$version-")" != 0 ]; then
    continue
  fi
  if [[ $line == *sdist* ]]; then
    # No wheel on PyPI: build one here. Its setup.py needs pkg_resources, gone from setuptools >= 82.
    if [ ! -x "$TMP/build-venv/bin/python" ]; then
      say "making a throwaway build venv (setuptools<82)"
      "$PYTHON" -m venv "$TMP/build-venv"
      "$TMP/build-venv/bin/python" -m pip install -q "setuptools<82" wheel
    fi
    say "building $pin from its sdist"
    "$TMP/build-venv/bin/python" -m pip download -q --no-deps --no-binary=:all: -d "$TMP/sdist-$name" "$pin"
    "$TMP/build-venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
      -w "$TMP/built" "$TMP/sdist-$name"/*
  else
    say "downloading $pin"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$TMP/built" "$pin"
  fi
  for whl in "$TMP/built"/*.whl; do
    case $whl in *-py3-none-any.whl|*-cp312-*|*-abi3-*|*-py2.py3-none-any.whl) ;;
      *) die "$whl does not install on CPython 3.12 / x86-64" ;;
    esac
    mv "$whl" "$STAGE/wheels/"
  done
done < "$REPO/benchmarks/cuda/device-requirements.txt"
# two versions of one package would stop the whole install there: keep only the pinned ones
for whl in "$STAGE/wheels"/*.whl; do
  lower=$(basename "$whl" | tr 'A-Z' 'a-z')
  keep=0
  for prefix in "${wanted[@]}"; do [[ $lower == "$prefix"* ]] && keep=1; done
  [ $keep = 1 ] || { say "removing $(basename "$whl") (not pinned)"; rm -f "$whl"; }
done
[ "$(ls "$STAGE/wheels" | wc -l)" = "${#wanted[@]}" ] || die "expected ${#wanted[@]} wheels in $STAGE/wheels"

# --- Distiller: its package and the example script, as they are ---------------------------------------
say "copying Distiller from $SRC"
rm -rf "$STAGE/distiller"
mkdir -p "$STAGE/distiller/examples"
cp -R "$SRC/distiller" "$STAGE/distiller/distiller"
cp -R "$SRC/examples/classifier_compression" "$STAGE/distiller/examples/classifier_compression"
find "$STAGE/distiller" -name __pycache__ -prune -exec rm -rf {} +
git -C "$SRC" rev-parse HEAD > "$STAGE/distiller/COMMIT" 2>/dev/null || echo unknown > "$STAGE/distiller/COMMIT"

# --- data and teachers ---------------------------------------------------------------------------------
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ ! -s "$STAGE/data/mnist/$f.gz" ] || [ "$SHARED/data/mnist/MNIST/raw/$f" -nt "$STAGE/data/mnist/$f.gz" ]; then
    say "gzipping MNIST $f"
    gzip -c "$SHARED/data/mnist/MNIST/raw/$f" > "$STAGE/data/mnist/$f.gz"
  fi
done

say "CIFAR-10 JPEG subset: $TRAIN_PER_CLASS train + $TEST_PER_CLASS test images per class"
CIFAR=$SHARED/data/cifar10-jpeg
: > "$TMP/cifar-files"
for split in train test; do
  per_class=$TRAIN_PER_CLASS; [ $split = test ] && per_class=$TEST_PER_CLASS
  classes=$(ls "$CIFAR/$split")
  [ "$(echo "$classes" | wc -l)" = 10 ] || die "$CIFAR/$split should hold CIFAR-10's 10 class folders"
  for class in $classes; do
    files=$(ls "$CIFAR/$split/$class" | LC_ALL=C sort | awk -v n="$per_class" 'NR <= n')  # not head: SIGPIPE
    [ "$(echo "$files" | wc -l)" = "$per_class" ] || die "$CIFAR/$split/$class has fewer than $per_class images"
    echo "$files" | sed "s|^|$split/$class/|" >> "$TMP/cifar-files"
  done
done
tar -C "$CIFAR" --owner=0 --group=0 --numeric-owner --mtime=2020-01-01 -czf "$STAGE/data/cifar10-jpeg-subset.tar.gz" \
  -T "$TMP/cifar-files"

cp "$SHARED/teachers/simplenet_mnist_fp.pth.tar" "$SHARED/teachers/resnet20_cifar_fp.pth.tar" "$STAGE/teachers/"

# --- what travels: the working tree plus .device, under the tool's limit ----------------------------------
stage_bytes=$(du -sb "$STAGE" | cut -f1)
tree_bytes=$(git -C "$REPO" ls-files -z --cached --others --exclude-standard |
  (cd "$REPO" && xargs -0 stat -c %s 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')
total_mib=$(( (stage_bytes + tree_bytes + 1048575) / 1048576 ))
say "staged in $STAGE: $(( stage_bytes / 1048576 )) MiB; with the working tree $total_mib MiB travel (limit $LIMIT_MIB)"
du -sh "$STAGE"/* | sed 's/^/[stage]   /'
[ "$total_mib" -lt "$LIMIT_MIB" ] || die "what travels would be $total_mib MiB, over the device tool's $LIMIT_MIB MiB"
say "done; run on the GPU machine: bash benchmarks/cuda_check.sh  (carry [\".device\"])"
