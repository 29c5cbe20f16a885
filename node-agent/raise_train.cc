#include "node-agent/raise_train.h"

#include <sys/prctl.h>

#include <algorithm>
#include <chrono>

#include "common/thread.h"

namespace aggvm::agent {

void RaiseTrain::Start(uint32_t count, absl::Duration interval, RaiseFn raise) {
  Stop();
  if (count == 0 || !raise) return;
  trains_.fetch_add(1, std::memory_order_relaxed);
  running_.store(true, std::memory_order_release);
  thread_ = std::jthread([this, count, interval, raise = std::move(raise)](std::stop_token stop) {
    Run(stop, count, interval, raise);
  });
}

void RaiseTrain::Stop() {
  if (!thread_.joinable()) return;
  thread_.request_stop();  // wakes the wait in Run (condition_variable_any with the stop token)
  thread_.join();
  thread_ = std::jthread();
  running_.store(false, std::memory_order_release);
}

void RaiseTrain::Run(std::stop_token stop, uint32_t count, absl::Duration interval, RaiseFn raise) {
  // The default 50 µs timer slack would delay every deadline by up to that much; a device's rate wants less.
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  NameThisThread("train");
  const auto step = absl::ToChronoNanoseconds(interval);
  const auto start = std::chrono::steady_clock::now();  // CLOCK_MONOTONIC
  for (uint32_t i = 0; i < count; ++i) {
    const auto due = start + step * i;
    if (i > 0) {
      {
        std::unique_lock l(mu_);
        cv_.wait_until(l, stop, due, [] { return false; });
      }
      if (stop.stop_requested()) break;
      const auto behind = std::chrono::steady_clock::now() - due;
      if (behind > step) {
        // Woken more than one interval late: the deadlines that passed meanwhile (but the last) are skipped.
        const uint64_t missed = static_cast<uint64_t>(behind / step);
        const uint32_t skip = static_cast<uint32_t>(std::min<uint64_t>(missed, count - 1 - i));
        skipped_.fetch_add(skip, std::memory_order_relaxed);
        i += skip;
        late_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    raise();
    raises_.fetch_add(1, std::memory_order_relaxed);
  }
  running_.store(false, std::memory_order_release);
}

}  // namespace aggvm::agent
