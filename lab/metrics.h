// Metrics of the master and the node agents, exposed in the Prometheus text format (version 0.0.4) over HTTP, on
// top of prometheus-cpp (Debian prometheus-cpp-dev: core + pull, the pull side embeds civetweb).
//
// Use: create a MetricsRegistry at start-up, ask it once for the handles you need (a counter per name + label set,
// a latency histogram per name + label set with fixed bucket bounds) and keep them; on the per-interrupt path only
// call CounterHandle::Increment / LatencyHistogramHandle::ObserveNanos. Creating a handle takes the registry's lock
// and may allocate; using one does neither beyond prometheus-cpp's own metric: a counter increment is one atomic
// compare-exchange loop on a double, a histogram observation takes the histogram's (uncontended) mutex — see
// bench/lab for the costs.
//
// Conventions (https://prometheus.io/docs/practices/naming/): names like aggvm_interrupts_raised_total, latencies
// in seconds with names ending in _seconds (the handle converts from ns).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/histogram.h>

#include "absl/status/statusor.h"

namespace prometheus {
class Registry;
class Exposer;
class Collectable;
}  // namespace prometheus

namespace aggvm::lab {

using MetricLabels = std::map<std::string, std::string>;

/// A cached counter time series. Cheap to copy; valid while its MetricsRegistry lives.
class CounterHandle {
 public:
  void Increment(uint64_t n = 1) const { counter_->Increment(static_cast<double>(n)); }
  double value() const { return counter_->Value(); }

 private:
  friend class MetricsRegistry;
  explicit CounterHandle(prometheus::Counter* c) : counter_(c) {}
  prometheus::Counter* counter_;
};

/// A cached histogram time series in seconds. Cheap to copy; valid while its MetricsRegistry lives.
class LatencyHistogramHandle {
 public:
  void ObserveNanos(uint64_t ns) const { histogram_->Observe(static_cast<double>(ns) * 1e-9); }

 private:
  friend class MetricsRegistry;
  explicit LatencyHistogramHandle(prometheus::Histogram* h) : histogram_(h) {}
  prometheus::Histogram* histogram_;
};

/// Default latency bucket upper bounds in ns: 1 µs .. 100 ms, 1-2-5 steps.
std::span<const uint64_t> DefaultLatencyBoundsNs();

class MetricsRegistry {
 public:
  MetricsRegistry();
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  /// The counter `name`{labels}; the same handle for the same name and labels. INVALID_ARGUMENT for a name or label
  /// that Prometheus does not accept; ALREADY_EXISTS if `name` is registered as another type or with another help.
  absl::StatusOr<CounterHandle> Counter(std::string_view name, std::string_view help, const MetricLabels& labels = {});
  /// The histogram `name`{labels} with upper bounds `bounds_ns` (strictly increasing, > 0; +Inf is implicit).
  /// Same errors as Counter, plus ALREADY_EXISTS if the series exists with other bounds.
  absl::StatusOr<LatencyHistogramHandle> LatencyHistogram(std::string_view name, std::string_view help,
                                                          const MetricLabels& labels = {},
                                                          std::span<const uint64_t> bounds_ns =
                                                              DefaultLatencyBoundsNs());

  /// The current values in the text exposition format (what a scrape returns).
  std::string TextExposition() const;
  std::shared_ptr<prometheus::Registry> prometheus_registry() const { return registry_; }

 private:
  struct FamilyEntry;
  std::shared_ptr<prometheus::Registry> registry_;
  std::mutex mutex_;
  std::map<std::string, std::unique_ptr<FamilyEntry>, std::less<>> families_;
};

/// One value read at scrape time from counters that already exist elsewhere (a controller's relaxed atomics, a
/// transport's stats): nothing is added to the path that bumps them.
struct ScrapedSample {
  enum class Type : uint8_t { kCounter, kGauge };
  std::string name;   // e.g. aggvm_interrupts_dropped_total
  std::string help;   // the same for every sample of one name
  MetricLabels labels;
  double value = 0;
  Type type = Type::kCounter;
};
/// Called on the endpoint's thread for every scrape. Must be thread-safe and must not block for long.
using ScrapeFunction = std::function<std::vector<ScrapedSample>()>;

/// An HTTP endpoint serving GET /metrics for one registry (civetweb threads inside prometheus-cpp).
class MetricsEndpoint {
 public:
  /// Listens on `bind_address` ("127.0.0.1:0" picks a free port). UNAVAILABLE if it cannot listen (the message
  /// names the address). `collect` (optional) adds the samples it returns to every scrape, after the registry's;
  /// samples with an invalid metric or label name are left out.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(const MetricsRegistry& registry,
                                                                const std::string& bind_address = "127.0.0.1:0",
                                                                ScrapeFunction collect = {});
  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  uint16_t port() const { return port_; }

 private:
  MetricsEndpoint(std::unique_ptr<prometheus::Exposer> exposer, uint16_t port,
                  std::shared_ptr<prometheus::Collectable> collector);
  std::shared_ptr<prometheus::Collectable> collector_;  // held here: the exposer keeps only a weak_ptr
  std::unique_ptr<prometheus::Exposer> exposer_;
  uint16_t port_;
};

}  // namespace aggvm::lab
