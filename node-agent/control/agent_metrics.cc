#include "node-agent/control/agent_metrics.h"

#include <string_view>
#include <utility>

#include "lab/trace_record.h"

namespace aggvm::agent::control {
namespace {

using lab::ScrapedSample;

constexpr std::string_view kDroppedPrefix = "local_controller.dropped_";

// The hops a trace record carries, in the order of AgentMetrics::hops_; the last is end to end.
constexpr std::array<std::string_view, 6> kRecordHopNames = {
    "raised->local_controller", "local_controller->master_received", "master_received->decided",
    "decided->target_received", "target_received->injected",         "raised->injected"};

}  // namespace

std::vector<ScrapedSample> AgentSamples(const std::string& node, const std::string& vm,
                                        const std::map<std::string, uint64_t>& stats) {
  std::vector<ScrapedSample> out;
  const lab::MetricLabels base = {{"node", node}, {"vm", vm}};
  auto get = [&](const char* key) -> double {
    auto it = stats.find(key);
    return it == stats.end() ? 0.0 : static_cast<double>(it->second);
  };
  auto counter = [&](const char* name, const char* help, double v, lab::MetricLabels extra = {}) {
    lab::MetricLabels l = base;
    l.insert(extra.begin(), extra.end());
    out.push_back({name, help, std::move(l), v, ScrapedSample::Type::kCounter});
  };
  if (!vm.empty()) {
    counter("aggvm_interrupts_raised_total", "Interrupts raised on this node (GSI raises and MSIs sent to the master)",
            get("local_controller.raised") + get("local_controller.msis_sent"));
    counter("aggvm_interrupts_delivered_total", "Interrupts injected into this node's vCPUs (kDeliver)",
            get("local_controller.delivered"));
    for (const auto& [key, v] : stats) {
      if (key.rfind(kDroppedPrefix, 0) == 0) {
        counter("aggvm_interrupts_dropped_total", "Interrupt frames dropped, by reason", static_cast<double>(v),
                {{"reason", key.substr(kDroppedPrefix.size())}});
      }
    }
    counter("aggvm_interrupts_dropped_total", "Interrupt frames dropped, by reason", get("local_controller.inject_failed"),
            {{"reason", "inject_failed"}});
    counter("aggvm_interrupts_dropped_total", "Interrupt frames dropped, by reason", get("local_controller.send_failed"),
            {{"reason", "send_failed"}});
    counter("aggvm_frames_sent_total", "Data-plane frames sent", get("transport.frames_sent"));
    counter("aggvm_frames_received_total", "Data-plane frames received", get("transport.frames_received"));
    counter("aggvm_frames_bad_total", "Data-plane frames refused by the decoder", get("transport.bad_frames"));
  }
  // Everything else as it comes, so a dashboard can show any counter the host keeps.
  for (const auto& [key, v] : stats) {
    lab::MetricLabels l = base;
    l["key"] = key;
    out.push_back({"aggvm_agent_stat", "Every counter of the node agent (GetStats), by key", std::move(l),
                   static_cast<double>(v), ScrapedSample::Type::kGauge});
  }
  out.push_back({"aggvm_agent_vm_held", "1 while this node holds a VM", base, vm.empty() ? 0.0 : 1.0,
                 ScrapedSample::Type::kGauge});
  return out;
}

absl::StatusOr<std::unique_ptr<AgentMetrics>> AgentMetrics::Start(const std::string& node, const std::string& listen,
                                                                  CountersFn counters, VmFn vm) {
  std::unique_ptr<AgentMetrics> m(new AgentMetrics());
  m->registry_ = std::make_unique<lab::MetricsRegistry>();
  for (size_t i = 0; i < kRecordHopNames.size(); ++i) {
    auto h = m->registry_->LatencyHistogram("aggvm_hop_latency_seconds",
                                            "Per-hop latency of traced interrupts injected on this node",
                                            {{"node", node}, {"hop", std::string(kRecordHopNames[i])}});
    if (!h.ok()) return h.status();
    m->hops_.push_back(*h);
  }
  auto traced = m->registry_->Counter("aggvm_traced_interrupts_total", "Traced interrupts injected on this node",
                                      {{"node", node}});
  if (!traced.ok()) return traced.status();
  m->traced_ = std::make_unique<lab::CounterHandle>(*traced);
  auto ep = lab::MetricsEndpoint::Start(*m->registry_, listen,
                                        [node, counters = std::move(counters), vm = std::move(vm)] {
                                          return AgentSamples(node, vm(), counters());
                                        });
  if (!ep.ok()) return ep.status();
  m->endpoint_ = std::move(*ep);
  return m;
}

AgentMetrics::~AgentMetrics() { endpoint_.reset(); }

void AgentMetrics::OnRecord(uint32_t type, uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  if (type != lab::kTraceRecordType) return;
  const transport::TraceBlock t = lab::DecodeTraceRecord(a, b, c, d);
  traced_->Increment();
  const uint64_t stamps[] = {t.raised,         t.local_controller, t.master_received,
                             t.master_decided, t.target_received,  t.injected};
  static_assert(std::size(stamps) == kRecordHopNames.size());
  for (size_t i = 0; i + 1 < std::size(stamps); ++i) {
    if (stamps[i] != 0 && stamps[i + 1] != 0 && stamps[i + 1] >= stamps[i]) {
      hops_[i].ObserveNanos(stamps[i + 1] - stamps[i]);
    }
  }
  if (t.raised != 0 && t.injected >= t.raised) hops_[kRecordHopNames.size() - 1].ObserveNanos(t.injected - t.raised);
}

uint16_t AgentMetrics::port() const { return endpoint_->port(); }

}  // namespace aggvm::agent::control
