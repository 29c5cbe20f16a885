#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs every test — normal build, then the ASan+UBSan
# build, then each fuzz target for a bounded time.
#
#   scripts/test.sh                 on a user's machine: tests whose prerequisite (/dev/kvm, root for network
#                                   namespaces, qemu for the rdma_rxe VM) is missing are skipped with a message
#   scripts/test.sh --require-all   (CI) a missing prerequisite is a failure
#   scripts/test.sh --quick         normal build only (no sanitizer build, no fuzzing)
#   scripts/test.sh -R REGEX        only tests whose name matches
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
quick=0
ctest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --require-all) export AGGVM_REQUIRE=all ;;
    --require-kvm) export AGGVM_REQUIRE="${AGGVM_REQUIRE:+$AGGVM_REQUIRE,}kvm" ;;
    --require-netns) export AGGVM_REQUIRE="${AGGVM_REQUIRE:+$AGGVM_REQUIRE,}netns" ;;
    --require-rxe) export AGGVM_REQUIRE="${AGGVM_REQUIRE:+$AGGVM_REQUIRE,}rxe" ;;
    --quick) quick=1 ;;
    -R) ctest_args+=(-R "$2"); shift ;;
    *) echo "test.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

"$root/scripts/install-deps.sh" || exit 1

total_pass=0
total_fail=0
total_skip=0
failed_flavours=()
skipped_names=()

run_ctest() {  # <flavour> <build dir> [extra ctest args]
  local flavour=$1 dir=$2
  shift 2
  local log=$dir/ctest.log
  echo "=== $flavour: ctest"
  (cd "$dir" && ctest --output-on-failure --timeout 900 "${ctest_args[@]}" "$@") 2>&1 | tee "$log"
  local line
  line=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -1)
  if [ -z "$line" ]; then
    if grep -q 'No tests were found' "$log"; then line="100% tests passed, 0 tests failed out of 0"; else
      echo "test.sh: $flavour: ctest printed no summary"; total_fail=$((total_fail + 1)); failed_flavours+=("$flavour")
      return
    fi
  fi
  local failed outof
  failed=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
  outof=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$line")
  # ctest counts a skipped test (GTEST_SKIP, exit 77) in "out of N" as not failed: count it apart and name it.
  local skipped=0 name
  while IFS= read -r name; do
    skipped=$((skipped + 1)); skipped_names+=("$flavour: $name")
  done < <(grep -E '^[[:space:]]*[0-9]+ - .* \(Skipped\)$' "$log" | sed -E 's/^[[:space:]]*[0-9]+ - (.*) \(Skipped\)$/\1/')
  if [ "$skipped" -gt 0 ] && [ -f "$dir/Testing/Temporary/LastTest.log" ]; then
    echo "=== $flavour: why tests were skipped"
    grep -ohE 'skipping: .*|rxe_vm: SKIP: .*' "$dir/Testing/Temporary/LastTest.log" | sort | uniq -c
  fi
  total_pass=$((total_pass + outof - failed - skipped))
  total_fail=$((total_fail + failed))
  total_skip=$((total_skip + skipped))
  [ "$failed" -eq 0 ] || failed_flavours+=("$flavour")
}

build_or_fail() {  # <flavour>
  echo "=== $1: build"
  if ! "$root/scripts/build.sh" "$1"; then
    echo "test.sh: the $1 build failed"
    total_fail=$((total_fail + 1)); failed_flavours+=("$1-build")
    return 1
  fi
}

if build_or_fail normal; then run_ctest normal "$root/build"; fi
if [ $quick -eq 0 ]; then
  # The sanitizer build runs every test except the ones inside the TCG rdma_rxe VM (label rxe): those are
  # minutes of emulated CPU and exercise the same code the normal build already ran there.
  if build_or_fail asan; then
    AGGVM_FUZZ_REPLAY_INPUTS=20000 \
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      run_ctest asan "$root/build-asan" -LE rxe
  fi
  if build_or_fail fuzz; then
    for f in "$root"/build-fuzz/fuzz/fuzz_*; do
      [ -x "$f" ] || continue
      name=$(basename "$f")
      echo "=== fuzz: $name (30 s)"
      corpus="$root/fuzz/corpus/${name#fuzz_}"
      mkdir -p "$root/build-fuzz/corpus-$name"
      if "$f" -max_total_time=30 -print_final_stats=1 "$root/build-fuzz/corpus-$name" \
          $( [ -d "$corpus" ] && echo "$corpus" ) > "$root/build-fuzz/$name.log" 2>&1; then
        total_pass=$((total_pass + 1)); tail -3 "$root/build-fuzz/$name.log"
      else
        total_fail=$((total_fail + 1)); failed_flavours+=("$name"); tail -40 "$root/build-fuzz/$name.log"
      fi
    done
  fi
fi

echo
if [ $total_skip -gt 0 ]; then
  echo "skipped (a prerequisite is missing; the reason is in each test's output above, or run with --require-all to make it a failure):"
  printf '  %s\n' "${skipped_names[@]}"
fi
[ ${#failed_flavours[@]} -eq 0 ] || echo "failed: ${failed_flavours[*]}"
echo "aggvm: $total_pass passed, $total_fail failed, $total_skip skipped"
[ $total_fail -eq 0 ]
