#!/usr/bin/env bash
# The device check in two calls (run scripts/prepare_devcheck.sh here first and carry .devcheck):
#   bash benchmarks/gpu_check.sh smoke   # <= 120 s: environment, exactness, KD graphs vs eager -> $OUT/gpu_check_smoke.json
#   bash benchmarks/gpu_check.sh main    # <= 360 s: the bank, the fp32 preset projected, bf16   -> $OUT/gpu_check_main.json
# Line 1 checks the device's environment (versions, or exactly what is missing); the check then keeps
# itself under its call's budget by its own clock and writes its JSON after every stage. The outer
# timeout is only a backstop; stage processes die with the check (PR_SET_PDEATHSIG).
CCFS_CHECK_STARTED=$(date +%s.%N)  # the budget counts from here, the environment line included
export CCFS_CHECK_STARTED
call=${1:-all}
case "$call" in smoke|main|all) shift || true ;; *) call=all ;; esac
cd "$(dirname "$0")/.." || exit 2
export CCFS_LIBFFCV=$PWD/.devcheck/lib/_libffcv.so LD_LIBRARY_PATH=$PWD/.devcheck/lib:${LD_LIBRARY_PATH:-} \
  PYTHONPATH=$PWD/.devcheck/site:$PWD PYTHONUNBUFFERED=1
python3 -m benchmarks.device_env || exit 3
export CCFS_CHECK_CUDA=1  # the environment line found the CUDA device: the check need not ask again
case "$call" in smoke) backstop=150 ;; main) backstop=390 ;; *) backstop=570 ;; esac
exec timeout "$backstop" python3 -m benchmarks.gpu_check --call "$call" \
  --json "${OUT:-benchmarks/results}/gpu_check_${call}.json" "$@"
