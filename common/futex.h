// A futex on a 32-bit atomic word: sleep while it holds a value, wake its sleepers.
//
// The forwarded-I/O slots (node-agent/io_forwarder.cc) sleep with a deadline; the latency bench's stream floor sleeps
// without one, because arming a timer around every frame is a cost the cluster's data-plane threads no longer pay.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <ctime>
#include <optional>

namespace aggvm {

static_assert(std::atomic<uint32_t>::is_always_lock_free && sizeof(std::atomic<uint32_t>) == sizeof(uint32_t),
              "a futex word must be a plain 32-bit integer");

/// Sleeps while `word` holds `expected`, at most `timeout_ns` (relative) if given, without a timer if not. Returns
/// on a wake, a changed word (EAGAIN), a signal or the timeout alike: the caller looks at the word again.
inline void FutexWait(std::atomic<uint32_t>& word, uint32_t expected, std::optional<uint64_t> timeout_ns = {}) {
  timespec ts{};
  if (timeout_ns) {
    ts.tv_sec = static_cast<time_t>(*timeout_ns / 1'000'000'000ull);
    ts.tv_nsec = static_cast<long>(*timeout_ns % 1'000'000'000ull);
  }
  ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected,
            timeout_ns ? &ts : nullptr, nullptr, 0);
}

/// Wakes up to `count` threads sleeping on `word` (all by default).
inline void FutexWake(std::atomic<uint32_t>& word, int count = INT_MAX) {
  ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}

}  // namespace aggvm
