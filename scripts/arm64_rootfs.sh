#!/usr/bin/env bash
# An arm64 (aarch64) Debian root filesystem with ONNX Runtime's aarch64 wheel, run on an x86-64 machine by
# qemu-user: what bench/arm64_check.py needs. Idempotent (each step is skipped when its result is there).
#
#   scripts/arm64_rootfs.sh [DIR]    (default /work/arm64; env ORT_VERSION, NUMPY_VERSION, MIRROR)
#
# Leaves DIR/rootfs (bookworm arm64, python3.11 + numpy + onnxruntime in DIR/rootfs/opt/edgekit-site) and
# DIR/wheels. Needs root (debootstrap), apt's qemu-user and debootstrap, and the project's .venv (its pip
# downloads the aarch64 wheels; its onnxruntime's version is the one installed, unless ORT_VERSION says).
# No binfmt_misc is needed or used: every arm64 program is started as `qemu-aarch64 -L ROOTFS ROOTFS/usr/bin/...`,
# so debootstrap's second stage (which would have to exec arm64 programs) is not run: the packages it fetched
# are unpacked with dpkg-deb -x, which is enough for python3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/work/arm64}
ROOTFS=$DIR/rootfs
SITE=$ROOTFS/opt/edgekit-site
VENV_PY=${VENV_PY:-.venv/bin/python}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
for tool in qemu-aarch64 debootstrap dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "arm64_rootfs: $tool is missing: apt-get install -y qemu-user debootstrap" >&2; exit 2; }
done
[ -x "$VENV_PY" ] || { echo "arm64_rootfs: no $VENV_PY: run scripts/setup.sh first (or set VENV_PY)" >&2; exit 2; }
ORT_VERSION=${ORT_VERSION:-$("$VENV_PY" -c 'import onnxruntime; print(onnxruntime.__version__)')}
NUMPY_VERSION=${NUMPY_VERSION:-$("$VENV_PY" -c 'import numpy; print(numpy.__version__)')}
mkdir -p "$DIR"
QEMU=(qemu-aarch64 -cpu cortex-a76 -L "$ROOTFS")

if [ ! -x "$ROOTFS/usr/bin/python3.11" ]; then
  echo "arm64_rootfs: debootstrap (first stage) into $ROOTFS"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,python3-pip,libstdc++6,libgomp1 \
    bookworm "$ROOTFS" "$MIRROR" > "$DIR/debootstrap.log" 2>&1 \
    || { echo "arm64_rootfs: debootstrap failed, see $DIR/debootstrap.log" >&2; exit 1; }
  for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOTFS"; done
fi

# qemu-user hands the guest the host's /proc/cpuinfo (x86 text); ONNX Runtime's cpuinfo library then crashes on
# import (SIGSEGV). `qemu -L ROOTFS` reads ROOTFS/proc/cpuinfo instead when it exists: describe a Jetson Orin's
# cores (Cortex-A78AE: implementer 0x41, part 0xd42, ARMv8.2 + dotprod). The instruction-set features the
# libraries act on come from the auxiliary vector (HWCAP), i.e. from qemu's -cpu model, not from this text.
if [ ! -s "$ROOTFS/proc/cpuinfo" ]; then
  mkdir -p "$ROOTFS/proc"
  for i in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n' "$i"
  done > "$ROOTFS/proc/cpuinfo"
fi

if ! PYTHONPATH=$SITE "${QEMU[@]}" "$ROOTFS/usr/bin/python3.11" -c \
    "import onnxruntime, numpy, sys; sys.exit(onnxruntime.__version__ != '$ORT_VERSION')" 2>/dev/null; then
  echo "arm64_rootfs: aarch64 wheels onnxruntime==$ORT_VERSION numpy==$NUMPY_VERSION (cp311) into $SITE"
  mkdir -p "$DIR/wheels"
  "$VENV_PY" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
    --platform manylinux_2_17_aarch64 -d "$DIR/wheels" "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
  rm -rf "$SITE"
  # pip itself runs emulated (the rootfs's python3-pip), installing the wheels it was given, nothing else
  "${QEMU[@]}" "$ROOTFS/usr/bin/python3.11" -m pip install -q --no-index --find-links "$DIR/wheels" \
    --target "$SITE" --break-system-packages "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
fi
PYTHONPATH=$SITE "${QEMU[@]}" "$ROOTFS/usr/bin/python3.11" -c \
  "import platform, numpy, onnxruntime as o; print('arm64_rootfs: ready:', platform.machine(), 'python', platform.python_version(), 'numpy', numpy.__version__, 'onnxruntime', o.__version__)"
