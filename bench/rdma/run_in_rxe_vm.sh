#!/usr/bin/env bash
# Runs rdma_bench inside the rdma_rxe VM (tests/rdma/rxe_vm.sh) and copies its JSON out.
#
#   bench/rdma/run_in_rxe_vm.sh [--build DIR] [--json FILE] [--timeout SEC] [-- rdma_bench options...]
#
#   --build DIR   build directory holding bench/rdma/rdma_bench (default: build); built first if missing
#   --json FILE   where to write the results (default: DIR/rdma_bench.json)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$root/build
json=""
timeout_s=900
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "run_in_rxe_vm: unknown option $1" >&2; exit 2 ;;
  esac
done
json=${json:-$build/rdma_bench.json}
bench=$build/bench/rdma/rdma_bench
if [ ! -x "$bench" ]; then
  cmake --build "$build" --target rdma_bench -j2 || exit 1
fi
log=$(mktemp /tmp/rdma-bench.XXXXXX)
trap 'rm -f "$log"' EXIT
args=""
[ $# -eq 0 ] || args=$(printf ' %q' "$@")
"$root/tests/rdma/rxe_vm.sh" --timeout "$timeout_s" --file "$bench" -- \
  "rdma_bench$args --json /tmp/rdma_bench.json; rc=\$?; echo AGGVM-JSON-BEGIN; cat /tmp/rdma_bench.json; \
echo AGGVM-JSON-END; exit \$rc" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
  sed -n '/^AGGVM-JSON-BEGIN/,/^AGGVM-JSON-END/p' "$log" | sed '1d;$d' >"$json"
  echo "run_in_rxe_vm: results in $json"
fi
exit "$rc"
