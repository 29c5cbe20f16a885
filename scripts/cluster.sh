#!/usr/bin/env bash
# A local aggvm cluster in one command: aggvm-master and three aggvm-agents as separate processes, each agent in its
# own network namespace joined by veth pairs to a bridge (plain loopback when not root), one probe-guest VM of
# 3 nodes x 2 vCPUs across them:
#   1. hello      every vCPU's line on the master's one console (the guest writes the master's UART)
#   2. doorbells  edge interrupts raised on node-a, delivered per routing policy (sdm, round-robin,
#                 node-local-first, static), the receiving vCPU taken from the guest's own IRQ records; then a
#                 level-triggered one held on node-a, re-delivered to vCPU 3 on node-b after each EOI
#   3. guest IPIs the guest's own IPIs across nodes: ipi-pingpong between vCPU 0 on node-a and vCPU 3 on node-b,
#                 in route mode via-master (IPIs through the master's Router) or direct (straight to the owner node),
#                 each round timed by the guest's rdtsc
# Everything is torn down on exit (processes by pid, namespaces by name), also on failure or Ctrl-C.
#
#   scripts/cluster.sh [--build-dir DIR] [--rings N] [--irqchip kernel|user] [--route-mode via-master|direct]
#                      [--rounds N] [--loopback] [--logs DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build
rings=6
irqchip=kernel
route_mode=via-master
rounds=100
force_loopback=0
logs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build=$2; shift ;;
    --rings) rings=$2; shift ;;
    --irqchip) irqchip=$2; shift ;;
    --route-mode) route_mode=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --loopback) force_loopback=1 ;;
    --logs) logs=$2; shift ;;
    *) echo "cluster.sh: unknown option $1 (--build-dir DIR, --rings N, --irqchip kernel|user, --route-mode via-master|direct, --rounds N, --loopback, --logs DIR)" >&2
       exit 2 ;;
  esac
  shift
done
case "$irqchip" in kernel|user) ;; *) echo "cluster.sh: --irqchip is kernel or user" >&2; exit 2 ;; esac
case "$route_mode" in via-master|direct) ;; *) echo "cluster.sh: --route-mode is via-master or direct" >&2; exit 2 ;; esac

master_bin=$build/master/aggvm-master
agent_bin=$build/node-agent/aggvm-agent
ctl_bin=$build/ctl/aggvmctl
for b in "$master_bin" "$agent_bin" "$ctl_bin"; do
  [ -x "$b" ] || { echo "cluster.sh: $b is missing; build it: scripts/build.sh normal aggvm-master aggvm-agent aggvmctl probe_guest" >&2; exit 1; }
done
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "cluster.sh: /dev/kvm is missing or not accessible: load kvm (modprobe kvm_intel / kvm_amd) and run as root" >&2
  exit 1
fi

work=$(mktemp -d /tmp/aggvm-cluster.XXXXXX)
[ -n "$logs" ] && mkdir -p "$logs"
nodes=(node-a node-b node-c)
pids=()
namespaces=()
tag="ag$$"

