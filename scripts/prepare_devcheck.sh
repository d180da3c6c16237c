#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.py needs on a GPU machine that has torch / numba / numpy / cv2 but
# no FFCV and no OpenCV / libjpeg-turbo shared libraries: FFCV's pure-Python package, its compiled
# _libffcv (used only through ctypes, so a module stub points at it), and the native libraries it
# links (from `ldd`, glibc itself excluded). Output: .devcheck/ (git-ignored; `carry` it).
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import ffcv, os; print(os.path.dirname(os.path.dirname(ffcv.__file__)))")
rm -rf .devcheck && mkdir -p .devcheck/site .devcheck/lib
cp -r "$site/ffcv" "$site"/ffcv-*.dist-info .devcheck/site/
find .devcheck/site -name __pycache__ -prune -exec rm -rf {} +
so=$(ls .devcheck/site/ffcv/_libffcv*.so)
mv "$so" .devcheck/lib/_libffcv.so
cat > .devcheck/site/ffcv/_libffcv.py <<'PY'
# Stub: ffcv/libffcv.py only reads this module's __file__ to dlopen the compiled library.
import os
__file__ = os.environ["CCFS_LIBFFCV"]
PY
ldd .devcheck/lib/_libffcv.so | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
    *) cp -L "$lib" .devcheck/lib/ ;;
  esac
done
du -sh .devcheck
