#!/usr/bin/env bash
# The main job (README): installs what is missing, builds, and runs the probe guest on this node with the KVM vCPU
# runtime — hello on 4 vCPUs, IPI ping-pong between two vCPUs, and host MSI -> guest handler latency — printing what
# it measured. Until the distributed parts exist, everything runs on this node.
#
#   scripts/run.sh [--iterations N] [--json-dir DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
iterations=2000
json_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) iterations=$2; shift ;;
    --json-dir) json_dir=$2; shift ;;
    *) echo "run.sh: unknown option $1 (--iterations N, --json-dir DIR)" >&2; exit 2 ;;
  esac
  shift
done

"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" normal aggvm-agent probe_guest

if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "run.sh: /dev/kvm is missing or not accessible: load kvm (modprobe kvm_intel / kvm_amd) and run as root" >&2
  exit 1
fi

agent=$root/build/node-agent/aggvm-agent
run() {  # <name> <agent args...>
  local name=$1
  shift
  echo
  echo "=== aggvm-agent --standalone $*"
  if [ -n "$json_dir" ]; then
    mkdir -p "$json_dir"
    "$agent" --standalone "$@" --json "$json_dir/$name.json"
  else
    "$agent" --standalone "$@"
  fi
}
run hello --vcpus 4 --workload hello
run ipi-pingpong --vcpus 2 --workload ipi-pingpong --iterations "$iterations"
run msi-latency --vcpus 2 --workload irq-sink --iterations "$iterations"
run exit-loop --vcpus 1 --workload exit-loop --iterations "$iterations"