cleanup() {
  local rc=$?
  set +e
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
  if [ -n "$logs" ]; then cp "$work"/*.log "$logs"/ 2>/dev/null; fi
  if [ $rc -ne 0 ]; then
    echo "cluster.sh: failed (exit $rc); last lines of the daemons' logs:" >&2
    for f in "$work"/*.log; do echo "--- $(basename "$f")" >&2; tail -n 8 "$f" >&2; done
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- network: a namespace per process (root), or loopback ------------------------------------------------------------
use_netns=0
if [ "$force_loopback" = 0 ] && [ "$(id -u)" = 0 ] && command -v ip >/dev/null && ip netns list >/dev/null 2>&1; then
  use_netns=1
fi
if [ $use_netns = 1 ]; then
  hub=$tag-hub
  ip netns add "$hub"; namespaces+=("$hub")
  ip -n "$hub" link add br0 type bridge
  ip -n "$hub" link set br0 up
  ip -n "$hub" link set lo up
  i=0
  for who in master "${nodes[@]}"; do
    ns=$tag-$who
    ip netns add "$ns"; namespaces+=("$ns")
    ip -n "$hub" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$hub" link set "v$i" master br0 up
    ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    i=$((i + 1))
  done
  in_ns() { local who=$1; shift; ip netns exec "$tag-$who" "$@"; }
  addr_of() { case $1 in master) echo 10.77.0.1 ;; node-a) echo 10.77.0.2 ;; node-b) echo 10.77.0.3 ;; node-c) echo 10.77.0.4 ;; esac; }
  echo "== network: 4 namespaces ($tag-master, $tag-node-{a,b,c}) on a bridge, 10.77.0.0/24"
else
  in_ns() { shift; "$@"; }
  addr_of() { echo 127.0.0.1; }
  echo "== network: loopback (not root, or --loopback): every process on 127.0.0.1"
fi
port_of() {  # <who> <kind: grpc|data>
  local base
  case $1 in master) base=0 ;; node-a) base=1 ;; node-b) base=2 ;; node-c) base=3 ;; esac
  if [ "$2" = grpc ]; then echo $((17070 + base * 10)); else echo $((17071 + base * 10)); fi
}
master_addr=$(addr_of master):$(port_of master grpc)
ctl() { in_ns master "$ctl_bin" --master "$master_addr" "$@"; }

# --- processes -----------------------------------------------------------------------------------------------------
spawn() {  # <who> <log> <argv...>: in the background, remembering the daemon's own pid (ip netns exec execs it)
  local who=$1 log=$2
  shift 2
  if [ $use_netns = 1 ]; then ip netns exec "$tag-$who" "$@" >"$log" 2>&1 &
  else "$@" >"$log" 2>&1 &
  fi
  pids+=($!)
}
spawn master "$work/master.log" "$master_bin" --listen "$master_addr" \
  --data-listen "$(addr_of master):$(port_of master data)" --heartbeat-ms 200 --lost-after 5 --agent-timeout 20
for n in "${nodes[@]}"; do
  spawn "$n" "$work/$n.log" "$agent_bin" --master "$master_addr" --node "$n" \
    --listen "$(addr_of "$n"):$(port_of "$n" grpc)" --data-listen "$(addr_of "$n"):$(port_of "$n" data)" \
    --advertise-host "$(addr_of "$n")"
done
echo "== started aggvm-master (pid ${pids[0]}) and 3 aggvm-agents (pids ${pids[*]:1}); waiting for the nodes"
for _ in $(seq 100); do
  up=$(ctl status 2>/dev/null | grep -c ' UP ' || true)
  [ "$up" = 3 ] && break
  sleep 0.1
done
ctl status

follow_records() {  # <vm> <seconds> <file>: the VM's console and guest records, in the background
  if [ $use_netns = 1 ]; then
    ip netns exec "$tag-master" "$ctl_bin" --master "$master_addr" console "$1" --records --for "$2" >"$3" &
  else
    "$ctl_bin" --master "$master_addr" console "$1" --records --for "$2" >"$3" &
  fi
  pids+=($!)
}

spec_for() {  # <example> <out>: the example spec with this run's irqchip mode
  sed "s/^irqchip: .*/irqchip: IRQCHIP_MODE_$(echo "$irqchip" | tr a-z A-Z)/" "$root/deploy/examples/$1.textproto" >"$2"
}

# --- 1. hello: one console for six vCPUs on three nodes ------------------------------------------------------------
echo
echo "== 1. hello: 3 nodes x 2 vCPUs, $irqchip irqchip; every vCPU prints on the master's console"
spec_for probe-3x2 "$work/hello.textproto"
ctl vm create "$work/hello.textproto"
ctl console probe-3x2 --lines 6 --for 60 >"$work/hello.console" &
follower=$!
sleep 0.3
ctl vm start probe-3x2
wait $follower || true
grep -v '^--' "$work/hello.console" | sort
hellos=$(grep -c 'hello' "$work/hello.console" || true)
ctl vm stop probe-3x2 >/dev/null
[ "$hellos" -ge 6 ] || { echo "cluster.sh: only $hellos of 6 vCPUs said hello" >&2; exit 1; }

# --- 2. doorbells ----------------------------------------------------------------------------------------------------
echo
echo "== 2. doorbells: GSI 4 (vector 0x44, lowest priority to all 6 vCPUs) raised on node-a, per routing policy"
spec_for doorbell-3x2 "$work/doorbell.textproto"
ctl vm create "$work/doorbell.textproto" >/dev/null
follow_records doorbell-3x2 600 "$work/doorbell.console"
sleep 0.3
ctl vm start doorbell-3x2
for _ in $(seq 300); do  # irq-sink says HELLO once its IDT and LAPIC are up
  [ "$(grep -c '] hello apic' "$work/doorbell.console" || true)" -ge 6 ] && break
  sleep 0.1
done
irqs() { grep -c "irq vector $1" "$work/doorbell.console" || true; }

# ring <node> <gsi> -> prints "vCPU v @ node" of the new IRQ record of vector 0x44
ring() {
  local before after
  before=$(irqs 0x44)
  ctl doorbell doorbell-3x2 --node "$1" --gsi "$2" >/dev/null
  for _ in $(seq 100); do
    after=$(irqs 0x44)
    [ "$after" -gt "$before" ] && break
    sleep 0.05
  done
  if [ "$after" -gt "$before" ]; then
    grep "irq vector 0x44" "$work/doorbell.console" | tail -n 1 | sed -E 's/^\[vcpu ([0-9]+) @ ([^]]+)\].*/vCPU \1 @ \2/'
  else
    echo "(not delivered)"
  fi
}

