#!/usr/bin/env bash
# Run once on a machine with network: the wheels tests/gpu/run_h200.sh installs on the GPU
# machine (CPython 3.12, x86_64 Linux), into tests/gpu/wheels (about 21 MB; git-ignored).
set -euo pipefail
cd "$(dirname "$0")"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  -d wheels "megatron-core>=0.17,<0.20" "torchao==0.18.0" numpy
ls -l wheels
