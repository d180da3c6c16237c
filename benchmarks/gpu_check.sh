#!/usr/bin/env bash
# One GPU check: run scripts/prepare_devcheck.sh first, carry .devcheck; writes $OUT/gpu_check.json.
cd "$(dirname "$0")/.." && CCFS_LIBFFCV=$PWD/.devcheck/lib/_libffcv.so LD_LIBRARY_PATH=$PWD/.devcheck/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=$PWD/.devcheck/site:$PWD PYTHONUNBUFFERED=1 timeout 480 python3 -m benchmarks.gpu_check --json "${OUT:-benchmarks/results}/gpu_check.json" "$@"
