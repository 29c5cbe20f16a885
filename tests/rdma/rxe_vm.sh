#!/usr/bin/env bash
# Runs a command inside a throw-away TCG VM that has a real verbs device: Debian's kernel, rdma_rxe on a virtio NIC.
#
#   rxe_vm.sh [--timeout SEC] [--workdir DIR] [--file PATH]... -- COMMAND...
#
#   --file PATH    a host executable copied to /bin of the VM, with every library `ldd` names (repeatable)
#   --timeout SEC  wall-clock bound for the whole VM run (default 300); qemu is killed when it expires
#   --workdir DIR  where the initramfs is assembled (default: a temporary directory, removed afterwards)
#   COMMAND        run inside the VM by /bin/sh once rxe0 exists; its exit status becomes this script's status
#
# What the VM has: busybox, `rdma` (iproute2), libibverbs with the rxe provider, the loaded modules crc32_generic
# ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe (+ virtio-net's), eth0 = 10.0.2.15/24, lo up, rxe0 on eth0.
#
# The kernel comes from Debian: `apt-get download` of the linux-image-*-amd64 package that linux-image-amd64 depends
# on, cached in $AGGVM_RXE_CACHE (default /var/cache/aggvm-rxe, or ~/.cache/aggvm-rxe when that is not writable) and
# reused across runs; a cached kernel is used when apt cannot download.
#
# Exit status: the in-VM command's status (read from a marker line on the serial console); 1 when the VM did not
# report one (timeout, panic); 77 = skipped because qemu or the kernel package is unavailable — unless
# AGGVM_REQUIRE contains `rxe` or `all` (as in CI), then that is a failure (1).
set -uo pipefail

timeout_s=300
workdir=""
files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout_s=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "rxe_vm: unknown option $1 (usage: rxe_vm.sh [--timeout S] [--file BIN]... -- COMMAND...)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "rxe_vm: no command given (usage: rxe_vm.sh [--file BIN]... -- COMMAND...)" >&2; exit 2; }
command_line="$*"

log() { echo "rxe_vm: $*" >&2; }

# A missing prerequisite: skip (77) on a user's machine, failure when AGGVM_REQUIRE names rxe or all.
unavailable() {
  case ",${AGGVM_REQUIRE:-}," in
    *,all,*|*,rxe,*)
      log "FAIL: required prerequisite 'rxe' missing: $* (AGGVM_REQUIRE=${AGGVM_REQUIRE})"; exit 1 ;;
  esac
  log "SKIP: $* (set AGGVM_REQUIRE=rxe to make this a failure)"
  exit 77
}

for tool in qemu-system-x86_64 cpio gzip dpkg-deb depmod ldd timeout flock; do
  command -v "$tool" >/dev/null || unavailable "'$tool' not found; run scripts/install-deps.sh"
done
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && [[ "$(LC_ALL=C ldd "$b" 2>&1)" == *"not a dynamic"* ]]; then busybox=$b; break; fi
done
[ -n "$busybox" ] || unavailable "a static busybox is needed (apt-get install busybox-static)"
rdma_tool=$(command -v rdma || true)
[ -n "$rdma_tool" ] || unavailable "the 'rdma' tool (iproute2) is needed"
multiarch=x86_64-linux-gnu
provider_dir=/usr/lib/$multiarch/libibverbs
rxe_provider=$(ls "$provider_dir"/librxe-rdmav*.so 2>/dev/null | head -1)
[ -n "$rxe_provider" ] && [ -f /etc/libibverbs.d/rxe.driver ] ||
  unavailable "the libibverbs rxe provider is missing ($provider_dir/librxe-rdmav*.so; apt-get install rdma-core)"

# ---- the kernel, cached ----------------------------------------------------------------------------------------
cache=${AGGVM_RXE_CACHE:-/var/cache/aggvm-rxe}
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then cache=${XDG_CACHE_HOME:-$HOME/.cache}/aggvm-rxe; fi
mkdir -p "$cache" || unavailable "cannot create the kernel cache $cache"
exec 9>"$cache/.lock"
flock -w 600 9 || unavailable "the kernel cache $cache stays locked by another run"

kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
deb=""
if [ -n "$kpkg" ]; then
  deb=$(ls -t "$cache/${kpkg}"_*.deb 2>/dev/null | head -1)
  if [ -z "$deb" ]; then
    log "downloading $kpkg into $cache (apt-get download)"
    (cd "$cache" && apt-get download "$kpkg" >"$cache/apt-download.log" 2>&1) ||
      log "apt-get download $kpkg failed: $(tail -1 "$cache/apt-download.log")"
    deb=$(ls -t "$cache/${kpkg}"_*.deb 2>/dev/null | head -1)
  fi
fi
[ -n "$deb" ] || deb=$(ls -t "$cache"/linux-image-*-amd64_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || unavailable "no Debian kernel package: apt-cache knows no linux-image-amd64 dependency or the \
download failed, and $cache holds none (run apt-get update, or put a linux-image-*-amd64 .deb there)"

kroot="$cache/$(basename "$deb" .deb)"
if [ ! -f "$kroot/.complete" ]; then
  log "extracting $(basename "$deb")"
  rm -rf "$kroot"
  dpkg-deb -x "$deb" "$kroot" || unavailable "cannot extract $deb"
  kver=$(ls "$kroot/lib/modules" | head -1)
  depmod -b "$kroot" "$kver" || unavailable "depmod failed for $kver"
  touch "$kroot/.complete"
fi
kver=$(ls "$kroot/lib/modules" | head -1)
vmlinuz="$kroot/boot/vmlinuz-$kver"
moddir="$kroot/lib/modules/$kver"
[ -f "$vmlinuz" ] && [ -f "$moddir/modules.dep" ] || unavailable "the extracted kernel in $kroot is incomplete"
flock -u 9

# ---- the initramfs ---------------------------------------------------------------------------------------------
own_workdir=0
if [ -z "$workdir" ]; then workdir=$(mktemp -d /tmp/aggvm-rxe.XXXXXX); own_workdir=1; fi
# qemu writes its pid here (-pidfile): $! after the boot pipeline below is tee's, not qemu's.
qemu_pidfile="$workdir/qemu.pid"
qemu_pid=""
rm -f "$qemu_pidfile"
cleanup() {
  if [ -z "$qemu_pid" ] && [ -s "$qemu_pidfile" ]; then qemu_pid=$(cat "$qemu_pidfile" 2>/dev/null); fi
  # Kill only a qemu of ours that still runs (the pid may have been reused after a normal exit).
  if [ -n "$qemu_pid" ] && [[ "$(cat "/proc/$qemu_pid/comm" 2>/dev/null)" == qemu-system* ]]; then
    kill -9 "$qemu_pid" 2>/dev/null
  fi
  [ $own_workdir -eq 1 ] && rm -rf "$workdir"
}
trap cleanup EXIT
# A signal (ctest's timeout, ^C) ends the script through `exit`, so the EXIT trap above kills qemu.
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP
root="$workdir/root"
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}

copy_with_libs() {  # <host file> <destination in root>
  install -D -m 0755 "$1" "$root$2"
  local lib
  for lib in $(LC_ALL=C ldd "$1" 2>/dev/null | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}'); do
    [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}

install -m 0755 "$busybox" "$root/bin/busybox"
copy_with_libs "$rdma_tool" /bin/rdma
copy_with_libs "$rxe_provider" "$rxe_provider"
cp /etc/libibverbs.d/rxe.driver "$root/etc/"
mkdir -p "$root/etc/libibverbs.d" && mv "$root/etc/rxe.driver" "$root/etc/libibverbs.d/"
for f in "${files[@]}"; do
  [ -x "$f" ] || { log "--file $f is not an executable"; exit 2; }
  copy_with_libs "$f" "/bin/$(basename "$f")"
done

# Modules in dependency order (modules.dep lists a module's dependencies, deepest last).
declare -A seen=()
order=()
add_module() {  # <path relative to moddir>
  local rel=$1 dep
  [ -n "${seen[$rel]:-}" ] && return
  seen[$rel]=1
  local deps
  deps=$(awk -v m="$rel:" '$1 == m { for (i = NF; i >= 2; i--) print $i }' "$moddir/modules.dep")
  for dep in $deps; do add_module "$dep"; done
  order+=("$rel")
}
for name in crc32_generic virtio_pci virtio_net ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe; do
  rel=$(awk -F: -v n="$name" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f);
                                  gsub(/-/, "_", f); if (f == n) { print $1; exit } }' "$moddir/modules.dep")
  [ -n "$rel" ] || unavailable "module $name is not in $kver"
  add_module "$rel"
