// RaiseTrain: a device on this node that raises an interrupt at a set rate — `count` calls of `raise`, the i-th at
// start + i * interval on CLOCK_MONOTONIC (absolute deadlines, so a late wake-up does not shift the rest), on its
// own thread. It serves the doorbell's trains (kControl raise-gsi with a count, transport/frame.h): the master asks
// once, and every raise then starts on this node with no RPC and no master in its path, as a real device's would.
//
// One train at a time: Start replaces a running train (stops and joins it first). The thread sleeps on a
// condition variable until each deadline, so Stop / the destructor wake it at once. A raise is never early. One
// that starts after its deadline but within one interval just runs; when the thread wakes more than one interval
// behind (it was not scheduled: counted in late), the edges whose deadlines passed are skipped and counted, one is
// raised, and the train goes on at the next deadline — a burst of catch-up edges is not what a device does.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include "absl/time/time.h"

namespace aggvm::agent {

class RaiseTrain {
 public:
  using RaiseFn = std::function<void()>;

  RaiseTrain() = default;
  ~RaiseTrain() { Stop(); }
  RaiseTrain(const RaiseTrain&) = delete;
  RaiseTrain& operator=(const RaiseTrain&) = delete;

  /// Runs `count` raises `interval` apart, the first at once. Not thread-safe against itself: one caller thread
  /// (the node's data-plane thread) starts and stops trains.
  void Start(uint32_t count, absl::Duration interval, RaiseFn raise);
  /// Stops a running train and waits for its thread; no raise runs after it returns.
  void Stop();

  [[nodiscard]] uint64_t trains() const { return trains_.load(std::memory_order_relaxed); }
  [[nodiscard]] uint64_t raises() const { return raises_.load(std::memory_order_relaxed); }
  [[nodiscard]] uint64_t late() const { return late_.load(std::memory_order_relaxed); }
  [[nodiscard]] uint64_t skipped() const { return skipped_.load(std::memory_order_relaxed); }
  [[nodiscard]] bool running() const { return running_.load(std::memory_order_acquire); }

 private:
  void Run(std::stop_token stop, uint32_t count, absl::Duration interval, RaiseFn raise);

  std::mutex mu_;  // for the condition variable only
  std::condition_variable_any cv_;
  std::atomic<uint64_t> trains_{0}, raises_{0}, late_{0}, skipped_{0};
  std::atomic<bool> running_{false};
  std::jthread thread_;  // last: joined before the members above go
};

}  // namespace aggvm::agent
