#!/usr/bin/env bash
# FFCV 1.0.2 compiles a C extension that links OpenCV and libjpeg-turbo, found through pkg-config.
# Install Debian's packages when they are missing (as root), else say exactly what to run.
set -euo pipefail
pkgs="pkg-config libopencv-dev libturbojpeg0-dev"
if command -v pkg-config >/dev/null 2>&1 \
   && pkg-config --exists opencv4 && pkg-config --exists libturbojpeg; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing FFCV's system libraries: $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends $pkgs
  exit 0
fi
echo "FFCV needs system packages that are missing: $pkgs" >&2
echo "run as root:  apt-get update && apt-get install -y $pkgs   then: make install" >&2
exit 1