done
: >"$root/modules.order"
for rel in "${order[@]}"; do
  dest=$(basename "$rel")
  case "$rel" in
    *.ko.xz) xz -dc "$moddir/$rel" >"$root/lib/modules/${dest%.xz}"; dest=${dest%.xz} ;;
    *.ko.zst) zstd -qdc "$moddir/$rel" >"$root/lib/modules/${dest%.zst}"; dest=${dest%.zst} ;;
    *) cp "$moddir/$rel" "$root/lib/modules/$dest" ;;
  esac
  echo "$dest" >>"$root/modules.order"
done

printf '%s\n' "$command_line" >"$root/command"
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in $(cat /modules.order); do
  insmod /lib/modules/$m || echo "AGGVM-RXE: insmod $m failed"
done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
rdma link add rxe0 type rxe netdev eth0 || echo eth0 > /sys/module/rdma_rxe/parameters/add
i=0
while [ ! -e /sys/class/infiniband/rxe0 ] || [ ! -e /dev/infiniband/uverbs0 ]; do
  i=$((i + 1)); [ $i -gt 100 ] && break; sleep 0.1
done
if [ -e /sys/class/infiniband/rxe0 ]; then
  echo "AGGVM-RXE-READY $(uname -r) $(cat /sys/class/infiniband/rxe0/ports/1/state)"
  cd /tmp
  sh /command
  rc=$?
else
  echo "AGGVM-RXE: rxe0 did not appear"; dmesg | tail -20
  rc=1
fi
echo "AGGVM-RXE-RESULT rc=$rc"
sync
poweroff -f
EOF
chmod 0755 "$root/init"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$workdir/initrd.gz" ||
  { log "building the initramfs failed"; exit 1; }

# ---- boot ------------------------------------------------------------------------------------------------------
console="$workdir/console.log"
log "booting $kver under qemu TCG (timeout ${timeout_s}s): $command_line"
start=$(date +%s)
timeout --kill-after=5 "$timeout_s" qemu-system-x86_64 -accel tcg -m 1024 -nographic -no-reboot \
  -pidfile "$qemu_pidfile" -kernel "$vmlinuz" -initrd "$workdir/initrd.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 </dev/null 2>&1 | tr -d '\r' | tee "$console" &
pipeline_pid=$!
for _ in $(seq 100); do  # qemu writes the pidfile as it starts
  [ -s "$qemu_pidfile" ] && { qemu_pid=$(cat "$qemu_pidfile"); break; }
  kill -0 "$pipeline_pid" 2>/dev/null || break
  sleep 0.1
done
wait "$pipeline_pid"
end=$(date +%s)

result=$(grep -a -o 'AGGVM-RXE-RESULT rc=[0-9]*' "$console" | tail -1 | sed 's/.*rc=//')
if [ -z "$result" ]; then
  if grep -aq 'AGGVM-RXE-READY' "$console"; then
    log "FAIL: the command did not finish within ${timeout_s}s (qemu killed after $((end - start))s)"
  else
    log "FAIL: the VM never got rxe0 up (see the console output above)"
  fi
  exit 1
fi
log "VM finished in $((end - start))s; in-VM command exit status $result"
exit "$result"
