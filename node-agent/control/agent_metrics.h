// The node agent's Prometheus endpoint (aggvm-agent --metrics-listen host:port): the counters of this node's share of
// the VM (local controller, transport, forwarded I/O — ClusterVmHost::Stats) read at scrape time, so nothing is added
// to the per-interrupt path, and per-hop latency histograms of the traced interrupts injected on this node (fed from
// the trace records, lab/trace_record.h). Metric names: docs/latency-lab.md "Metrics".
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lab/metrics.h"

namespace aggvm::agent::control {

/// The scrape-time samples for one node's counters (`stats` as AgentControlPlane::Counters returns them).
/// Pure: unit-testable without a server.
std::vector<lab::ScrapedSample> AgentSamples(const std::string& node, const std::string& vm,
                                             const std::map<std::string, uint64_t>& stats);

class AgentMetrics {
 public:
  using CountersFn = std::function<std::map<std::string, uint64_t>()>;
  using VmFn = std::function<std::string()>;
  /// Listens on `listen` (UNAVAILABLE naming the address if it cannot). `counters` and `vm` are called at scrape time.
  static absl::StatusOr<std::unique_ptr<AgentMetrics>> Start(const std::string& node, const std::string& listen,
                                                             CountersFn counters, VmFn vm);
  ~AgentMetrics();

  /// A record the VM reported (AgentControlOptions::record_tap): trace records go into the hop histograms, others
  /// are ignored. Any thread; no allocation.
  void OnRecord(uint32_t type, uint64_t a, uint64_t b, uint64_t c, uint64_t d);
  [[nodiscard]] uint16_t port() const;

 private:
  AgentMetrics() = default;
  std::unique_ptr<lab::MetricsRegistry> registry_;
  std::unique_ptr<lab::MetricsEndpoint> endpoint_;
  // raised->local_controller, local_controller->master_received, master_received->decided,
  // decided->target_received, target_received->injected, raised->injected (end to end as far as the host sees it).
  std::vector<lab::LatencyHistogramHandle> hops_;
  std::unique_ptr<lab::CounterHandle> traced_;
};

}  // namespace aggvm::agent::control