results=()
for policy in sdm round-robin node-local-first static; do
  if [ "$policy" = static ]; then ctl vm policy doorbell-3x2 static --pin 0x44=5 >/dev/null
  else ctl vm policy doorbell-3x2 "$policy" >/dev/null; fi
  line=""
  for _ in $(seq "$rings"); do line+="$(ring node-a 4) | "; done
  results+=("$(printf '%-17s %s' "$policy" "$line")")
  printf '%-17s raised on node-a -> %s\n' "$policy" "$line"
done
ctl vm policy doorbell-3x2 node-local-first >/dev/null
echo "node-local-first raised on node-c -> $(ring node-c 4) | $(ring node-c 4)"

echo
echo "== level-triggered: GSI 5 (vector 0x55, fixed to vCPU 3 on node-b) held asserted on node-a for 0.5 s"
before=$(irqs 0x55)
ctl doorbell doorbell-3x2 --node node-a --gsi 5 --level --assert >/dev/null
sleep 0.5
ctl doorbell doorbell-3x2 --node node-a --gsi 5 --level --deassert >/dev/null
sleep 0.3
level_irqs=$(( $(irqs 0x55) - before ))
echo "vCPU 3 @ node-b handled vector 0x55 $level_irqs time(s): once per EOI round trip node-b -> master while node-a held the line"
ctl vm routing doorbell-3x2
sleep 0.2
settled=$(( $(irqs 0x55) - before ))
[ "$settled" = "$level_irqs" ] || { echo "cluster.sh: level interrupt re-delivered after the deassert" >&2; exit 1; }

ctl vm stop doorbell-3x2 >/dev/null

# --- 3. guest IPIs across nodes -------------------------------------------------------------------------------------
echo
echo "== 3. guest IPIs: ipi-pingpong vCPU 0 @ node-a <-> vCPU 3 @ node-b, $rounds rounds, route mode $route_mode"
route_enum=ROUTE_MODE_$(echo "$route_mode" | tr a-z- A-Z_)
cat >"$work/pingpong.textproto" <<SPEC
name: "pingpong-3x2"
vcpus: 6
placement { node: "node-a" vcpus: [0, 1] }
placement { node: "node-b" vcpus: [2, 3] }
placement { node: "node-c" vcpus: [4, 5] }
irqchip: IRQCHIP_MODE_$(echo "$irqchip" | tr a-z A-Z)
transport: TRANSPORT_KIND_TCP
wait_mode: WAIT_MODE_EVENT
route_mode: $route_enum
workload { name: "ipi-pingpong" iterations: $rounds ping_vcpu: 0 pong_vcpu: 3 ipi_vector: 0x40 }
SPEC
ctl vm create "$work/pingpong.textproto" >/dev/null
follow_records pingpong-3x2 120 "$work/pingpong.console"
sleep 0.3
ctl vm start pingpong-3x2
for _ in $(seq 600); do
  [ "$(grep -c 'ping round' "$work/pingpong.console" || true)" -ge "$rounds" ] && break
  grep -q '] error ' "$work/pingpong.console" && break
  sleep 0.1
done
ping_rounds=$(grep -c 'ping round' "$work/pingpong.console" || true)
# Round trip = the guest's rdtsc span of each PING_ROUND record; guest TSC = host TSC here (docs/cluster.md).
mhz=$(awk -F: '/^cpu MHz/ { printf "%d", $2; exit }' /proc/cpuinfo)
median_ticks=$(grep 'ping round' "$work/pingpong.console" | sed -E 's/.*tsc ([0-9]+) -> ([0-9]+).*/\1 \2/' |
  awk '{ print $2 - $1 }' | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print 0 }')
ipi_line="$ping_rounds of $rounds rounds, median round trip $median_ticks TSC ticks"
[ "${mhz:-0}" -gt 0 ] && ipi_line+=" (~$((median_ticks / mhz)) µs at $mhz MHz)"
echo "$ipi_line"
ctl vm stop pingpong-3x2 >/dev/null
[ "$ping_rounds" -ge "$rounds" ] || { echo "cluster.sh: ipi-pingpong finished $ping_rounds of $rounds rounds" >&2; exit 1; }

echo
echo "== cross-node results"
printf '  %s\n' "${results[@]}"
echo "  level GSI 5 on node-a -> vCPU 3 @ node-b: $level_irqs deliveries, none after the deassert"
echo "  guest IPIs ($irqchip irqchip, $route_mode): vCPU 0 @ node-a <-> vCPU 3 @ node-b: $ipi_line"
echo "== tearing down"
