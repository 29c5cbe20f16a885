// TraceReporter: hands the trace blocks of traced interrupts injected on this node to a sink (the trace records the
// master and the latency lab receive), off the data-plane thread and outside the interrupt's own path.
//
// Reporting a record means building a protobuf event and a gRPC stream write, and on this design's 2-core nodes
// that work competes with the vCPU that is about to run the handler of the very interrupt it reports (measured: a
// traced doorbell reached the guest handler ~100 µs later than an untraced one, docs/latency-lab.md). So Push()
// only copies the block into a fixed ring: no allocation, no lock shared with the consumer, no system call. A
// flusher thread drains the ring every `period` while records flow; after `idle_after` without any it sleeps until
// the next Push (that one Push pays a wake-up). A full ring drops the block and counts it.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/frame.h"

namespace aggvm::agent {

struct TraceReporterOptions {
  size_t capacity = 4096;  // blocks held between flushes; a power of two
  absl::Duration period = absl::Milliseconds(2);
  absl::Duration idle_after = absl::Seconds(1);
};

class TraceReporter {
 public:
  using Sink = std::function<void(const transport::TraceBlock&)>;

  /// INVALID_ARGUMENT for a capacity that is not a power of two (or 0), a period <= 0, or no sink.
  static absl::StatusOr<std::unique_ptr<TraceReporter>> Start(Sink sink, TraceReporterOptions options = {});
  /// Stops the flusher and hands whatever is still queued to the sink.
  ~TraceReporter();
  TraceReporter(const TraceReporter&) = delete;
  TraceReporter& operator=(const TraceReporter&) = delete;

  /// Thread-safe, wait-free for a single producer (producers serialize on a spin flag). False when the ring is full.
  bool Push(const transport::TraceBlock& t) noexcept;

  uint64_t pushed() const { return pushed_.load(std::memory_order_relaxed); }
  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }
  uint64_t flushed() const { return flushed_.load(std::memory_order_relaxed); }
  uint64_t wakeups() const { return wakeups_.load(std::memory_order_relaxed); }

 private:
  TraceReporter(Sink sink, TraceReporterOptions options);
  void Run(std::stop_token stop);
  size_t Drain();

  const Sink sink_;
  const TraceReporterOptions options_;
  std::vector<transport::TraceBlock> ring_;
  std::atomic_flag producer_{};
  std::atomic<uint64_t> head_{0};  // next slot to write (producers)
  std::atomic<uint64_t> tail_{0};  // next slot to read (the flusher)
  std::atomic<bool> sleeping_{false};
  std::mutex mu_;
  std::condition_variable_any cv_;
  bool wake_ = false;  // guarded by mu_
  std::atomic<uint64_t> pushed_{0}, dropped_{0}, flushed_{0}, wakeups_{0};
  std::jthread flusher_;
};

}  // namespace aggvm::agent
