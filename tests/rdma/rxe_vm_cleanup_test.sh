#!/usr/bin/env bash
# rxe_vm.sh must not leave qemu behind: start a VM that would run for minutes, stop rxe_vm.sh with SIGTERM (what
# ctest does on a timeout) and check that its qemu is gone within a few seconds.
#
#   rxe_vm_cleanup_test.sh RXE_VM_SH
#
# Exit 0 pass, 1 fail, 77 skipped (rxe_vm.sh skipped: no qemu or kernel package, and AGGVM_REQUIRE lacks rxe/all).
set -uo pipefail
rxe_vm=${1:?usage: rxe_vm_cleanup_test.sh path/to/rxe_vm.sh}
workdir=$(mktemp -d /tmp/aggvm-rxe-cleanup.XXXXXX)
runner_pid=""
qemu_pid=""
finish() {
  # Never leave anything running, whatever happened above.
  [ -n "$runner_pid" ] && kill -9 "$runner_pid" 2>/dev/null
  if [ -n "$qemu_pid" ] && [[ "$(cat "/proc/$qemu_pid/comm" 2>/dev/null)" == qemu-system* ]]; then
    kill -9 "$qemu_pid" 2>/dev/null
  fi
  rm -rf "$workdir"
}
trap finish EXIT
fail() { echo "rxe_vm_cleanup_test: FAIL: $*" >&2; exit 1; }

"$rxe_vm" --timeout 600 --workdir "$workdir" -- sleep 600 >"$workdir/runner.log" 2>&1 &
runner_pid=$!
for _ in $(seq 1200); do  # up to 120 s to build the initramfs and start qemu
  if [ -s "$workdir/qemu.pid" ]; then qemu_pid=$(cat "$workdir/qemu.pid"); break; fi
  if ! kill -0 "$runner_pid" 2>/dev/null; then
    wait "$runner_pid"
    rc=$?
    runner_pid=""
    [ $rc -eq 77 ] && { echo "rxe_vm_cleanup_test: SKIP: rxe_vm.sh skipped"; exit 77; }
    cat "$workdir/runner.log" >&2
    fail "rxe_vm.sh exited ($rc) before qemu started"
  fi
  sleep 0.1
done
[ -n "$qemu_pid" ] || fail "qemu did not start within 120 s (no $workdir/qemu.pid)"
kill -0 "$qemu_pid" 2>/dev/null || fail "qemu (pid $qemu_pid) is not running"
sleep 2  # the VM is booting
kill -TERM "$runner_pid"
wait "$runner_pid"
echo "rxe_vm_cleanup_test: rxe_vm.sh ended with status $? after SIGTERM"
runner_pid=""
for _ in $(seq 50); do
  if ! kill -0 "$qemu_pid" 2>/dev/null || [[ "$(cat "/proc/$qemu_pid/comm" 2>/dev/null)" != qemu-system* ]]; then
    echo "rxe_vm_cleanup_test: qemu (pid $qemu_pid) is gone: PASS"
    exit 0
  fi
  sleep 0.1
done
fail "qemu (pid $qemu_pid) still runs 5 s after rxe_vm.sh was stopped"
