#!/usr/bin/env bash
# Configures and builds one flavour of aggvm.  Usage: scripts/build.sh [normal|asan|fuzz] [ninja targets...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
flavour=${1:-normal}
shift || true
case "$flavour" in
  normal) dir=$root/build;      args=() ;;
  asan)   dir=$root/build-asan; args=(-DAGGVM_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug) ;;
  fuzz)   dir=$root/build-fuzz; args=(-DAGGVM_FUZZ=ON -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++) ;;
  *) echo "build.sh: unknown flavour '$flavour' (normal|asan|fuzz)" >&2; exit 2 ;;
esac
if [ ! -f "$dir/build.ninja" ]; then
  cmake -S "$root" -B "$dir" -G Ninja "${args[@]}" >/dev/null
fi
if [ "$flavour" = fuzz ] && [ $# -eq 0 ]; then set -- fuzz_all; fi
cmake --build "$dir" -- "$@"
