#!/usr/bin/env bash
# One GPU check: run scripts/prepare_devcheck.sh first, carry .devcheck; writes $OUT/gpu_check.json.
# With --graphs the check keeps itself under its --budget (360 s by default) and writes its JSON after
# every stage; the outer timeout is only a backstop beyond that budget.
cd "$(dirname "$0")/.." && CCFS_LIBFFCV=$PWD/.devcheck/lib/_libffcv.so LD_LIBRARY_PATH=$PWD/.devcheck/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=$PWD/.devcheck/site:$PWD PYTHONUNBUFFERED=1 timeout 420 python3 -m benchmarks.gpu_check --json "${OUT:-benchmarks/results}/gpu_check.json" "$@"
