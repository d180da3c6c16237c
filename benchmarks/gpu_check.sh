#!/usr/bin/env bash
# The staged device check in one command: run scripts/prepare_devcheck.sh here first and carry .devcheck.
# Line 1 checks the device's environment (versions, or exactly what is missing); then the check keeps
# itself under its --budget (480 s by default) and writes $OUT/gpu_check.json after every stage. The
# outer timeout is only a backstop beyond that budget; give the device tool timeout_s 600.
CCFS_CHECK_STARTED=$(date +%s.%N)  # the budget counts from here, the environment line included
export CCFS_CHECK_STARTED
cd "$(dirname "$0")/.." || exit 2
export CCFS_LIBFFCV=$PWD/.devcheck/lib/_libffcv.so LD_LIBRARY_PATH=$PWD/.devcheck/lib:${LD_LIBRARY_PATH:-} \
  PYTHONPATH=$PWD/.devcheck/site:$PWD PYTHONUNBUFFERED=1
python3 -m benchmarks.device_env || exit 3
exec timeout 570 python3 -m benchmarks.gpu_check --json "${OUT:-benchmarks/results}/gpu_check.json" "$@"
