#include "node-agent/trace_reporter.h"

#include <fmt/format.h>

#include "common/thread.h"

namespace aggvm::agent {

absl::StatusOr<std::unique_ptr<TraceReporter>> TraceReporter::Start(Sink sink, TraceReporterOptions options) {
  if (!sink) return absl::InvalidArgumentError("trace reporter: no sink");
  if (options.capacity == 0 || (options.capacity & (options.capacity - 1)) != 0) {
    return absl::InvalidArgumentError(
        fmt::format("trace reporter: capacity {} is not a power of two", options.capacity));
  }
  if (options.period <= absl::ZeroDuration() || options.idle_after < options.period) {
    return absl::InvalidArgumentError("trace reporter: the period must be > 0 and idle_after >= period");
  }
  std::unique_ptr<TraceReporter> r(new TraceReporter(std::move(sink), options));
  r->flusher_ = std::jthread([p = r.get()](std::stop_token st) {
    NameThisThread("trace-report");
    p->Run(st);
  });
  return r;
}

TraceReporter::TraceReporter(Sink sink, TraceReporterOptions options)
    : sink_(std::move(sink)), options_(options), ring_(options.capacity) {}

TraceReporter::~TraceReporter() {
  flusher_.request_stop();
  cv_.notify_all();
  if (flusher_.joinable()) flusher_.join();
  Drain();
}

bool TraceReporter::Push(const transport::TraceBlock& t) noexcept {
  while (producer_.test_and_set(std::memory_order_acquire)) {
  }
  const uint64_t head = head_.load(std::memory_order_relaxed);
  if (head - tail_.load(std::memory_order_acquire) >= ring_.size()) {
    producer_.clear(std::memory_order_release);
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  ring_[head & (ring_.size() - 1)] = t;
  head_.store(head + 1, std::memory_order_seq_cst);
  producer_.clear(std::memory_order_release);
  pushed_.fetch_add(1, std::memory_order_relaxed);
  // The flusher went to sleep after a quiet spell: this Push wakes it (rare; never while records flow). seq_cst
  // against the flusher's `sleeping_ = true; re-check head_`: one of the two sees the other.
  if (sleeping_.load(std::memory_order_seq_cst) && sleeping_.exchange(false, std::memory_order_seq_cst)) {
    {
      std::lock_guard l(mu_);
      wake_ = true;
    }
    cv_.notify_one();
  }
  return true;
}

size_t TraceReporter::Drain() {
  const uint64_t head = head_.load(std::memory_order_acquire);
  uint64_t tail = tail_.load(std::memory_order_relaxed);
  const size_t n = static_cast<size_t>(head - tail);
  for (; tail != head; ++tail) {
    const transport::TraceBlock t = ring_[tail & (ring_.size() - 1)];
    tail_.store(tail + 1, std::memory_order_release);  // the slot is free once copied out
    sink_(t);
  }
  flushed_.fetch_add(n, std::memory_order_relaxed);
  return n;
}

void TraceReporter::Run(std::stop_token stop) {
  const auto period = absl::ToChronoNanoseconds(options_.period);
  const int idle_rounds = static_cast<int>(options_.idle_after / options_.period);
  int quiet = idle_rounds;  // start asleep: nothing flows until the first Push
  while (!stop.stop_requested()) {
    if (quiet >= idle_rounds) {
      sleeping_.store(true, std::memory_order_seq_cst);
      if (head_.load(std::memory_order_seq_cst) == tail_.load(std::memory_order_relaxed)) {
        std::unique_lock l(mu_);
        cv_.wait(l, stop, [this] { return wake_; });
        wake_ = false;
        wakeups_.fetch_add(1, std::memory_order_relaxed);
      }
      sleeping_.store(false, std::memory_order_seq_cst);
      quiet = 0;
      // Leave the Push that woke us its head start: its record is reported one period later, after the interrupt.
    }
    {
      std::unique_lock l(mu_);
      cv_.wait_for(l, stop, period, [] { return false; });
    }
    quiet = Drain() > 0 ? 0 : quiet + 1;
  }
}

}  // namespace aggvm::agent
