#!/usr/bin/env bash
# The main job (README): installs what is missing, builds, and
#   part 1 (scripts/cluster.sh): a local cluster — aggvm-master and 3 aggvm-agents as separate processes, each agent
#          in its own network namespace (plain loopback when not root) — running one probe-guest VM of 3 nodes x
#          2 vCPUs: hello from every vCPU on the master's one console, then doorbell interrupts raised on node-a and
#          delivered per routing policy (receiving vCPU from the guest's own IRQ records), a level-triggered one
#          re-delivered after each cross-node EOI; everything torn down at the end;
#   part 2: single-node measurements with the KVM vCPU runtime — hello on 4 vCPUs, IPI ping-pong, host MSI -> guest
#          handler latency, exit round trips.
#
#   scripts/run.sh [--iterations N] [--json-dir DIR] [--irqchip kernel|user] [--cluster-only]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
iterations=2000
json_dir=""
irqchip=kernel
cluster_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) iterations=$2; shift ;;
    --json-dir) json_dir=$2; shift ;;
    --irqchip) irqchip=$2; shift ;;
    --cluster-only) cluster_only=1 ;;
    *) echo "run.sh: unknown option $1 (--iterations N, --json-dir DIR, --irqchip kernel|user, --cluster-only)" >&2
       exit 2 ;;
  esac
  shift
done

"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" normal aggvm-master aggvm-agent aggvmctl probe_guest

if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "run.sh: /dev/kvm is missing or not accessible: load kvm (modprobe kvm_intel / kvm_amd) and run as root" >&2
  exit 1
fi

echo "=== part 1: the distributed VM on a local cluster (scripts/cluster.sh)"
"$root/scripts/cluster.sh" --build-dir "$root/build" --irqchip "$irqchip"
[ "$cluster_only" = 1 ] && exit 0

echo
echo "=== part 2: single-node measurements"
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
